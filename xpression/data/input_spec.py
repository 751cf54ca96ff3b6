"""What a trained model takes as input, saved inside its checkpoint (``InputSpec``).

As timm keeps a model's input configuration with its weights, every checkpoint carries, under
:data:`INPUT_SPEC_KEY`, everything the patch path (:mod:`xpression.data.patches`) needs to feed
the model new volumes exactly as in training, with no run folder, config or training cohort:

- geometry: the patch size in um, the model voxel size (um) and the patch shape in voxels;
- the spot radius in um (the in-plane disk a spot's value averages over);
- the intensity normalisation (:class:`IntensitySpec`): the method and its parameters and, for
  histogram matching, the reference volume's voxel sample itself (its distinct values and their
  counts), so the reference volume need not exist where the model is used;
- the quantisation of the training cache (``uint8`` or ``float16``);
- the targets: names, kind, colours and, for fitted programs, the truth programs they were
  matched to;
- the model: its class, its family (backbone config) and its dense geometry (output stride,
  dense-equivalent), filled in by the model when it saves itself;
- for a multi-scale model, the context view's field of view in um (``context_um``;
  :class:`~xpression.data.context.ContextView` derives its stride from it and the patch) and what
  the view sees past the volume's faces (``context_edges``: ``mirror`` or ``fill``). Such a spec is
  written as version 2 (``fill``) or 3 (``mirror``), which older readers refuse rather than feed
  the model one view or another edge; a spec without ``context_edges`` reads ``fill``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from xpression.data.context import ContextView
from xpression.data.geometry import DataError
from xpression.data.intensity import SCALINGS, IntensityNormalizer, MatchedNormalizer, match_to_reference, sample_voxels
from xpression.data.patches import QUANTISATIONS, Quantised, ResampledVolume, same_voxel_size
from xpression.data.targets import TargetSpec
from xpression.data.volume import open_volume

__all__ = ["INPUT_SPEC_KEY", "InputSpec", "IntensitySpec", "ReferenceHistogram", "resolve_reference"]

log = logging.getLogger(__name__)

INPUT_SPEC_KEY = "xpression_input_spec"  # where a checkpoint keeps its InputSpec (a plain dict)
INPUT_SPEC_VERSION = 3  # the newest version this reads; a spec without a context view is written as 1


@dataclass(frozen=True)
class ReferenceHistogram:
    """The voxel sample of an intensity reference volume: its distinct ``values`` (sorted) and
    their ``counts``, i.e. the whole sorted sample, compactly (at most 256 entries for 8-bit CT).
    ``name``: the volume id or path it was taken from; ``dtype``: that volume's dtype."""

    name: str
    values: np.ndarray = field(repr=False)
    counts: np.ndarray = field(repr=False)
    dtype: str

    @classmethod
    def of(cls, volume: Any, name: str, sample: int, seed: int) -> "ReferenceHistogram":
        values, counts = np.unique(sample_voxels(volume, sample, seed=seed).astype(np.float64), return_counts=True)
        return cls(str(name), values, counts.astype(np.int64), str(np.dtype(volume.dtype)))

    def sorted_sample(self) -> np.ndarray:
        """The reference's sorted float64 voxel sample."""
        return np.repeat(np.asarray(self.values, np.float64), np.asarray(self.counts, np.int64))

    def to_dict(self) -> dict:
        return {"name": self.name, "values": np.asarray(self.values), "counts": np.asarray(self.counts), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "ReferenceHistogram":
        return cls(str(d["name"]), np.asarray(d["values"], np.float64), np.asarray(d["counts"], np.int64), str(d["dtype"]))


@dataclass(frozen=True)
class IntensitySpec:
    """How raw intensities reach ~[0, 1] for one volume (every volume is normalised on its own).

    ``method``: ``robust`` (the volume's ``percentiles`` range -> [0, 1]) or ``divide255``
    (8-bit values / 255). With a ``reference``, each volume's histogram is first matched onto the
    reference's (then ``robust`` uses the reference's percentile range). Statistics come from a
    seeded bounded sample of ``sample`` voxels (:func:`~xpression.data.intensity.sample_voxels`).
    """

    method: str = "robust"
    percentiles: tuple[float, float] = (0.5, 99.5)
    sample: int = 1_000_000
    seed: int = 0
    reference: ReferenceHistogram | None = None

    def __post_init__(self) -> None:
        if self.method not in SCALINGS:
            raise ValueError(f"intensity method must be one of {', '.join(SCALINGS)}, got {self.method!r}")

    @classmethod
    def fit(cls, method: str = "robust", reference: Any = None, reference_name: str | None = None,
            seed: int = 0) -> "IntensitySpec":
        """The spec of a training run; ``reference``: the opened reference volume, if any."""
        spec = cls(method=method, seed=int(seed))
        if reference is None:
            return spec
        _need_uint8(method, reference)
        return replace(spec, reference=ReferenceHistogram.of(reference, reference_name or str(reference.path),
                                                             spec.sample, spec.seed))

    def transform_for(self, volume: Any) -> Callable[[np.ndarray], np.ndarray]:
        """The block transform (raw -> float32 ~[0, 1]) of ``volume``."""
        _need_uint8(self.method, volume)
        if self.reference is not None and self.method == "divide255" and self.reference.dtype != "uint8":
            raise ValueError(f"intensity scaling divide255 needs 8-bit volumes; the reference "
                             f"{self.reference.name} is {self.reference.dtype}")
        if self.reference is None:
            if self.method == "divide255":
                return IntensityNormalizer(0.0, 255.0)
            return IntensityNormalizer.from_volume(volume, self.percentiles, self.sample, self.seed)
        ref = self.reference.sorted_sample()
        matcher = match_to_reference(sample_voxels(volume, self.sample, seed=self.seed), ref)
        if self.method == "divide255":
            return MatchedNormalizer(matcher, IntensityNormalizer(0.0, 255.0))
        lo, hi = np.percentile(ref, list(self.percentiles))
        return MatchedNormalizer(matcher, IntensityNormalizer(float(lo), float(hi)))

    def describe(self) -> dict:
        """JSON-able summary (map metadata, logs): the reference by name only."""
        return {"method": self.method, "percentiles": list(self.percentiles), "sample": self.sample, "seed": self.seed,
                "reference": None if self.reference is None else self.reference.name}

    def to_dict(self) -> dict:
        return {**self.describe(), "reference": None if self.reference is None else self.reference.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "IntensitySpec":
        ref = d.get("reference")
        return cls(method=str(d.get("method", "robust")), percentiles=tuple(float(p) for p in d.get("percentiles", (0.5, 99.5))),
                   sample=int(d.get("sample", 1_000_000)), seed=int(d.get("seed", 0)),
                   reference=None if ref is None else ReferenceHistogram.from_dict(ref))


def _need_uint8(method: str, volume: Any) -> None:
    dtype = getattr(volume, "dtype", None)
    if method == "divide255" and dtype is not None and np.dtype(dtype) != np.uint8:
        raise ValueError(f"intensity scaling divide255 needs 8-bit volumes; {getattr(volume, 'path', 'the volume')} "
                         f"is {np.dtype(dtype)}")


def _triple(v: Any) -> tuple[float, float, float]:
    return tuple(float(x) for x in np.broadcast_to(np.asarray(v, float), (3,)))  # type: ignore[return-value]


@dataclass(frozen=True)
class InputSpec:
    """A model's input contract (see the module doc). Sizes in um, ``(z, y, x)`` /
    ``(depth, height, width)``; ``patch_shape_vox`` in model voxels (odd)."""

    patch_size_um: tuple[float, float, float]
    voxel_size_um: tuple[float, float, float]
    patch_shape_vox: tuple[int, int, int]
    spot_radius_um: float
    intensity: IntensitySpec
    quantisation: str
    targets: dict
    model: dict = field(default_factory=dict)
    version: int = 1
    context_um: tuple[float, float, float] | None = None
    context_edges: str = "mirror"

    def __post_init__(self) -> None:
        if self.context_um is not None:
            self.context  # checks the size against the patch
        if self.quantisation not in QUANTISATIONS:
            raise ValueError(f"InputSpec.quantisation must be one of {', '.join(QUANTISATIONS)}, got {self.quantisation!r}")
        TargetSpec(list(self.targets["names"]), self.targets["kind"], self.targets.get("colors"))  # checks names/kind/colours

    # -- derived -------------------------------------------------------------------------------
    @property
    def target_spec(self) -> TargetSpec:
        t = self.targets
        return TargetSpec(list(t["names"]), t["kind"], t.get("colors"), t.get("reference"), t.get("reference_r"))

    @cached_property
    def context(self) -> ContextView | None:
        """The context view of a multi-scale model; None for a model that sees the patch only."""
        if self.context_um is None:
            return None
        return ContextView.of(self.context_um, self.patch_size_um, self.patch_shape_vox, self.voxel_size_um, "context_um",
                              self.context_edges)

    @property
    def views(self) -> int:
        """Input channels the model takes: 1 (the patch) or 2 (the patch and its context view)."""
        return 1 if self.context_um is None else 2

    @property
    def spot_radius_vox(self) -> float:
        """The spot radius in in-plane (x) model voxels."""
        return float(self.spot_radius_um) / float(self.voxel_size_um[2])

    def with_model(self, **model: Any) -> "InputSpec":
        """A copy recording the model (class, family, dense geometry)."""
        return replace(self, model={**self.model, **model})

    def prepare_context(self, volume: Any) -> tuple[Any, Quantised]:
        """As :meth:`prepare`, for the context view: ``volume`` normalised on the model's voxels and
        low-pass filtered for the view's step (a :class:`~xpression.data.patches.ResampledVolume`;
        the view is every ``context.stride``-th voxel of it), and the quantisation alone."""
        context = self.context
        if context is None:
            raise ValueError("this model has no context view")
        view = ResampledVolume(context.source(volume), self.voxel_size_um, self.intensity.transform_for(volume),
                               low_pass_um=context.step_um)
        return view, Quantised(None, self.quantisation)

    def prepare(self, volume: Any) -> tuple[Any, Quantised]:
        """``volume`` as the sweep must read it, and the normaliser of its blocks: at the model's
        voxel size the volume itself and ``Quantised(transform)`` of its raw blocks; at another
        voxel size a :class:`~xpression.data.patches.ResampledVolume` (normalised, resampled)
        and the quantisation alone. Either way a block equals training patches bit for bit."""
        transform = self.intensity.transform_for(volume)
        if same_voxel_size(volume.voxel_size_um, self.voxel_size_um):
            return volume, Quantised(transform, self.quantisation)
        return ResampledVolume(volume, self.voxel_size_um, transform), Quantised(None, self.quantisation)

    # -- storage -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain python (numpy arrays for the reference histogram) for a checkpoint."""
        d = {"version": self.version, "patch_size_um": list(self.patch_size_um), "voxel_size_um": list(self.voxel_size_um),
             "patch_shape_vox": list(self.patch_shape_vox), "spot_radius_um": float(self.spot_radius_um),
             "intensity": self.intensity.to_dict(), "quantisation": self.quantisation, "targets": dict(self.targets),
             "model": dict(self.model)}
        if self.context is not None:
            d["context_um"] = list(self.context_um)  # type: ignore[arg-type]
            d["context_edges"] = self.context_edges
            d["context"] = self.context.to_dict()  # derived, for readers; from_dict recomputes it
        return d

    def describe(self) -> dict:
        """JSON-able summary for map metadata."""
        return {**self.to_dict(), "intensity": self.intensity.describe()}

    @classmethod
    def from_dict(cls, d: dict, where: object = None) -> "InputSpec":
        """The spec of a checkpoint's dict; a clear :class:`DataError` if it is not one."""
        try:
            version = int(d.get("version", 0))
            if version > INPUT_SPEC_VERSION:
                raise ValueError(f"input spec version {version} is newer than this X-Pression reads ({INPUT_SPEC_VERSION})")
            return cls(patch_size_um=_triple(d["patch_size_um"]), voxel_size_um=_triple(d["voxel_size_um"]),
                       patch_shape_vox=tuple(int(s) for s in d["patch_shape_vox"]),  # type: ignore[arg-type]
                       spot_radius_um=float(d["spot_radius_um"]), intensity=IntensitySpec.from_dict(d["intensity"]),
                       quantisation=str(d["quantisation"]), targets=dict(d["targets"]), model=dict(d.get("model") or {}),
                       version=version, context_um=None if d.get("context_um") is None else _triple(d["context_um"]),
                       context_edges=str(d.get("context_edges", "fill")))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(where, f"invalid input spec ({type(err).__name__}: {err})") from err

    @classmethod
    def build(cls, patch_size_um: Sequence[float], voxel_size_um: Sequence[float], patch_shape_vox: Sequence[int],
              spot_radius_um: float, intensity: IntensitySpec, quantisation: str, targets: Any,
              context_um: Sequence[float] | None = None, context_edges: str = "mirror") -> "InputSpec":
        """A spec from the data module's values; ``targets``: a ``TargetSpec`` (or its dict);
        ``context_um``: the context view's field of view (z, y, x) um of a multi-scale model;
        ``context_edges``: what it sees past the volume's faces (``mirror`` or ``fill``)."""
        t = targets if isinstance(targets, dict) else targets.to_dict()
        version = 1 if context_um is None else (3 if context_edges == "mirror" else 2)
        return cls(_triple(patch_size_um), _triple(voxel_size_um), tuple(int(s) for s in patch_shape_vox),  # type: ignore[arg-type]
                   float(spot_radius_um), intensity, str(quantisation), t, version=version,
                   context_um=None if context_um is None else _triple(context_um), context_edges=str(context_edges))


def resolve_reference(reference: str | None, cohort: Any) -> tuple[Any, str] | None:
    """The opened intensity reference (a volume id of ``cohort`` or a volume file) and its name."""
    if reference is None:
        return None
    ids = [v.id for v in cohort.volumes] if cohort is not None else []
    if reference in ids:
        entry = cohort.volume(reference)
        return open_volume(entry.image, entry.voxel_size_um), str(reference)
    if Path(str(reference)).exists():
        return open_volume(reference), str(reference)
    raise DataError(getattr(cohort, "path", reference),
                    f"intensity_reference {reference!r} is neither a volume id ({ids}) nor a volume file")

"""Accuracy away from the trained plane, on probe points scored against a phantom's truth.

A full-volume sweep per training run is too slow for per-patch models on a CPU, so a run is
scored on a fixed random set of tissue points instead:

- planes at ``distances_um`` (um) above and below each trained axial section (both sides
  pooled, where the patch still fits in the volume);
- a few axial planes through every volume that has no training section ("other volumes").

Each point gets one per-patch forward on a patch cut from the volume with the run's own
intensity normalisation (the data module's per-volume normalisers, quantised as the training
cache was; other volumes get the same transform the sweep would give them), and is compared with the *spot-averaged* truth: the programs the phantom gives
for a Visium spot centred there (55 um disk x section thickness), the same quantity the
training targets are. Scores are Pearson r per target over the pooled points, averaged over
the targets (``regression_metrics``'s ``pearson_mean``).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from xpression.evaluation.metrics import regression_metrics

__all__ = ["OffPlaneProbe", "evaluate_off_plane", "probe_points"]

log = logging.getLogger(__name__)


@dataclass
class OffPlaneProbe:
    """Probe settings. ``n_points``: points per plane set (per distance, per other volume);
    ``distances_um``: plane distances from the trained section (um); ``other_planes``: axial
    planes per other volume; ``seed``: point draws (fixed, so every run sees the same points
    for the same cohort and section); ``batch_size``: patches per forward."""

    n_points: int = 300
    distances_um: Sequence[float] = field(default_factory=lambda: (100.0, 200.0, 300.0))
    other_planes: int = 3
    seed: int = 0
    batch_size: int = 128


def probe_points(mask: Any, z_um: float, lo_um: np.ndarray, hi_um: np.ndarray, n: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` points ``(N, 3)`` (z, y, x) um on the plane ``z = z_um`` with (y, x) uniform
    in ``[lo_um, hi_um]`` and inside the tissue ``mask``."""
    out = np.empty((0, 3))
    for _ in range(20):
        yx = rng.uniform(lo_um, hi_um, size=(4 * n, 2))
        pts = np.column_stack([np.full(len(yx), z_um), yx])
        out = np.concatenate([out, pts[mask.contains(pts)]])
        if len(out) >= n:
            break
    return out[:n]


class _VolumeReader:
    """Normalised patches of one volume at the model voxel size, one slab read per plane."""

    def __init__(self, volume: Any, normalize: Any, quantise: bool, patch_shape: Sequence[int]):
        self.volume, self.normalize, self.quantise = volume, normalize, quantise
        self.half = np.asarray(patch_shape, int) // 2
        self.shape = np.asarray(volume.shape, int)
        self.voxel = np.asarray(volume.voxel_size_um, float)
        self.origin = np.asarray(getattr(volume, "origin_um", (0.0, 0.0, 0.0)), float)

    def z_range_um(self) -> tuple[float, float]:
        """Plane positions (um) whose patch depth fits in the volume."""
        lo, hi = self.half[0], self.shape[0] - 1 - self.half[0]
        return float(self.origin[0] + lo * self.voxel[0]), float(self.origin[0] + hi * self.voxel[0])

    def yx_range_um(self) -> tuple[np.ndarray, np.ndarray]:
        """In-plane (y, x) bounds (um) of patch centres whose patch fits in the volume."""
        lo = self.origin[1:] + self.half[1:] * self.voxel[1:]
        hi = self.origin[1:] + (self.shape[1:] - 1 - self.half[1:]) * self.voxel[1:]
        return lo, hi

    def patches(self, points_um: np.ndarray) -> np.ndarray:
        """``(N, D, H, W)`` float32 patches centred on points of one axial plane."""
        idx = np.rint((points_um - self.origin) / self.voxel).astype(int)
        iz = int(idx[0, 0])
        hd, hh, hw = self.half
        slab = self.volume.read_block((iz - hd, 0, 0), (iz + hd + 1, int(self.shape[1]), int(self.shape[2])))
        slab = self.normalize(slab)
        if self.quantise:
            slab = np.rint(slab * 255.0) * np.float32(1 / 255.0)
        return np.stack([slab[:, y - hh : y + hh + 1, x - hw : x + hw + 1] for _, y, x in idx]).astype(np.float32)


def _predictor(model: Any) -> Any:
    """The model as a per-patch predictor on the device its weights are on (float32)."""
    if hasattr(model, "predict_patches"):
        return model
    from xpression.inference.predictor import Predictor

    weights = next(iter(model.parameters()), None)
    device = weights.device if weights is not None else "cpu"
    return Predictor(model, device=device, precision="fp32")


def _predict(predictor: Any, patches: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([predictor.predict_patches(patches[i : i + batch_size])
                           for i in range(0, len(patches), batch_size)])


def evaluate_off_plane(model: Any, datamodule: Any, probe: OffPlaneProbe | dict | None = None) -> dict[str, Any]:
    """Pearson r (mean over targets that are truth programs) at each distance from the trained
    sections and on volumes without a training section.

    Returns ``{"<distance_um>": r, ..., "other_volumes": r, "n_points": {...}, "truth": ...}``;
    an empty dict when the cohort has no truth spec or no target is a truth program.
    """
    from xpression.data.datamodule import volume_intensity_transform
    from xpression.data.manifest import Cohort, load_manifest
    from xpression.data.mask import tissue_mask
    from xpression.data.volume import open_volume
    from xpression.inference.resample import ResampledVolume
    from xpression.phantom import Phantom

    probe = probe if isinstance(probe, OffPlaneProbe) else OffPlaneProbe(**dict(probe or {}))
    cohort = datamodule.manifest if isinstance(datamodule.manifest, Cohort) else load_manifest(datamodule.manifest)
    if cohort.truth is None or not cohort.truth.spec:
        log.info("off-plane evaluation skipped: the cohort has no truth spec")
        return {}
    phantom = Phantom.from_spec(cohort.truth.spec)
    names = [n for n in datamodule.target_spec.names if n in phantom.program_names]
    if not names:
        log.info("off-plane evaluation skipped: no target is a truth program")
        return {}
    cols = [list(datamodule.target_spec.names).index(n) for n in names]
    prog = [phantom.program_names.index(n) for n in names]
    kind = datamodule.target_spec.kind
    datamodule.setup("predict")
    trained = set(datamodule.spots["section_id"])
    model_vs = np.asarray(datamodule.voxel_size_um, float)
    quantise = getattr(datamodule, "cache_dtype", "uint8") == "uint8"
    predictor = _predictor(model)
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    for ventry in cohort.volumes:
        volume = open_volume(ventry.image, ventry.voxel_size_um)
        norm = datamodule.normalizers.get(ventry.id) or volume_intensity_transform(
            volume, cohort, getattr(datamodule, "intensity_reference", None), seed=datamodule.seed)
        view = volume if np.allclose(volume.voxel_size_um, model_vs, rtol=1e-3) else ResampledVolume(volume, model_vs)
        reader = _VolumeReader(view, norm, quantise, datamodule.patch_shape_vox)
        mask = tissue_mask(volume)
        zlo, zhi = reader.z_range_um()
        ylo, yhi = reader.yx_range_um()
        sections = [s for s in ventry.sections if s.id in trained]
        if sections:
            planes = {}
            for s in sections:
                if not s.is_axial:
                    log.info("off-plane evaluation: section %s is tilted, skipped", s.id)
                    continue
                for d in probe.distances_um:
                    planes.setdefault(f"{float(d):g}", []).extend(z for z in (s.z_um - d, s.z_um + d) if zlo <= z <= zhi)
        else:
            planes = {"other_volumes": list(np.linspace(zlo, zhi, probe.other_planes + 2)[1:-1])}
        for key, zs in planes.items():
            for k, z in enumerate(zs):
                rng = np.random.default_rng([probe.seed, zlib.crc32(ventry.id.encode()), int(round(z * 10))])
                pts = probe_points(mask, z, ylo, yhi, max(probe.n_points // len(zs), 1), rng)
                if len(pts) == 0:
                    continue
                pred = _predict(predictor, reader.patches(pts), probe.batch_size)[:, cols]
                truth = phantom.spot_programs(ventry.id, pts[:, 1:], z)[:, prog]
                pooled.setdefault(key, []).append((pred, truth))

    result: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for key, pairs in pooled.items():
        pred, truth = (np.concatenate(a) for a in zip(*pairs))
        result[key] = regression_metrics(pred, truth, names, kind=kind)["pearson_mean"]
        counts[key] = int(len(pred))
    result["n_points"] = counts
    result["truth"] = "spot-averaged phantom programs (spot disk x section thickness) at each probe point"
    return result

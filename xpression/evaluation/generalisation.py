"""Accuracy away from the trained plane, on one probe set per cohort scored against the truth.

A full-volume sweep per training run is too slow for per-patch models on a CPU, so a run is
scored on a fixed random set of tissue points instead (``probe_set``):

- axial planes at ``distances_um`` above and below each trained axial section (both sides
  pooled per volume);
- ``other_planes`` axial planes through every volume that has no training section.

The set depends on the cohort, the trained sections and the probe settings only, never on the
run's patch: it is drawn so that the *largest* patch of any row compared on it
(``max_patch_um``, depth x height x width um) fits in the volume, and every row of a benchmark
is scored on the same points. Distances closer than that patch depth are not probed (their
patches would read CT slices that training patches of the section also read) and neither is a
plane closer than that depth to any trained section of its volume; ``excluded`` lists them.

Each point gets one per-patch forward on a patch read by the training patch path
(``xpression.data.patches.read_patches``: the run's model voxels, its per-volume intensity
normalisation, quantised as the training cache was; other volumes get the transform the sweep
would give them) and is compared with
the *spot-averaged* truth: the programs the phantom gives for a Visium spot centred there (55 um
disk x section thickness), the same quantity the training targets are. Beside the model, the
baselines without CT (``xpression.evaluation.baselines``, from the run's training spots) and,
when given, the features + ridge baseline on the run's own patch are scored on the same points.
Scores are per volume (``xpression.evaluation.scores`` rows), never pooled.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from xpression.data.geometry import Plane
from xpression.data.manifest import Cohort, load_manifest
from xpression.data.mask import tissue_mask
from xpression.data.patches import dequantise, read_patches
from xpression.data.volume import open_volume
from xpression.evaluation.baselines import KNN_K, TrainingSpots, baseline_predictions
from xpression.evaluation.scores import score_rows
from xpression.inference.predictor import Predictor
from xpression.phantom import Phantom

__all__ = ["OffPlaneProbe", "ProbePlane", "evaluate_off_plane", "probe_digest", "probe_points", "probe_set"]

log = logging.getLogger(__name__)

DEFAULT_MAX_PATCH_UM = (134.4, 400.0, 400.0)


@dataclass
class OffPlaneProbe:
    """Probe settings. ``n_points``: points per plane set (per distance and trained section,
    both sides together; per other volume); ``distances_um``: plane distances from the trained
    section (um); ``other_planes``: axial planes per other volume; ``seed``: point draws;
    ``max_patch_um``: the largest patch (depth, height, width um) of any row scored on this
    set: points are drawn where it fits and distances below its depth are excluded;
    ``batch_size``: patches per forward."""

    n_points: int = 300
    distances_um: Sequence[float] = field(default_factory=lambda: (100.0, 150.0, 200.0, 250.0))
    other_planes: int = 3
    seed: int = 0
    max_patch_um: Sequence[float] = field(default_factory=lambda: DEFAULT_MAX_PATCH_UM)
    batch_size: int = 128

    @classmethod
    def of(cls, probe: "OffPlaneProbe | dict | None") -> "OffPlaneProbe":
        return probe if isinstance(probe, OffPlaneProbe) else cls(**dict(probe or {}))

    def check_patch(self, patch_shape_vox: Sequence[int], voxel_size_um: Sequence[float]) -> None:
        """A clear error when a run's patch does not fit in ``max_patch_um``: its span between
        the outer voxel centres, ``(n - 1) x voxel`` per axis, must not exceed it (then every
        probe patch lies in the volume and none shares a slice with a training patch)."""
        span = (np.asarray(patch_shape_vox, float) - 1) * np.asarray(voxel_size_um, float)
        if (span > np.asarray(self.max_patch_um, float) + 1e-6).any():
            raise ValueError(f"off_plane.max_patch_um {list(map(float, self.max_patch_um))} is smaller than this run's "
                             f"patch ({list(map(int, patch_shape_vox))} voxels of {list(map(float, voxel_size_um))} um, "
                             f"{[round(float(v), 1) for v in span]} um between outer voxel centres); raise it "
                             "(every run compared on one probe set must fit in it)")


@dataclass
class ProbePlane:
    """Probe points ``(N, 3)`` (z, y, x) um on one axial plane ``z_um`` of ``volume_id``;
    ``where`` is ``plane`` (``distance_um`` from a trained section) or ``volume`` (no
    training section in this volume; distance NaN)."""

    volume_id: str
    where: str
    distance_um: float
    z_um: float
    points_um: np.ndarray


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


def probe_set(cohort: Any, trained_sections: Sequence[str], probe: OffPlaneProbe | dict | None = None
              ) -> tuple[list[ProbePlane], list[str]]:
    """The probe planes of a cohort trained on ``trained_sections``, and notes on what was left
    out and why. Deterministic in (cohort, trained sections, probe settings)."""
    probe = OffPlaneProbe.of(probe)
    depth, height, width = (float(v) for v in probe.max_patch_um)
    trained = set(trained_sections)
    planes: list[ProbePlane] = []
    notes: list[str] = []
    close = sorted(float(d) for d in probe.distances_um if float(d) < depth)
    if close:
        notes.append(f"distances {', '.join(f'{d:g}' for d in close)} um not probed: closer than the deepest patch "
                     f"({depth:g} um), so probe patches would share CT slices with training patches")
    for ventry in cohort.volumes:
        volume = open_volume(ventry.image, ventry.voxel_size_um)
        vs = np.asarray(volume.voxel_size_um, float)
        origin = np.asarray(getattr(volume, "origin_um", (0.0, 0.0, 0.0)), float)
        far = origin + (np.asarray(volume.shape, float) - 1) * vs
        half = np.array([depth, height, width]) / 2
        lo, hi = origin + half, far - half
        sections = [s for s in ventry.sections if s.id in trained]
        for s in sections:
            if not s.is_axial:
                notes.append(f"{ventry.id}: trained section {s.id} is tilted; no probe planes around it")
        z_trained = [s.z_um for s in sections if s.is_axial]
        if sections:
            want = [(float(d), z) for s in sections if s.is_axial for d in probe.distances_um if float(d) >= depth
                    for z in (s.z_um - float(d), s.z_um + float(d))]
            by_distance: dict[float, list[float]] = {}
            for d, z in want:
                if not lo[0] <= z <= hi[0]:
                    continue
                if any(abs(z - t) < depth for t in z_trained):
                    notes.append(f"{ventry.id}: plane z={z:.1f} um ({d:g} um from a trained section) is closer than "
                                 f"{depth:g} um to another trained section; not probed")
                    continue
                by_distance.setdefault(d, []).append(z)
            missing = sorted({float(d) for d in probe.distances_um if float(d) >= depth} - set(by_distance))
            if missing:
                notes.append(f"{ventry.id}: no plane at {', '.join(f'{d:g}' for d in missing)} um fits the "
                             f"{depth:g} um patch inside the volume")
            groups = [("plane", d, zs) for d, zs in sorted(by_distance.items())]
        else:
            groups = [("volume", float("nan"), list(np.linspace(lo[0], hi[0], probe.other_planes + 2)[1:-1]))]
        if not any(zs for _, _, zs in groups):
            continue
        mask = tissue_mask(volume)
        for where, d, zs in groups:
            for z in zs:
                rng = np.random.default_rng([int(probe.seed), zlib.crc32(ventry.id.encode()), int(round(z * 10))])
                pts = probe_points(mask, z, lo[1:], hi[1:], max(int(probe.n_points) // len(zs), 1), rng)
                if len(pts):
                    planes.append(ProbePlane(ventry.id, where, d, float(z), pts))
    return planes, notes


def _predictor(model: Any) -> Any:
    """The model as a per-patch predictor on the device its weights are on (float32)."""
    if hasattr(model, "predict_patches"):
        return model
    weights = next(iter(model.parameters()), None)
    device = weights.device if weights is not None else "cpu"
    return Predictor(model, device=device, precision="fp32")


def _predict(predictor: Any, patches: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([predictor.predict_patches(patches[i : i + batch_size])
                           for i in range(0, len(patches), batch_size)])


def probe_digest(planes: Sequence[ProbePlane]) -> str:
    """A short fingerprint of a probe set (volumes, places and points to 0.01 um): runs with the
    same digest were scored on the same points."""
    h = hashlib.sha1()
    for p in planes:
        h.update(f"{p.volume_id}|{p.where}|{p.distance_um:g}|".encode())
        h.update(np.round(np.asarray(p.points_um, float), 2).tobytes())
    return h.hexdigest()[:12]


def _spot_table(spots: pd.DataFrame, names: Sequence[str]) -> TrainingSpots:
    missing = [f"true/{n}" for n in names if f"true/{n}" not in spots]
    if missing:
        raise ValueError(f"the spot table lacks the label columns {missing} (pass predict_spots' table)")
    return TrainingSpots.from_table(spots, [f"true/{n}" for n in names])


def _points_table(volume_id: str, where: str, distance_um: float, xyz: np.ndarray, truth: np.ndarray,
                  preds: dict[str, np.ndarray], names: Sequence[str]) -> pd.DataFrame:
    """One row per probe point: where it is (``xyz``: z, y, x um), its truth and every predictor's answer."""
    cols: dict[str, Any] = {"volume_id": volume_id, "where": where, "distance_um": distance_um,
                            "z_um": xyz[:, 0], "y_um": xyz[:, 1], "x_um": xyz[:, 2]}
    for key, values in {"true": truth, **preds}.items():
        cols.update({f"{key}/{n}": values[:, j] for j, n in enumerate(names)})
    return pd.DataFrame(cols)


def evaluate_off_plane(model: Any, datamodule: Any, spots: pd.DataFrame, probe: OffPlaneProbe | dict | None = None,
                       ridge: Any = None, k: int = KNN_K) -> dict[str, Any]:
    """Score ``model`` (and ``ridge``, a fitted per-patch baseline, if given) and the baselines
    without CT on the cohort's probe set, per volume and distance.

    ``spots``: the run's spot table with ``split`` and ``true/<target>`` labels (the training
    rows feed the baselines). Returns ``{"scores": [score rows], "n_points": {...},
    "excluded": [notes], "digest": probe_digest, "probe": settings, "truth": ...,
    "points": a DataFrame, one row per probe point with its place, truth and predictions}``; an empty
    dict when the cohort has no truth spec or no target is a truth program.
    """
    probe = OffPlaneProbe.of(probe)
    cohort = datamodule.manifest if isinstance(datamodule.manifest, Cohort) else load_manifest(datamodule.manifest)
    if cohort.truth is None or not cohort.truth.spec:
        log.info("off-plane evaluation skipped: the cohort has no truth spec")
        return {}
    phantom = Phantom.from_spec(cohort.truth.spec)
    spec = datamodule.target_spec  # fitted programs are scored as the truth program they were matched to
    cols = [j for j, n in enumerate(spec.names) if spec.reference_name(n) in phantom.program_names]
    if not cols:
        log.info("off-plane evaluation skipped: no target is (or was matched to) a truth program")
        return {}
    prog = [phantom.program_names.index(spec.reference_name(spec.names[j])) for j in cols]
    names = [phantom.program_names[i] for i in prog]
    kind = spec.kind
    model_vs = np.asarray(datamodule.voxel_size_um, float)
    probe.check_patch(datamodule.patch_shape_vox, model_vs)
    train = _spot_table(spots, spec.names)
    section = TrainingSpots.from_table(spots, [f"true/{n}" for n in spec.names], split=None)
    datamodule.setup("predict")
    planes, notes = probe_set(cohort, sorted(set(datamodule.spots["section_id"])), probe)
    predictor = _predictor(model)
    pooled: dict[tuple[str, str, float], list[dict[str, np.ndarray]]] = {}
    for ventry in cohort.volumes:
        mine = [p for p in planes if p.volume_id == ventry.id]
        if not mine:
            continue
        volume = open_volume(ventry.image, ventry.voxel_size_um)
        norm = datamodule.normalizers.get(ventry.id) or datamodule.intensity_spec.transform_for(volume)
        for plane in mine:
            # the training patch path: the model's voxels, normalised and rounded as the cache was
            uv = plane.points_um[:, [2, 1]]
            patches = read_patches(volume, Plane.axial(plane.z_um), uv, datamodule.patch_shape_vox,
                                   model_vs, norm, datamodule.cache_dtype, stored=True)  # the predictors dequantise
            views = patches
            if datamodule.context is not None:  # a multi-scale model: the patch, then its context view
                views = np.stack([dequantise(patches),
                                  datamodule.context.read(volume, Plane.axial(plane.z_um), uv, norm, datamodule.cache_dtype)], axis=1)
            preds = {"model": _predict(predictor, views, probe.batch_size)[:, cols]}
            if ridge is not None:
                preds["ridge"] = _predict(ridge, patches, probe.batch_size)[:, cols]
            preds.update({b: v[:, cols] for b, v in baseline_predictions(train, ventry.id, plane.points_um, k, section).items()})
            preds["truth"] = phantom.spot_programs(ventry.id, plane.points_um[:, 1:], plane.z_um)[:, prog]
            preds["points_um"] = plane.points_um
            pooled.setdefault((ventry.id, plane.where, plane.distance_um), []).append(preds)

    conditions = {v.id: v.condition for v in cohort.volumes}
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    tables: list[pd.DataFrame] = []
    for (vid, where, d), parts in pooled.items():
        joined = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        truth, xyz = joined.pop("truth"), joined.pop("points_um")
        rows += score_rows(joined, truth, names, kind, volume_id=vid, condition=conditions.get(vid), where=where, distance_um=d)
        counts[f"{vid} {'volume' if where == 'volume' else f'{d:g} um'}"] = int(len(truth))
        tables.append(_points_table(vid, where, d, xyz, truth, joined, names))
    return {"scores": rows, "n_points": counts, "excluded": notes, "digest": probe_digest(planes),
            "points": pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(),
            "probe": {**asdict(probe), "max_patch_um": list(probe.max_patch_um), "distances_um": list(probe.distances_um)},
            "truth": "spot-averaged phantom programs (spot disk x section thickness) at each probe point"}

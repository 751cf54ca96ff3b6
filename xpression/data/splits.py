"""Which spots train, validate and test.

Each split config (Hydra ``_target_``) has ``assign(spots, planes, patch_size_um, seed)``
returning one label per spot-table row: ``train``, ``val``, ``test`` or ``excluded`` (a
training spot whose patch would overlap a held-out patch). ``spots`` needs the columns
``section_id``, ``volume_id``, ``u_um``, ``v_um``, ``z_um``, ``y_um``, ``x_um``, ``dominant``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from xpression.data.geometry import DataError, Plane, count_patch_overlaps, patch_boxes_overlap

__all__ = ["SpatialBlocksSplit", "StratifiedRandomSplit", "LeaveSectionOut", "VolumesSplit", "check_split_counts", "patch_overlap", "SPLITS"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _points_axes(spots: pd.DataFrame, planes: Mapping[str, Plane]) -> tuple[np.ndarray, np.ndarray]:
    pts = spots[["z_um", "y_um", "x_um"]].to_numpy(float)
    axes = np.stack([planes[s].axes for s in spots["section_id"]]) if len(spots) else np.zeros((0, 3, 3))
    return pts, axes


def patch_overlap(
    spots_a: pd.DataFrame, spots_b: pd.DataFrame, planes: Mapping[str, Plane], patch_size_um: Sequence[float]
) -> int:
    """Number of (a, b) spot pairs whose patch boxes (``patch_size_um`` along each section's
    (n, v, u)) intersect with positive volume; only spots of the same volume can overlap."""
    pa, xa = _points_axes(spots_a, planes)
    pb, xb = _points_axes(spots_b, planes)
    return count_patch_overlaps(pa, xa, pb, xb, patch_size_um, spots_a["volume_id"].to_numpy(), spots_b["volume_id"].to_numpy())


def _exclude_overlapping(labels: np.ndarray, spots: pd.DataFrame, planes: Mapping[str, Plane], patch_size_um: Sequence[float]) -> np.ndarray:
    """Mark training spots whose patch intersects any val/test patch as ``excluded``."""
    from scipy.spatial import cKDTree

    train = np.flatnonzero(labels == "train")
    held = np.flatnonzero(np.isin(labels, ("val", "test")))
    if len(train) == 0 or len(held) == 0:
        return labels
    pts, axes = _points_axes(spots, planes)
    vol = spots["volume_id"].to_numpy()
    half = np.asarray(patch_size_um, float) / 2
    hits = cKDTree(pts[held]).query_ball_point(pts[train], r=2 * float(np.linalg.norm(half)))
    out = labels.copy()
    for i, near in zip(train, hits):
        near = [held[j] for j in near if vol[held[j]] == vol[i]]
        for j in near:
            if patch_boxes_overlap(pts[i], axes[i], pts[j][None], axes[j], half)[0]:
                out[i] = "excluded"
                break
    return out


def _assign_groups(sizes: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Assign groups (of ``sizes`` spots) to splits, greedily matching the spot fractions."""
    frac = np.asarray(fractions, float) / np.sum(fractions)
    order = rng.permutation(len(sizes))
    got = np.zeros(3)
    out = np.empty(len(sizes), dtype=object)
    # Seed each non-empty held-out split with one group first so none ends up empty.
    for pos, k in zip(order, [k for k in (1, 2) if frac[k] > 0][: max(len(sizes) - 1, 0)]):
        out[pos], got[k] = SPLITS[k], got[k] + sizes[pos]
    for pos in order:
        if out[pos] is not None:
            continue
        deficit = frac * (got.sum() + sizes[pos]) - got
        deficit[frac == 0] = -np.inf
        k = int(np.argmax(deficit))
        out[pos], got[k] = SPLITS[k], got[k] + sizes[pos]
    return out


@dataclass
class SpatialBlocksSplit:
    """Square blocks of ``block_um`` in each section plane, whole blocks to train/val/test.

    ``fractions`` (train, val, test) are matched greedily by spot count. Training spots within
    ``buffer_um`` (default: the patch width) of a held-out block's edge are excluded, and so is
    any other training spot whose patch still intersects a held-out patch (e.g. from a nearby
    section), so no training patch overlaps a validation or test patch.
    """

    block_um: float = 600.0
    fractions: Sequence[float] = (0.7, 0.15, 0.15)
    buffer_um: float | None = None

    def assign(self, spots: pd.DataFrame, planes: Mapping[str, Plane], patch_size_um: Sequence[float], seed: int) -> np.ndarray:
        uv = spots[["u_um", "v_um"]].to_numpy(float)
        cell = np.floor(uv / float(self.block_um)).astype(np.int64)
        keys = pd.MultiIndex.from_arrays([spots["section_id"].to_numpy(), cell[:, 0], cell[:, 1]])
        block_id, uniques = pd.factorize(keys)
        sizes = np.bincount(block_id, minlength=len(uniques))
        block_split = _assign_groups(sizes, self.fractions, np.random.default_rng([seed, 11]))
        labels = block_split[block_id].astype(object)
        buffer = float(max(patch_size_um[1], patch_size_um[2]) if self.buffer_um is None else self.buffer_um)
        labels = self._buffer(labels, spots, cell, block_split, uniques, buffer)
        labels = _exclude_overlapping(labels, spots, planes, patch_size_um)
        _log_counts("spatial_blocks", labels)
        return labels.astype(str)

    def _buffer(self, labels, spots, cell, block_split, uniques, buffer):
        b = float(self.block_um)
        held = [(s, cu, cv) for (s, cu, cv), lab in zip(uniques, block_split) if lab != "train"]
        out = labels.copy()
        sec = spots["section_id"].to_numpy()
        uv = spots[["u_um", "v_um"]].to_numpy(float)
        for s, cu, cv in held:
            rows = np.flatnonzero((sec == s) & (out == "train"))
            lo = np.array([cu * b, cv * b])
            # Chebyshev distance from each spot to the block square (patches are squares in-plane).
            gap = np.maximum(np.maximum(lo - uv[rows], uv[rows] - (lo + b)), 0).max(axis=1)
            out[rows[gap < buffer]] = "excluded"
        return out


@dataclass
class StratifiedRandomSplit:
    """The published split: random by spot, stratified on the dominant program
    (80 / 14 / 6 %). Neighbouring patches overlap across splits, so test scores are optimistic."""

    fractions: Sequence[float] = (0.8, 0.14, 0.06)

    def assign(self, spots: pd.DataFrame, planes: Mapping[str, Plane], patch_size_um: Sequence[float], seed: int) -> np.ndarray:
        log.warning("stratified_random split: training patches overlap validation/test patches (leaks image context)")
        rng = np.random.default_rng([seed, 12])
        frac = np.asarray(self.fractions, float) / np.sum(self.fractions)
        labels = np.empty(len(spots), dtype=object)
        for cls in np.unique(spots["dominant"].to_numpy()):
            rows = np.flatnonzero(spots["dominant"].to_numpy() == cls)
            rows = rows[rng.permutation(len(rows))]
            cuts = np.rint(np.cumsum(frac)[:2] * len(rows)).astype(int)
            for k, part in enumerate(np.split(rows, cuts)):
                labels[part] = SPLITS[k]
        _log_counts("stratified_random", labels)
        return labels.astype(str)


def _held_out_by(column: str, spots: pd.DataFrame, val: Sequence[str], test: Sequence[str], inner: SpatialBlocksSplit, planes, patch_size_um, seed) -> np.ndarray:
    ids = spots[column].to_numpy().astype(str)
    known = set(ids)
    unknown = [x for x in list(val) + list(test) if x not in known]
    if unknown:
        raise DataError(None, f"split: unknown {column} {unknown}; available: {sorted(known)}")
    labels = np.full(len(spots), "train", dtype=object)
    labels[np.isin(ids, list(test))] = "test"
    labels[np.isin(ids, list(val))] = "val"
    train = labels == "train"
    if not train.any():
        raise DataError(None, f"split: every {column} is held out; nothing left to train on")
    if not val:
        # No held-out group for validation: carve spatial blocks out of the training groups.
        sub = inner.assign(spots[train].reset_index(drop=True), planes, patch_size_um, seed)
        labels[np.flatnonzero(train)] = np.where(sub == "test", "val", sub)
    labels = _exclude_overlapping(labels, spots, planes, patch_size_um)
    _log_counts(f"held out by {column}", labels)
    return labels.astype(str)


@dataclass
class LeaveSectionOut:
    """Hold out whole sections: ``test_sections`` (and ``val_sections``); without
    ``val_sections``, validation is ``val_fraction`` of the training sections in spatial blocks."""

    test_sections: Sequence[str] = ()
    val_sections: Sequence[str] = ()
    val_fraction: float = 0.15
    block_um: float = 600.0

    def assign(self, spots: pd.DataFrame, planes: Mapping[str, Plane], patch_size_um: Sequence[float], seed: int) -> np.ndarray:
        inner = SpatialBlocksSplit(self.block_um, (1 - self.val_fraction, 0.0, self.val_fraction))
        test = list(self.test_sections) or [sorted(spots["section_id"].unique())[-1]]
        return _held_out_by("section_id", spots, list(self.val_sections), test, inner, planes, patch_size_um, seed)


@dataclass
class VolumesSplit:
    """Train on some volumes' sections, test on others (``test_volumes``, optional
    ``val_volumes``; otherwise validation is carved from the training volumes in blocks)."""

    test_volumes: Sequence[str] = ()
    val_volumes: Sequence[str] = ()
    val_fraction: float = 0.15
    block_um: float = 600.0

    def assign(self, spots: pd.DataFrame, planes: Mapping[str, Plane], patch_size_um: Sequence[float], seed: int) -> np.ndarray:
        inner = SpatialBlocksSplit(self.block_um, (1 - self.val_fraction, 0.0, self.val_fraction))
        test = list(self.test_volumes) or [sorted(spots["volume_id"].unique())[-1]]
        return _held_out_by("volume_id", spots, list(self.val_volumes), test, inner, planes, patch_size_um, seed)


FEW_TRAINING_SPOTS = 30  # fewer are warned about (a section holds hundreds of Visium spots)


def check_split_counts(labels: Sequence[str], split: object) -> dict[str, int]:
    """Spots per split; raise :class:`DataError` before any training when one that a run needs
    is empty: training spots, validation spots (checkpoint selection and early stopping monitor
    them) and test spots (the held-out scores), unless the split's test fraction is 0 on purpose."""
    labels = np.asarray(labels).astype(str)
    counts = {name: int((labels == name).sum()) for name in (*SPLITS, "excluded")}
    fractions = getattr(split, "fractions", None)
    test_optional = fractions is not None and len(fractions) == 3 and float(fractions[2]) == 0.0
    empty = [name for name in SPLITS if counts[name] == 0 and not (name == "test" and test_optional)]
    if empty:
        hint = ("the sections hold too few blocks of split.block_um to share out: lower split.block_um or "
                "train on more sections (data.sections)") if hasattr(split, "block_um") else \
            "change the split's settings or train on more sections (data.sections)"
        found = ", ".join(f"{name} {n}" for name, n in counts.items())
        raise DataError(None, f"the {type(split).__name__} split leaves no {' and no '.join(empty)} spots ({found}); {hint}")
    if counts["train"] < FEW_TRAINING_SPOTS:
        log.warning("the %s split leaves %d training spots (%s): a model fitted on so few is a rough one, and its "
                    "features' spread (the ood score's unit) is barely estimated; lower split.block_um or "
                    "split.buffer_um, or train on more sections (data.sections)", type(split).__name__, counts["train"],
                    ", ".join(f"{name} {n}" for name, n in counts.items()))
    return counts


def _log_counts(name: str, labels: np.ndarray) -> None:
    counts = pd.Series(labels).value_counts().to_dict()
    log.info("%s split: %s", name, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

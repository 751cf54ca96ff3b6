"""Which training spots a model sees each epoch, and where exactly its patch is centred.

Sampler configs (Hydra ``_target_``) also carry the patch geometry in um and the model voxel
size, since both decide what a drawn patch looks like. ``build()`` returns a
:class:`SpotEpochSampler` (a ``torch.utils.data.Sampler``) that yields spot-table rows,
``(row, du_um, dv_um)`` tuples when patches are jittered in the section plane, or
``(row, du_um, dv_um, transform)`` when draws carry a fixed symmetry (an index into
``augment.TRANSFORM_NAMES``; 0 = identity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch.utils.data

from xpression.data.augment import TRANSFORM_NAMES, TRANSFORMS
from xpression.data.geometry import PAPER_PATCH_UM, PatchGeometry

__all__ = ["SpotSampler", "StratifiedSampler", "JitterSampler", "SpotEpochSampler", "stratified_extra_draws",
           "copy_transform_plan", "PAPER_COPY_TRANSFORMS"]

# Every non-identity in-plane symmetry of the square plus the z flip: the pool the original
# study's oversampled copies were drawn from, a distinct one per copy.
PAPER_COPY_TRANSFORMS = ("rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270", "zflip")


class SpotEpochSampler(torch.utils.data.Sampler):
    """Each row ``1 + extra[i]`` times per epoch, shuffled; optional in-plane jitter (um).

    ``copy_transforms`` (rows x max extra, indices into ``TRANSFORM_NAMES``): the fixed symmetry
    of each extra copy of a row; the first draw of a row is then the untransformed original.
    Deterministic: epoch ``e`` uses ``numpy.random.default_rng([seed, e])``. Lightning calls
    ``set_epoch``; without it the epoch counter advances on every pass.
    """

    def __init__(self, rows: np.ndarray, extra: np.ndarray | None = None, jitter_um: np.ndarray | None = None, seed: int = 0, shuffle: bool = True,
                 copy_transforms: np.ndarray | None = None):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.extra = np.zeros(len(self.rows), np.int64) if extra is None else np.asarray(extra, np.int64)
        self.jitter_um = None if jitter_um is None else np.broadcast_to(np.asarray(jitter_um, float), self.rows.shape)
        self.copy_transforms = None if copy_transforms is None else np.asarray(copy_transforms, np.int64).reshape(len(self.rows), -1)
        if self.copy_transforms is not None and self.copy_transforms.shape[1] < self.extra.max(initial=0):
            raise ValueError(f"copy_transforms has {self.copy_transforms.shape[1]} columns for up to {self.extra.max()} copies")
        self.seed, self.shuffle, self.epoch = int(seed), shuffle, 0
        self._epoch_set = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = int(epoch), True

    def __len__(self) -> int:
        return int(len(self.rows) + self.extra.sum())

    def draws(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Rows drawn in ``epoch``, (if jittering) their (du, dv) shifts in um and (with
        ``copy_transforms``) each draw's symmetry index (0 for the original)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        pos = np.repeat(np.arange(len(self.rows)), 1 + self.extra)
        transforms = None
        if self.copy_transforms is not None:
            copy = np.arange(len(pos)) - np.repeat(np.cumsum(1 + self.extra) - (1 + self.extra), 1 + self.extra)
            transforms = np.zeros(len(pos), np.int64)
            transforms[copy > 0] = self.copy_transforms[pos[copy > 0], copy[copy > 0] - 1]
        if self.shuffle:
            order = rng.permutation(len(pos))
            pos = pos[order]
            transforms = None if transforms is None else transforms[order]
        if self.jitter_um is None:
            return self.rows[pos], None, transforms
        r = self.jitter_um[pos] * np.sqrt(rng.random(len(pos)))
        t = 2 * np.pi * rng.random(len(pos))
        return self.rows[pos], np.stack([r * np.cos(t), r * np.sin(t)], axis=1), transforms

    def __iter__(self) -> Iterator:
        rows, shifts, transforms = self.draws(self.epoch)
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        if transforms is not None:
            shifts = np.zeros((len(rows), 2)) if shifts is None else shifts
            yield from ((int(r), float(s[0]), float(s[1]), int(k)) for r, s, k in zip(rows, shifts, transforms))
        elif shifts is None:
            yield from (int(r) for r in rows)
        else:
            yield from ((int(r), float(s[0]), float(s[1])) for r, s in zip(rows, shifts))


def copy_transform_plan(extra: np.ndarray, names: Sequence[str], seed: int) -> np.ndarray:
    """For each row, ``extra[i]`` distinct symmetries drawn from ``names`` (indices into
    ``TRANSFORM_NAMES``, rows x max extra); fixed for the run, like copies written to disk once."""
    extra = np.asarray(extra, np.int64)
    codes = np.array([TRANSFORM_NAMES.index(n) for n in names], np.int64)
    width = int(extra.max(initial=0))
    if width > len(codes):
        raise ValueError(f"{width} extra copies per spot but only {len(codes)} distinct copy transforms {list(names)}")
    rng = np.random.default_rng([int(seed), 5])
    plan = np.zeros((len(extra), width), np.int64)
    for i, n in enumerate(extra):
        plan[i, :n] = codes[rng.choice(len(codes), size=int(n), replace=False)]
    return plan


def stratified_extra_draws(labels: np.ndarray, cap: int = 4) -> np.ndarray:
    """Extra draws per spot: ``min(cap, round(n_max / n_class) - 1)`` for its dominant class."""
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    per_class = np.clip(np.rint(counts.max() / counts).astype(np.int64) - 1, 0, int(cap))
    return per_class[inverse]


@dataclass
class SpotSampler:
    """Every training spot once per epoch, shuffled.

    ``patch_size_um`` = (depth, height, width) um of the field of view; ``voxel_size_um`` the
    model's voxel size (z, y, x) or a scalar, None = the volume's; ``context_um``: the field of
    view (z, y, x) um of a multi-scale model's context view around the same centre
    (:class:`~xpression.data.context.ContextView`), None = the patch only; ``context_edges``: what
    that view sees past the volume's faces (``mirror`` or ``fill``).
    """

    patch_size_um: Sequence[float] = field(default_factory=lambda: list(PAPER_PATCH_UM))
    voxel_size_um: Sequence[float] | float | None = None
    context_um: Sequence[float] | None = None
    context_edges: str = "mirror"

    @property
    def geometry(self) -> PatchGeometry:
        return PatchGeometry(tuple(float(s) for s in self.patch_size_um))  # type: ignore[arg-type]

    @property
    def jitter_fraction(self) -> float:
        """Max in-plane shift as a fraction of the spot radius (0 = none)."""
        return 0.0

    def build(self, rows: np.ndarray, labels: np.ndarray, spot_radius_um: np.ndarray, seed: int) -> SpotEpochSampler:
        """The epoch sampler over spot-table ``rows`` with dominant-program ``labels``."""
        return SpotEpochSampler(rows, seed=seed)


@dataclass
class StratifiedSampler(SpotSampler):
    """The published balancing: spots of rare dominant programs get up to ``cap`` extra draws
    per epoch.

    ``copy_transforms``: None = each copy is a plain repeat (the data module's random
    augmentation, if any, treats it like any draw); a list of symmetry names (``augment.
    TRANSFORMS``, e.g. ``PAPER_COPY_TRANSFORMS``) = the original recipe: a spot's copies are
    distinct symmetries drawn once per run from the list, its original draw untransformed.
    """

    cap: int = 4
    copy_transforms: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.copy_transforms is None:
            return
        names = [str(n) for n in self.copy_transforms]
        bad = [n for n in names if n not in TRANSFORMS or n == "identity"]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"sampler.copy_transforms {names}: give distinct names from "
                             f"{', '.join(TRANSFORM_NAMES[1:])}" + (f" (not {bad})" if bad else " (no repeats)"))
        if int(self.cap) > len(names):
            raise ValueError(f"sampler.cap = {self.cap} copies need at least as many copy_transforms, got {len(names)}")
        self.copy_transforms = names

    def build(self, rows: np.ndarray, labels: np.ndarray, spot_radius_um: np.ndarray, seed: int) -> SpotEpochSampler:
        extra = stratified_extra_draws(labels, self.cap)
        plan = None if self.copy_transforms is None else copy_transform_plan(extra, self.copy_transforms, seed)
        return SpotEpochSampler(rows, extra=extra, seed=seed, copy_transforms=plan)


@dataclass
class JitterSampler(SpotSampler):
    """Each spot once per epoch, its patch centre shifted uniformly within ``fraction`` x the spot
    radius in the section plane; ``stratified`` adds the rare-program extra draws."""

    fraction: float = 1.0
    stratified: bool = False
    cap: int = 4

    @property
    def jitter_fraction(self) -> float:
        return float(self.fraction)

    def build(self, rows: np.ndarray, labels: np.ndarray, spot_radius_um: np.ndarray, seed: int) -> SpotEpochSampler:
        extra = stratified_extra_draws(labels, self.cap) if self.stratified else None
        return SpotEpochSampler(rows, extra=extra, jitter_um=self.fraction * np.asarray(spot_radius_um, float), seed=seed)

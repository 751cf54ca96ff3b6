"""Which training spots a model sees each epoch, and where exactly its patch is centred.

Sampler configs (Hydra ``_target_``) also carry the patch geometry in um and the model voxel
size, since both decide what a drawn patch looks like. ``build()`` returns a
:class:`SpotEpochSampler` (a ``torch.utils.data.Sampler``) that yields spot-table rows, or
``(row, du_um, dv_um)`` tuples when patches are jittered in the section plane.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch.utils.data

from xpression.data.geometry import PAPER_PATCH_UM, PatchGeometry

__all__ = ["SpotSampler", "StratifiedSampler", "JitterSampler", "SpotEpochSampler", "stratified_extra_draws"]


class SpotEpochSampler(torch.utils.data.Sampler):
    """Each row ``1 + extra[i]`` times per epoch, shuffled; optional in-plane jitter (um).

    Deterministic: epoch ``e`` uses ``numpy.random.default_rng([seed, e])``. Lightning calls
    ``set_epoch``; without it the epoch counter advances on every pass.
    """

    def __init__(self, rows: np.ndarray, extra: np.ndarray | None = None, jitter_um: np.ndarray | None = None, seed: int = 0, shuffle: bool = True):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.extra = np.zeros(len(self.rows), np.int64) if extra is None else np.asarray(extra, np.int64)
        self.jitter_um = None if jitter_um is None else np.broadcast_to(np.asarray(jitter_um, float), self.rows.shape)
        self.seed, self.shuffle, self.epoch = int(seed), shuffle, 0
        self._epoch_set = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = int(epoch), True

    def __len__(self) -> int:
        return int(len(self.rows) + self.extra.sum())

    def draws(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows drawn in ``epoch`` and (if jittering) their (du, dv) shifts in um."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        pos = np.repeat(np.arange(len(self.rows)), 1 + self.extra)
        if self.shuffle:
            pos = pos[rng.permutation(len(pos))]
        if self.jitter_um is None:
            return self.rows[pos], None
        r = self.jitter_um[pos] * np.sqrt(rng.random(len(pos)))
        t = 2 * np.pi * rng.random(len(pos))
        return self.rows[pos], np.stack([r * np.cos(t), r * np.sin(t)], axis=1)

    def __iter__(self) -> Iterator:
        rows, shifts = self.draws(self.epoch)
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        if shifts is None:
            yield from (int(r) for r in rows)
        else:
            yield from ((int(r), float(s[0]), float(s[1])) for r, s in zip(rows, shifts))


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
    model's voxel size (z, y, x) or a scalar, None = the volume's.
    """

    patch_size_um: Sequence[float] = field(default_factory=lambda: list(PAPER_PATCH_UM))
    voxel_size_um: Sequence[float] | float | None = None

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
    per epoch (drawn on the fly; each copy gets its own random augmentation)."""

    cap: int = 4

    def build(self, rows: np.ndarray, labels: np.ndarray, spot_radius_um: np.ndarray, seed: int) -> SpotEpochSampler:
        return SpotEpochSampler(rows, extra=stratified_extra_draws(labels, self.cap), seed=seed)


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

"""Multi-scale filter-bank features at the centre of a patch and of its context view.

At each scale ``sigma`` (um) a feature is a fixed weighting of one view's voxels around the
view's centre, the response a Gaussian filter of that scale (truncated to the view and
renormalised) gives at the centre:

- ``mean``: the Gaussian-weighted mean intensity;
- ``air`` / ``bright``: the weighted share of voxels below ``air_threshold`` / above
  ``bright_threshold`` (normalised intensity): airway lumen and alveolar air, walls and dense
  infiltrate;
- ``sd``: the weighted standard deviation (texture);
- ``gradient``: the magnitude of the Gaussian derivative (scale-normalised: times ``sigma``);
- ``laplacian``: the Laplacian of the Gaussian (times ``sigma^2``, zero on a constant view): blobs
  and tubes of about that size.

Optionally, at each scale of each view, the weighted shares of voxels below each level of
``share_below`` and above each level of ``share_above`` (``share<t@sigma``, ``share>t@sigma``):
the ``air`` / ``bright`` shares at more levels. And per view, signed distances from the view's centre (um): for each level ``t`` of
``distance_below`` to the nearest voxel below ``t`` (``dist<t``), of ``distance_above`` to the
nearest voxel above it (``dist>t``), minus the distance to the nearest voxel not so (negative
inside the mask), both capped at ``distance_cap_um`` (and by the view's reach). On the low-pass
filtered context view a low ``t`` marks only air wider than the filter (airway lumen, not
alveoli) and a high one solid tissue (lesions, vessels, walls): how far the spot lies from the
structures the programs follow, which the Gaussian shares see only as a blur.

Each scale is read from every view that resolves it and holds it: its in-plane voxel pitch is at
most ``sigma`` and its in-plane half-width at least ``2 sigma``. The patch serves the small
scales, the context view (every ``k``-th voxel of the low-pass filtered volume, see
:mod:`xpression.data.context`) the large ones, and a scale both serve is read from both (the
context view is deeper, so its kernels reach further along z): a 615 um context view on a 19.2
um pitch serves 19.2-153.6 um. Along z the kernels are cut at the view's depth. The features are rotation- and
flip-invariant in-plane, so no augmentation is needed to fit on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from xpression.config import ConfigError

__all__ = ["FEATURES", "FilterBank", "NearestFirst", "ViewKernels"]

FEATURES = ("mean", "air", "bright", "sd", "gradient", "laplacian")
_ROWS = 32  # views per block of the Gaussian features: a block and its temporaries stay in cache
_HEAD = 512  # a view's nearest voxels a signed distance searches first


@dataclass(frozen=True)
class ViewKernels:
    """The kernels of the scales one view serves, each ``(S, V)`` with ``V`` the view's voxels
    (C order): ``gauss`` (rows sum to 1), ``deriv`` ``(3, S, V)`` (z, y, x), ``laplacian``."""

    sigmas_um: tuple[float, ...]
    gauss: np.ndarray
    deriv: np.ndarray
    laplacian: np.ndarray

    @classmethod
    def build(cls, shape: Sequence[int], step_um: Sequence[float], sigmas_um: Sequence[float]) -> "ViewKernels":
        """Kernels on a view of ``shape`` voxels spaced ``step_um`` (z, y, x) um, centred on the
        view's centre (between voxels along an even axis)."""
        offsets = _offsets(shape, step_um)
        r2 = (offsets**2).sum(0)
        gauss, deriv, lap = [], [], []
        for sigma in sigmas_um:
            s2 = float(sigma) ** 2
            w = np.exp(-r2 / (2 * s2))
            w /= w.sum()
            gauss.append(w)
            deriv.append(-offsets / s2 * w * float(sigma))          # d/dz, d/dy, d/dx of the Gaussian, x sigma
            lg = (r2 / s2**2 - 3.0 / s2) * w * s2                    # Laplacian of the Gaussian, x sigma^2
            lap.append(lg - w * lg.sum())                            # zero response to a constant view
        return cls(tuple(float(s) for s in sigmas_um), np.asarray(gauss), np.stack(deriv, axis=1), np.asarray(lap))

    def features(self, view: np.ndarray, air_threshold: float, bright_threshold: float) -> np.ndarray:
        """``(B, V)`` normalised intensities -> ``(B, 6 S)``: each scale's six features (FEATURES).
        Rows go in blocks that stay in the CPU cache across the passes over them, and the linear
        kernels (Gaussian, its derivatives, Laplacian) are one matrix product: the numbers of
        one product per kernel over all rows (tested)."""
        view = np.asarray(view)
        out = np.empty((len(view), len(self.sigmas_um), len(FEATURES)))
        s = len(self.sigmas_um)
        for lo in range(0, len(view), _ROWS):
            a = np.asarray(view[lo : lo + _ROWS], np.float64)
            linear = a @ self._linear                                  # (b, 5 S): gauss, d/dz, d/dy, d/dx, laplacian
            mean = linear[:, :s]
            o = out[lo : lo + _ROWS]
            o[:, :, 0] = mean
            o[:, :, 1] = (a < air_threshold).astype(np.float64) @ self.gauss.T
            o[:, :, 2] = (a > bright_threshold).astype(np.float64) @ self.gauss.T
            o[:, :, 3] = np.sqrt(np.clip((a * a) @ self.gauss.T - mean**2, 0.0, None))
            o[:, :, 4] = np.sqrt(sum(linear[:, k * s : (k + 1) * s] ** 2 for k in (1, 2, 3)))
            o[:, :, 5] = linear[:, 4 * s :]
        return out.reshape(len(view), -1)

    @cached_property
    def _linear(self) -> np.ndarray:
        """``(V, 5 S)``: the Gaussian, its three derivatives and the Laplacian, as columns."""
        return np.ascontiguousarray(np.concatenate([self.gauss, *self.deriv, self.laplacian]).T)

    def shares(self, view: np.ndarray, below: Sequence[float], above: Sequence[float]) -> np.ndarray:
        """``(B, V)`` normalised intensities -> ``(B, S (len(below) + len(above)))``: at each scale,
        the Gaussian-weighted share of voxels below each level of ``below``, then above each of
        ``above``."""
        a = np.asarray(view)
        masks = [a < t for t in below] + [a > t for t in above]
        if not masks:
            return np.zeros((len(a), 0))
        return np.stack([m.astype(np.float64) @ self.gauss.T for m in masks], axis=2).reshape(len(a), -1)


def _offsets(shape: Sequence[int], step_um: Sequence[float]) -> np.ndarray:
    """``(3, V)`` um (z, y, x) of each voxel of a view of ``shape`` voxels spaced ``step_um`` from
    the view's centre (between voxels along an even axis), C order."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * float(s) for n, s in zip(shape, step_um)]
    return np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)


@dataclass(frozen=True)
class NearestFirst:
    """A view's voxels by distance from its centre: ``radius_um`` ``(V,)`` in the view's (C)
    order and ``order``, the voxels sorted nearest first, so that a mask's first hit in that
    order is its distance from the centre."""

    radius_um: np.ndarray
    order: np.ndarray

    @classmethod
    def build(cls, shape: Sequence[int], step_um: Sequence[float]) -> "NearestFirst":
        radius = np.sqrt((_offsets(shape, step_um) ** 2).sum(0))
        return cls(radius, np.argsort(radius, kind="stable"))

    def distances(self, view: np.ndarray, below: Sequence[float], above: Sequence[float], cap_um: float) -> np.ndarray:
        """``(B, V)`` normalised intensities -> ``(B, len(below) + len(above))`` signed distances
        (um) from the centre to the nearest voxel below / above each level, minus the distance to
        the nearest voxel that is not, each capped at ``cap_um``. Each row is first searched among
        its ``_HEAD`` nearest voxels, and whole only where they hold no hit (most rows find their
        nearest air and tissue there)."""
        view = np.asarray(view)
        radius = np.minimum(self.radius_um[self.order], cap_um)
        levels = [(t, np.less) for t in below] + [(t, np.greater) for t in above]
        out = np.zeros((len(view), len(levels)))
        head = self.order[:_HEAD]
        for lo in range(0, len(view), _ROWS):  # blocks of rows, so the masks stay in cache
            block = view[lo : lo + _ROWS]
            near = block[:, head]
            index = np.zeros((len(levels), 2, len(block)), np.intp)  # (level, hit / miss, row)
            found = np.zeros(index.shape, bool)
            for j, (level, side) in enumerate(levels):
                mask = side(near, level)
                for k, value in enumerate((True, False)):
                    index[j, k], found[j, k] = _first(mask, value)
            rows = np.flatnonzero(~found.all(axis=(0, 1)))
            if rows.size and len(self.order) > len(head):  # the rows that found no hit, searched whole
                whole = block[rows][:, self.order]
                for j, (level, side) in enumerate(levels):
                    mask = side(whole, level)
                    for k, value in enumerate((True, False)):
                        again = ~found[j, k, rows]
                        index[j, k, rows[again]], found[j, k, rows[again]] = _first(mask[again], value)
            hit = np.where(found, radius[index], cap_um)
            out[lo : lo + _ROWS] = (hit[:, 0] - hit[:, 1]).T
        return out


def _first(mask: np.ndarray, value: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``(B, N)`` ``mask``: the index of its first ``value`` and whether it has one."""
    index = (np.argmax if value else np.argmin)(mask, axis=1)
    return index, mask[np.arange(len(mask)), index] == value


class FilterBank:
    """Filter-bank features of the views a model sees (the patch, and a context view if any).

    Args:
        patch_shape: ``(D, H, W)`` voxels of every view.
        steps_um: per view, its voxel spacing ``(z, y, x)`` um (the context view's is its stride
            times the model voxel).
        sigmas_um: the scales (um).
        air_threshold, bright_threshold: normalised intensities (in [0, 1]) below which a voxel is
            air and above which it is bright.
        share_below, share_above: further levels (normalised intensity) of the shares read at
            every scale (none by default).
        distance_below, distance_above: levels (normalised intensity) of the signed-distance
            features, read from every view (none by default).
        distance_cap_um: the largest distance those features report (um).

    Raises:
        ConfigError: a scale no view serves, naming what each view serves.
    """

    def __init__(self, patch_shape: Sequence[int], steps_um: Sequence[Sequence[float]], sigmas_um: Sequence[float],
                 air_threshold: float = 0.3, bright_threshold: float = 0.75, distance_below: Sequence[float] = (),
                 distance_above: Sequence[float] = (), distance_cap_um: float = 300.0, share_below: Sequence[float] = (),
                 share_above: Sequence[float] = ()) -> None:
        self.patch_shape = tuple(int(n) for n in patch_shape)
        self.share_below = tuple(float(t) for t in share_below)
        self.share_above = tuple(float(t) for t in share_above)
        self.distance_below = tuple(float(t) for t in distance_below)
        self.distance_above = tuple(float(t) for t in distance_above)
        self.distance_cap_um = float(distance_cap_um)
        if not self.distance_cap_um > 0:
            raise ConfigError([f"model.distance_cap_um: must be a positive distance in um, got {distance_cap_um}"])
        self.steps_um = [tuple(float(s) for s in step) for step in steps_um]
        self.air_threshold, self.bright_threshold = float(air_threshold), float(bright_threshold)
        sigmas = sorted(float(s) for s in sigmas_um)
        if not sigmas or sigmas[0] <= 0:
            raise ConfigError([f"model.sigmas_um: must be positive scales in um, got {list(sigmas_um)}"])
        half = [min((n - 1) / 2.0 * s for n, s in zip(self.patch_shape[1:], step[1:])) for step in self.steps_um]
        pitch = [max(step[1:]) for step in self.steps_um]
        served = [[s for s in sigmas if p <= s and 2 * s <= h] for p, h in zip(pitch, half)]
        for sigma in sigmas:
            if not any(sigma in s for s in served):
                raise ConfigError([f"model.sigmas_um: {sigma:g} um fits no view: a view serves the scales from its in-plane "
                                   f"voxel pitch to half its in-plane reach ({', '.join(f'{p:g}-{h / 2:g} um' for p, h in zip(pitch, half))}); "
                                   "drop the scale or change patch.context_um"])
        self.kernels = [ViewKernels.build(self.patch_shape, step, s) if s else None for step, s in zip(self.steps_um, served)]
        self.nearest = ([NearestFirst.build(self.patch_shape, step) for step in self.steps_um]
                        if self.distance_below or self.distance_above else [])

    @property
    def names(self) -> list[str]:
        """One name per feature column, ``<feature>@<sigma>um`` (``/context`` from the context view)."""
        names = [f"{f}@{s:g}um" + ("/context" if i else "") for i, k in enumerate(self.kernels) if k is not None
                 for s in k.sigmas_um for f in FEATURES]
        shares = [f"share{op}{t:g}@{s:g}um" + ("/context" if i else "") for i, k in enumerate(self.kernels) if k is not None
                  for s in k.sigmas_um for op, levels in (("<", self.share_below), (">", self.share_above)) for t in levels]
        return names + shares + [f"dist{op}{t:g}" + ("/context" if i else "") for i in range(len(self.nearest))
                        for op, levels in (("<", self.distance_below), (">", self.distance_above)) for t in levels]

    def __call__(self, views: np.ndarray) -> np.ndarray:
        """``(B, C, D, H, W)`` normalised views (C = the views given at construction) -> ``(B, F)``."""
        views = np.asarray(views)
        if views.ndim != 5 or views.shape[1] != len(self.steps_um) or tuple(views.shape[2:]) != self.patch_shape:
            raise ValueError(f"FilterBank expects (B, {len(self.steps_um)}, {', '.join(map(str, self.patch_shape))}) views, "
                             f"got {tuple(views.shape)}")
        flat = views.reshape(len(views), views.shape[1], -1)
        parts = [k.features(flat[:, i], self.air_threshold, self.bright_threshold)
                 for i, k in enumerate(self.kernels) if k is not None]
        parts += [k.shares(flat[:, i], self.share_below, self.share_above)
                  for i, k in enumerate(self.kernels) if k is not None]
        parts += [n.distances(flat[:, i], self.distance_below, self.distance_above, self.distance_cap_um)
                  for i, n in enumerate(self.nearest)]
        return np.concatenate(parts, axis=1)

"""Per-volume figures of swept maps: orthogonal views over the CT, proportions per depth."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xpression.inference.grid import OutputGrid
from xpression.plotting import new_figure, save_figure, target_cmap

__all__ = ["plot_orthoviews", "plot_depth_proportions", "depth_profile"]


def _views(arr: Any, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial (z), coronal (y) and sagittal (x) planes through ``centre`` of a 3D array-like."""
    z, y, x = centre
    return [np.asarray(arr[z, :, :], np.float32), np.asarray(arr[:, y, :], np.float32), np.asarray(arr[:, :, x], np.float32)]


def plot_orthoviews(maps: Any, grid: OutputGrid, targets: Sequence[str], out: str | Path,
                    ct: Any = None, centre: Sequence[int] | None = None, title: str = "",
                    colors: Sequence[str] | None = None) -> Path:
    """One row per target: axial, coronal and sagittal planes through ``centre`` (grid indices;
    default the middle), the target's map over the CT preview (``ct``: same grid, optional).
    ``maps``: ``(T, nz, ny, nx)`` array-like; only the three planes are read. ``colors`` (one
    per target) shade each map from dark grey to its target's colour instead of magma."""
    centre = tuple(s // 2 for s in grid.shape) if centre is None else tuple(centre)
    ext = [(grid.origin_um[a], grid.origin_um[a] + (grid.shape[a] - 1) * grid.spacing_um[a]) for a in range(3)]
    extents = [(ext[2][0], ext[2][1], ext[1][1], ext[1][0]), (ext[2][0], ext[2][1], ext[0][1], ext[0][0]),
               (ext[1][0], ext[1][1], ext[0][1], ext[0][0])]
    labels = [("x (um)", "y (um)"), ("x (um)", "z (um)"), ("y (um)", "z (um)")]
    ct_views = _views(ct, centre) if ct is not None else None
    n = len(targets)
    fig, axes = new_figure(n, 3, figsize=(12, 3.2 * n + 0.5), squeeze=False)
    for t, name in enumerate(targets):
        views = _views(_Channel(maps, t), centre)
        finite = np.concatenate([v[np.isfinite(v)] for v in views])
        lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        for k, (ax, v) in enumerate(zip(axes[t], views)):
            if ct_views is not None:
                ax.imshow(ct_views[k], cmap="gray", extent=extents[k], interpolation="nearest")
            im = ax.imshow(np.ma.masked_invalid(v), cmap=target_cmap(colors[t] if colors is not None else None, "magma"), vmin=lo, vmax=max(hi, lo + 1e-6),
                           alpha=0.75 if ct_views is not None else 1.0, extent=extents[k], interpolation="nearest")
            ax.set_xlabel(labels[k][0], fontsize=8)
            ax.set_ylabel(labels[k][1], fontsize=8)
            ax.set_title(f"{name}: {['axial', 'coronal', 'sagittal'][k]}", fontsize=9)
            ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=axes[t, -1], shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out, dpi=100)


class _Channel:
    """``maps[t]`` without reading the other channels."""

    def __init__(self, maps: Any, t: int):
        self.maps, self.t = maps, t

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.maps[(self.t,) + tuple(key)])


def depth_profile(maps: Any, grid: OutputGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per grid plane: ``z_um`` (nz,), mean of each target over the tissue points (T, nz) and
    the number of tissue points (nz,). Reads one plane at a time."""
    T, nz = maps.shape[0], maps.shape[1]
    means = np.full((T, nz), np.nan)
    counts = np.zeros(nz, np.int64)
    for iz in range(nz):
        plane = np.asarray(maps[:, iz], np.float32)
        valid = np.all(np.isfinite(plane), axis=0)
        counts[iz] = int(valid.sum())
        if counts[iz]:
            means[:, iz] = plane[:, valid].mean(axis=1)
    return grid.axis_um(0), means, counts


def plot_depth_proportions(maps: Any, grid: OutputGrid, targets: Sequence[str], out: str | Path,
                           kind: str = "composition", title: str = "", colors: Sequence[str] | None = None) -> Path:
    """Target proportions per depth through the organ (the study's organ-level plot): stacked
    areas of the per-plane mean composition (``kind="composition"``) or one line per target,
    in the targets' ``colors`` when given."""
    z, means, counts = depth_profile(maps, grid)
    fig, (ax, ax2) = new_figure(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1])
    ok = counts > 0
    if kind == "composition":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            props = means / np.nansum(means, axis=0, keepdims=True)
        ax.stackplot(z[ok], np.nan_to_num(props[:, ok]), labels=list(targets), alpha=0.9,
                     colors=list(colors) if colors is not None else None)
        ax.set_ylabel("mean proportion")
        ax.set_ylim(0, 1)
    else:
        for t, name in enumerate(targets):
            ax.plot(z[ok], means[t, ok], label=name, color=colors[t] if colors is not None else None)
        ax.set_ylabel("mean prediction")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax2.bar(z, counts * np.prod(grid.spacing_um[1:]) / 1e6, width=grid.spacing_um[0] * 0.9, color="0.5")
    ax2.set_ylabel("tissue (mm^2)")
    ax2.set_xlabel("depth z (um)")
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, out, dpi=100)

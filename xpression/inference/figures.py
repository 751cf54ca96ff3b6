"""Per-volume figures of swept maps: orthogonal views over the CT, proportions per depth."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from xpression.inference.grid import OutputGrid
from xpression.plotting import add_scale_bar, new_figure, save_figure, target_cmap

__all__ = ["plot_orthoviews", "plot_depth_proportions", "depth_profile"]


def _views(arr: Any, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial (z), coronal (y) and sagittal (x) planes through ``centre`` of a 3D array-like."""
    z, y, x = centre
    return [np.asarray(arr[z, :, :], np.float32), np.asarray(arr[:, y, :], np.float32), np.asarray(arr[:, :, x], np.float32)]


_VIEW_NAMES = ("axial", "coronal", "sagittal")


def plot_orthoviews(maps: Any, grid: OutputGrid, targets: Sequence[str], out: str | Path,
                    ct: Any = None, centre: Sequence[int] | None = None, title: str = "",
                    section_z_um: float | None = None, truth: Any = None, channels: Sequence[int] | None = None,
                    value_label: str | Callable[[str], str] = "predicted value", views: Sequence[int] = (0, 1, 2),
                    colors: Sequence[str] | None = None) -> Path:
    """One row per target: axial, coronal and sagittal planes through ``centre`` (grid indices;
    default the middle), over the CT preview (``ct``: same grid, optional).

    ``maps``: ``(T, nz, ny, nx)`` array-like; only the three planes are read. ``truth``: an
    array-like of the same layout for the drawn ``channels`` (in that order); when given, each
    view shows the truth beside the prediction on one colour scale, masked where the
    prediction is (outside the tissue). ``section_z_um``: the trained section, drawn as a dashed
    line on the coronal and sagittal views; dotted lines mark where the other views cut.
    ``channels``: target indices to draw (default all); ``views``: which of axial (0), coronal
    (1), sagittal (2) to draw. ``colors`` (one per target) shade each map from dark grey to its
    target's colour instead of magma. ``value_label``: the colour bars' label after the target's
    name, or a function of the channel's name giving its whole label. Axes and scale bars are in
    um; tick labels on the outer panels."""
    centre = tuple(s // 2 for s in grid.shape) if centre is None else tuple(centre)
    channels = list(range(len(targets))) if channels is None else list(channels)
    ax_um = [grid.axis_um(a) for a in range(3)]
    half = [grid.spacing_um[a] / 2 for a in range(3)]
    ext = [(ax_um[a][0] - half[a], ax_um[a][-1] + half[a]) for a in range(3)]
    extents = [(ext[2][0], ext[2][1], ext[1][1], ext[1][0]), (ext[2][0], ext[2][1], ext[0][1], ext[0][0]),
               (ext[1][0], ext[1][1], ext[0][1], ext[0][0])]
    labels = [("x (µm)", "y (µm)"), ("x (µm)", "z (µm)"), ("y (µm)", "z (µm)")]
    cut = [ax_um[a][c] for a, c in enumerate(centre)]  # (z, y, x) um of the three planes
    # per view: the positions (um) of the other two planes, as (vertical line x, horizontal line y)
    cuts = [(cut[2], cut[1]), (cut[2], cut[0]), (cut[1], cut[0])]
    ct_views = _views(ct, centre) if ct is not None else None
    views = list(views)
    per_view = 2 if truth is not None else 1
    panels = per_view * len(views)
    n = len(channels)
    fig, axes = new_figure(n, panels, figsize=(3.4 * panels, 2.8 * n + 0.6), squeeze=False)
    for row, t in enumerate(channels):
        name = targets[t]
        planes = _views(_Channel(maps, t), centre)
        true_views = [np.where(np.isfinite(v), tv, np.nan) for v, tv in zip(planes, _views(_Channel(truth, row), centre))] \
            if truth is not None else None
        finite = np.concatenate([planes[k][np.isfinite(planes[k])] for k in views]
                                + ([true_views[k][np.isfinite(true_views[k])] for k in views] if true_views else []))
        lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        hi = max(hi, lo + 1e-6)
        cmap = target_cmap(colors[t] if colors is not None else None, "magma")
        for col_k, k in enumerate(views):
            shown = [("truth", true_views[k]), ("prediction", planes[k])] if true_views is not None else [("", planes[k])]
            for j, (kind, v) in enumerate(shown):
                ax = axes[row, col_k * per_view + j]
                if ct_views is not None:
                    ax.imshow(ct_views[k], cmap="gray", extent=extents[k], interpolation="nearest")
                im = ax.imshow(np.ma.masked_invalid(v), cmap=cmap, vmin=lo, vmax=hi,
                               alpha=0.75 if ct_views is not None else 1.0, extent=extents[k], interpolation="nearest")
                ax.axvline(cuts[k][0], color="cyan", lw=0.6, ls=":")
                ax.axhline(cuts[k][1], color="cyan", lw=0.6, ls=":")
                if section_z_um is not None and k > 0:
                    ax.axhline(section_z_um, color="lime", lw=1.0, ls="--")
                if row == n - 1:
                    ax.set_xlabel(labels[k][0], fontsize=7)
                else:
                    ax.tick_params(labelbottom=False)
                ax.set_ylabel(labels[k][1], fontsize=7)
                where = f"z = {cut[0]:.0f} µm" if k == 0 else f"y = {cut[1]:.0f} µm" if k == 1 else f"x = {cut[2]:.0f} µm"
                if k == 0 and section_z_um is not None:
                    where += f" ({abs(cut[0] - section_z_um):.0f} µm from the section)"
                ax.set_title(f"{name}{': ' + kind if kind else ''}, {_VIEW_NAMES[k]} {where}", fontsize=8)
                ax.tick_params(labelsize=6)
                add_scale_bar(ax, extents[k][1] - extents[k][0])
        bar = fig.colorbar(im, ax=axes[row, -1], shrink=0.85)
        bar.set_label(value_label(name) if callable(value_label) else f"{name}: {value_label}", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    notes = "colour range per row (its 1st-99th percentile); dotted cyan: where the other views cut"
    if section_z_um is not None:
        notes += f"; dashed green: trained section (z = {section_z_um:.0f} µm)"
    fig.suptitle(f"{title}\n{notes}" if title else notes, fontsize=9)
    return save_figure(fig, out, dpi=90)


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
                           kind: str = "composition", title: str = "", section_z_um: float | None = None,
                           colors: Sequence[str] | None = None) -> Path:
    """Target proportions per depth through the organ (the study's organ-level plot): stacked
    areas of the per-plane mean composition (``kind="composition"``) or one line per target,
    in the targets' ``colors`` when given; ``section_z_um``: the trained section, marked."""
    z, means, counts = depth_profile(maps, grid)
    fig, (ax, ax2) = new_figure(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1])
    ok = counts > 0
    if kind == "composition":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            props = means / np.nansum(means, axis=0, keepdims=True)
        ax.stackplot(z[ok], np.nan_to_num(props[:, ok]), labels=list(targets), alpha=0.9,
                     colors=list(colors) if colors is not None else None)
        ax.set_ylabel("mean predicted proportion")
        ax.set_ylim(0, 1)
    else:
        for t, name in enumerate(targets):
            ax.plot(z[ok], means[t, ok], label=name, color=colors[t] if colors is not None else None)
        ax.set_ylabel("mean prediction")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax2.bar(z, counts * np.prod(grid.spacing_um[1:]) / 1e6, width=grid.spacing_um[0] * 0.9, color="0.5")
    ax2.set_ylabel("tissue (mm²)")
    ax2.set_xlabel("depth z (µm)")
    if section_z_um is not None:
        for a in (ax, ax2):
            a.axvline(section_z_um, color="k", ls="--", lw=1.0)
        ax.text(section_z_um, 1.01, " trained section", transform=ax.get_xaxis_transform(), fontsize=7, va="bottom")
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, out, dpi=100)

"""Figures of a training run: truth vs prediction over the section, and training curves.

Predictions travel as a pandas DataFrame with one row per spot and the columns
`section_id`, `split`, `u_um`, `v_um` (in-plane position, um), `true/<target>` and `pred/<target>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from xpression.plotting import new_figure, save_figure, target_cmap

__all__ = ["plot_section_maps", "plot_training_curves"]

_SPLIT_MARKERS = {"train": "o", "val": "s", "test": "D"}


def plot_section_maps(
    predictions: pd.DataFrame,
    target_names: list[str],
    out_dir: str | Path,
    spot_diameter_um: float = 55.0,
    colors: Sequence[str] | None = None,
) -> list[Path]:
    """Draw, per section, each target's true and predicted value at every spot.

    Rows are targets; columns are truth, prediction and their difference. Held-out (val and
    test) spots are outlined in black so the eye can tell interpolation from generalisation;
    spots excluded by a split's buffer are drawn plain. ``colors`` (one per target, e.g.
    Chrysalis compartment colours) shade each target from dark grey to its colour.

    Returns:
        The written PNG paths, one per section.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for section_id, spots in predictions.groupby("section_id", sort=True):
        n = len(target_names)
        fig, axes = new_figure(n, 3, figsize=(10.5, 3.0 * n + 0.4), squeeze=False)
        u, v = spots["u_um"].to_numpy(), spots["v_um"].to_numpy()
        held_out = np.isin(spots["split"].to_numpy(), ("val", "test"))
        size = _marker_size(fig, axes[0, 0], u, v, spot_diameter_um)
        for row, name in enumerate(target_names):
            cmap = target_cmap(colors[row] if colors is not None else None)
            truth = spots[f"true/{name}"].to_numpy()
            pred = spots[f"pred/{name}"].to_numpy()
            lo, hi = np.nanpercentile(np.concatenate([truth, pred]), [1, 99])
            diff_lim = max(float(np.nanmax(np.abs(pred - truth))), 1e-6)
            panels = [
                (truth, cmap, lo, hi, f"{name}: truth"),
                (pred, cmap, lo, hi, f"{name}: prediction"),
                (pred - truth, "coolwarm", -diff_lim, diff_lim, f"{name}: prediction - truth"),
            ]
            for col, (values, cmap, vmin, vmax, title) in enumerate(panels):
                ax = axes[row, col]
                image = ax.scatter(u, v, c=values, s=size, cmap=cmap, vmin=vmin, vmax=vmax, linewidths=0)
                ax.scatter(u[held_out], v[held_out], s=size, facecolors="none", edgecolors="k", linewidths=0.4)
                ax.set_title(title, fontsize=9)
                ax.set_aspect("equal")
                ax.invert_yaxis()
                ax.set_xticks([])
                ax.set_yticks([])
                fig.colorbar(image, ax=ax, shrink=0.8)
        fig.suptitle(f"section {section_id}: black rings = held-out spots", fontsize=10)
        written.append(save_figure(fig, out_dir / f"section_{section_id}.png"))
    return written


def _marker_size(fig: Figure, ax: Axes, u: np.ndarray, v: np.ndarray, diameter_um: float) -> float:
    """Scatter marker area (points^2) that draws a spot about its physical diameter."""
    extent = max(float(np.ptp(u)), float(np.ptp(v)), diameter_um)
    axis_points = ax.get_position().width * fig.get_figwidth() * 72
    diameter_points = axis_points * diameter_um / extent
    return max(diameter_points**2, 4.0)


def plot_training_curves(metrics_csv: str | Path, out_path: str | Path) -> Path | None:
    """Plot loss and mean Pearson r per epoch from a Lightning CSVLogger `metrics.csv`.

    Returns:
        The PNG path, or None when the log holds no epoch-level values.
    """
    log = pd.read_csv(metrics_csv)
    if "epoch" not in log:
        return None
    per_epoch = log.groupby("epoch").mean(numeric_only=True)
    panels = [
        ("loss", [c for c in ("train/loss_epoch", "train/loss", "val/loss") if c in per_epoch]),
        ("mean Pearson r", [c for c in ("train/pearson_mean", "val/pearson_mean") if c in per_epoch]),
    ]
    panels = [(title, cols) for title, cols in panels if cols]
    if not panels:
        return None
    fig, axes = new_figure(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for ax, (title, cols) in zip(axes[0], panels):
        for col in cols:
            series = per_epoch[col].dropna()
            ax.plot(series.index, series.to_numpy(), marker="o", ms=3, label=col)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_path)

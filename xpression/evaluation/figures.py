"""Figures of a training run: truth vs prediction over the section, training curves, and
accuracy against distance from the trained plane with the baselines beside the model.

Predictions travel as a pandas DataFrame with one row per spot and the columns
`section_id`, `split`, `u_um`, `v_um` (in-plane position, um), `true/<target>` and `pred/<target>`.
Scores travel as score rows (``xpression.evaluation.scores``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from xpression.evaluation.scores import PREDICTOR_LABELS
from xpression.plotting import add_scale_bar, new_figure, save_figure, target_cmap

__all__ = ["plot_section_maps", "plot_training_curves", "plot_run_scores", "PREDICTOR_STYLE"]

_HELD_OUT_EDGES = {"val": "k", "test": "#e6007e"}  # black rings: validation, magenta rings: test (in no colour map used)
PREDICTOR_STYLE = {"model": ("k", "-", "o"), "ridge": ("#ff7f0e", "-.", "v"), "extrusion": ("#1f77b4", "--", "s"),
                   "knn": ("#2ca02c", ":", "^"), "animal_mean": ("#d62728", "--", "D"), "train_mean": ("0.5", ":", "x"),
                   "section_extrusion": ("#9467bd", "--", "P")}


def plot_section_maps(
    predictions: pd.DataFrame,
    target_names: list[str],
    out_dir: str | Path,
    spot_diameter_um: float = 55.0,
    value_label: str = "proportion",
    colors: Sequence[str] | None = None,
) -> list[Path]:
    """Draw, per section, each target's true and predicted value at every spot.

    Rows are targets; columns are truth, prediction and their difference, on the section
    plane (u, v in um, scale bar). Held-out spots are ringed (black: validation, magenta: test)
    so the eye can tell interpolation from generalisation; spots excluded by a split's buffer
    are drawn faded. Colour bars are labelled with the target and ``value_label``. ``colors``
    (one per target, e.g. Chrysalis compartment colours) shade each target from dark grey to
    its colour.

    Returns:
        The written PNG paths, one per section.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for section_id, spots in predictions.groupby("section_id", sort=True):
        n = len(target_names)
        fig, axes = new_figure(n, 3, figsize=(11.0, 3.0 * n + 0.6), squeeze=False)
        u, v = spots["u_um"].to_numpy(), spots["v_um"].to_numpy()
        split = spots["split"].to_numpy()
        size = _marker_size(fig, axes[0, 0], u, v, spot_diameter_um)
        counts = {s: int((split == s).sum()) for s in ("train", "val", "test", "excluded")}
        for row, name in enumerate(target_names):
            cmap = target_cmap(colors[row] if colors is not None else None)
            truth = spots[f"true/{name}"].to_numpy()
            pred = spots[f"pred/{name}"].to_numpy()
            lo, hi = np.nanpercentile(np.concatenate([truth, pred]), [1, 99])
            diff_lim = max(float(np.nanmax(np.abs(pred - truth))), 1e-6)
            panels = [
                (truth, cmap, lo, hi, f"{name}: spot label (truth)", f"{name}: {value_label}"),
                (pred, cmap, lo, hi, f"{name}: prediction", f"{name}: {value_label}"),
                (pred - truth, "coolwarm", -diff_lim, diff_lim, f"{name}: prediction - truth", "prediction - truth"),
            ]
            for col, (values, cmap, vmin, vmax, title, bar_label) in enumerate(panels):
                ax = axes[row, col]
                faded = split == "excluded"
                image = ax.scatter(u[~faded], v[~faded], c=values[~faded], s=size, cmap=cmap, vmin=vmin, vmax=vmax, linewidths=0)
                ax.scatter(u[faded], v[faded], c=values[faded], s=size, cmap=cmap, vmin=vmin, vmax=vmax, linewidths=0,
                           alpha=0.3)
                if counts["excluded"] and row == 0 and col == 0:  # a neutral swatch, not a colour of the map
                    ax.scatter([], [], s=size, color="0.6", alpha=0.3, label=f"buffer-excluded (n={counts['excluded']})")
                for which, colour in _HELD_OUT_EDGES.items():
                    ring = split == which
                    ax.scatter(u[ring], v[ring], s=size, facecolors="none", edgecolors=colour, linewidths=0.6,
                               label=f"{which} spots (n={counts[which]})")
                ax.set_title(title, fontsize=9)
                ax.set_aspect("equal")
                ax.invert_yaxis()
                ax.set_xticks([])
                ax.set_yticks([])
                add_scale_bar(ax, float(np.ptp(u)) + spot_diameter_um)
                bar = fig.colorbar(image, ax=ax, shrink=0.8)
                bar.set_label(bar_label, fontsize=7)
                bar.ax.tick_params(labelsize=6)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncols=3, frameon=False)
        fig.suptitle(f"section {section_id}: {counts['train']} training spots (plain), held-out spots ringed "
                     "(black: validation, magenta: test)", fontsize=10)
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


def _x_positions(df: pd.DataFrame) -> tuple[dict[str, float], list[tuple[float, str]]]:
    """x position per (where, distance) label: held-out spots at 0, planes at their distance,
    other volumes to the right; and the tick labels."""
    planes = sorted({float(d) for w, d in zip(df["where"], df["distance_um"]) if w == "plane"})
    far = max(planes + [100.0])
    others = sorted({str(v) for v in df.loc[df["where"] == "volume", "volume_id"]})
    pos = {"spots": 0.0, **{f"plane {d:g}": d for d in planes}}
    step = max(far * 0.3, 80.0)
    pos.update({f"volume {v}": far + step * (i + 1) for i, v in enumerate(others)})
    ticks = [(0.0, "held-out\nspots")] + [(d, f"{d:g}") for d in planes] + [(far + step * (i + 1), f"{v}\n(unseen)") for i, v in enumerate(others)]
    return pos, ticks


def plot_run_scores(df: pd.DataFrame, out: str | Path, title: str = "") -> Path | None:
    """Pearson r and R^2 (mean over targets, per volume) against distance from the trained
    section for the model and every baseline present: held-out spots at 0 (test, else val),
    planes at their distance, volumes without a training section to the right. The section
    plane itself (training data) and the training mean (the animal mean's stand-in where an
    animal has no section) are left out."""
    if df is None or df.empty:
        return None
    df = df.copy()
    held = "test spots" if (df["where"] == "test spots").any() else "val spots"
    df = df[df["where"].isin([held, "plane", "volume"])]
    if df.empty:
        return None
    df["key"] = [("spots" if w == held else f"plane {float(d):g}" if w == "plane" else f"volume {v}")
                 for w, d, v in zip(df["where"], df["distance_um"], df["volume_id"])]
    pos, ticks = _x_positions(df)
    df["x"] = df["key"].map(pos)
    trained = sorted({str(v) for v in df.loc[df["where"] != "volume", "volume_id"]})
    fig, axes = new_figure(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, metric, label in zip(axes[0], ("pearson_mean", "r2_mean"), ("Pearson r (mean over programs)", "R² (mean over programs)")):
        for predictor in [p for p in PREDICTOR_STYLE if p in set(df["predictor"]) and p != "train_mean"]:
            colour, ls, marker = PREDICTOR_STYLE[predictor]
            part = df[df["predictor"] == predictor]
            for k, vid in enumerate(trained):
                line = part[(part["volume_id"] == vid) & (part["where"] != "volume")].sort_values("x")
                y = pd.to_numeric(line[metric], errors="coerce")
                if y.notna().any():
                    name = PREDICTOR_LABELS[predictor] + (" (training mean on unseen animals)" if predictor == "animal_mean" else "")
                    ax.plot(line["x"], y, color=colour, ls=ls, marker=marker, ms=4, lw=1.6 if predictor == "model" else 1.1,
                            label=name + (f", {vid}" if len(trained) > 1 else ""))
            far = part[part["where"] == "volume"]
            y = pd.to_numeric(far[metric], errors="coerce")
            ax.scatter(far["x"][y.notna()], y[y.notna()], color=colour, marker=marker, s=28, zorder=3,
                       label=None if part["where"].ne("volume").any() else PREDICTOR_LABELS[predictor])
        ax.set_xticks([t for t, _ in ticks], [s for _, s in ticks], fontsize=7)
        ax.set_xlabel("distance from the trained section (µm)")
        ax.set_ylabel(label)
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.grid(alpha=0.3)
    seen: dict[str, Any] = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize=7, frameon=False)
    planes = df[df["where"] == "plane"]
    missing = "" if planes.empty or planes["predictor"].ne("model").any() else \
        "\nno baselines at the planes: the run's spot table lacks the training labels they are fitted on"
    fig.suptitle((title or f"accuracy against the truth, per volume (trained: {', '.join(trained) or 'none'}); "
                  "correlations n/a where a predictor or a program is constant") + missing, fontsize=9)
    return save_figure(fig, out)

"""Scoring swept maps against a synthetic cohort's 3D truth.

Per target, Pearson r between predicted and true values at the grid points inside the tissue
mask (non-NaN predictions), for (a) the grid plane of the trained section, (b) grid planes at
increasing distances from it (both sides pooled, only where the volume reaches), (c) whole
other volumes. Maps are read plane by plane and r is accumulated from running sums, so memory
stays one plane. Truth is ``truth_fn(points_um (N, 3)) -> (N, P)`` with ``program_names``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from xpression.inference.grid import OutputGrid

__all__ = ["PearsonAccumulator", "score_volume", "summarise", "plot_accuracy_vs_distance"]

DEFAULT_DISTANCES_UM = (100.0, 200.0, 400.0, 600.0)


class PearsonAccumulator:
    """Running Pearson r per column from batches of (prediction, truth) rows (float64 sums)."""

    def __init__(self, n: int):
        self.k = 0
        self.s = np.zeros((5, n))  # sum x, y, xx, yy, xy

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        self.k += len(x)
        self.s += np.stack([x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)])

    def r(self) -> np.ndarray:
        if self.k < 3:
            return np.full(self.s.shape[1], np.nan)
        sx, sy, sxx, syy, sxy = self.s
        k = self.k
        cov = sxy - sx * sy / k
        vx, vy = sxx - sx * sx / k, syy - sy * sy / k
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((vx > 1e-12 * k) & (vy > 1e-12 * k), cov / np.sqrt(vx * vy), np.nan)


def _plane_pairs(maps: Any, grid: OutputGrid, iz: int, cols: list[int], truth_fn: Callable, prog: list[int]) -> tuple[np.ndarray, np.ndarray]:
    plane = np.asarray(maps[:, iz], dtype=np.float32)[cols]  # (T', ny, nx)
    valid = np.all(np.isfinite(plane), axis=0)
    if not valid.any():
        return np.empty((0, len(cols))), np.empty((0, len(cols)))
    yy, xx = np.nonzero(valid)
    pts = np.stack([np.full(len(yy), grid.axis_um(0)[iz]), grid.axis_um(1)[yy], grid.axis_um(2)[xx]], axis=1)
    truth = np.asarray(truth_fn(pts))[:, prog]
    return plane[:, yy, xx].T, truth


def score_volume(
    maps: Any,
    grid: OutputGrid,
    targets: Sequence[str],
    truth_fn: Callable[[np.ndarray], np.ndarray],
    program_names: Sequence[str],
    volume_id: str,
    section_z_um: float | None = None,
    distances_um: Sequence[float] = DEFAULT_DISTANCES_UM,
) -> list[dict]:
    """Rows ``{volume_id, where, distance_um, n, r/<target>..., r_mean}`` for one volume.

    ``maps``: ``(T, nz, ny, nx)`` array-like (a zarr level). With ``section_z_um`` (the trained
    section of this volume) rows ``where="section"`` (distance 0) and ``where="distance"``;
    without it one row ``where="volume"`` over every grid plane. Targets that are not truth
    programs are left out.
    """
    cols = [i for i, t in enumerate(targets) if t in program_names]
    if not cols:
        return []
    names = [targets[i] for i in cols]
    prog = [list(program_names).index(n) for n in names]
    rows = []

    def row(where: str, dist: float, planes: list[int]) -> None:
        acc = PearsonAccumulator(len(cols))
        for iz in planes:
            x, y = _plane_pairs(maps, grid, iz, cols, truth_fn, prog)
            if len(x):
                acc.add(x, y)
        r = acc.r()
        rows.append({"volume_id": volume_id, "where": where, "distance_um": dist, "n": acc.k,
                     **{f"r/{n}": float(v) for n, v in zip(names, r)}, "r_mean": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")})

    if section_z_um is None:
        row("volume", float("nan"), list(range(grid.shape[0])))
        return rows
    z = grid.axis_um(0)
    dz = grid.spacing_um[0]
    row("section", 0.0, [int(np.argmin(np.abs(z - section_z_um)))])
    for d in distances_um:
        planes = [int(np.argmin(np.abs(z - t))) for t in (section_z_um - d, section_z_um + d)
                  if z[0] - dz / 2 <= t <= z[-1] + dz / 2]
        if planes:
            row("distance", float(d), sorted(set(planes)))
    return rows


def summarise(rows: list[dict]) -> Any:
    """The rows as a pandas DataFrame, ordered section, distances, other volumes."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if df.empty:
        return df
    order = {"section": 0, "distance": 1, "volume": 2}
    df["_o"] = df["where"].map(order)
    return df.sort_values(["_o", "volume_id", "distance_um"]).drop(columns="_o").reset_index(drop=True)


def plot_accuracy_vs_distance(df: Any, out: str | Path) -> Path | None:
    """Mean and per-target r against distance from the trained section; other volumes as
    horizontal lines."""
    import matplotlib

    from xpression.plotting import new_figure, save_figure

    if df is None or len(df) == 0:
        return None
    near = df[df["where"].isin(["section", "distance"])]
    far = df[df["where"] == "volume"]
    fig, ax = new_figure(figsize=(6, 4))
    tcols = [c for c in df.columns if c.startswith("r/")]
    for vid, g in near.groupby("volume_id"):
        g = g.sort_values("distance_um")
        for c in tcols:
            ax.plot(g["distance_um"], g[c], color="0.75", lw=0.8)
        ax.plot(g["distance_um"], g["r_mean"], marker="o", lw=2, label=f"{vid} (trained), mean")
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (_, r) in enumerate(far.iterrows()):
        ax.axhline(r["r_mean"], ls="--", lw=1.2, color=colours[(k + 1) % len(colours)],
                   label=f"{r['volume_id']} (unseen volume), mean")
    ax.set_xlabel("distance from the trained section (um)")
    ax.set_ylabel("Pearson r (grey: per target)")
    ax.set_ylim(-0.2, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out)

"""Per-volume score rows of a model and its baselines, and the table that prints them.

A *score row* is one predictor scored on the points of one volume at one place::

    {"volume_id", "condition", "where", "distance_um", "predictor", "n", <regression_metrics>}

``where`` is ``"train spots"`` / ``"val spots"`` / ``"test spots"`` (spots of a trained section,
distance 0), ``"plane"`` (planes ``distance_um`` from the trained section(s) of the volume) or
``"volume"`` (a volume without a training section, distance NaN). ``predictor`` is ``model``,
``ridge`` (features + ridge on the run's own patch) or a baseline without CT
(``xpression.evaluation.baselines``). Rows are never pooled across volumes; ``metrics.json``,
``evaluation.csv`` and the benchmark all carry them.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from rich.table import Table

from xpression.evaluation.baselines import BASELINES, KNN_K, TrainingSpots, baseline_predictions
from xpression.metrics import format_score, regression_metrics

__all__ = ["PREDICTORS", "PREDICTOR_LABELS", "score_rows", "evaluate_spots", "scores_table", "spot_baselines"]

PREDICTORS = ("model", "ridge", *BASELINES)
PREDICTOR_LABELS = {"model": "model", "ridge": "ridge (same patch)", "extrusion": "2D extrusion",
                    "knn": f"kNN (k={KNN_K})", "animal_mean": "animal mean", "train_mean": "training mean",
                    "section_extrusion": "2D extrusion, all section spots"}
_WHERE_ORDER = {"train spots": 0, "val spots": 1, "test spots": 2, "section plane": 3, "plane": 4, "volume": 5}
_SHORT = {"model": "model", "ridge": "ridge", "extrusion": "extr.", "knn": "kNN", "animal_mean": "mean",
          "section_extrusion": "all-spot extr."}


def score_rows(predictions: Mapping[str, np.ndarray], truth: np.ndarray, names: Sequence[str], kind: str,
               **keys: Any) -> list[dict[str, Any]]:
    """One score row per predictor (``{name: (N, T)}``) against ``truth`` ``(N, T)``; ``keys``
    (volume_id, condition, where, distance_um) are copied into every row."""
    return [{**keys, "predictor": name, "n": int(len(truth)), **regression_metrics(pred, truth, names, kind=kind)}
            for name, pred in predictions.items()]


def spot_baselines(table: pd.DataFrame, names: Sequence[str], k: int = KNN_K) -> pd.DataFrame:
    """The spot table with ``<baseline>/<target>`` columns: every baseline's prediction at every
    spot from the ``train`` rows' ``true/<target>`` labels (extrusion and kNN only in volumes
    with training spots; NaN elsewhere)."""
    train = TrainingSpots.from_table(table, [f"true/{n}" for n in names])
    out = table.copy()
    cols: dict[str, np.ndarray] = {}
    for vid, rows in table.groupby("volume_id", sort=False).groups.items():
        idx = table.index.get_indexer(rows)
        pts = table.loc[rows, ["z_um", "y_um", "x_um"]].to_numpy(float)
        for name, pred in baseline_predictions(train, str(vid), pts, k).items():
            for j, n in enumerate(names):
                cols.setdefault(f"{name}/{n}", np.full(len(table), np.nan))[idx] = pred[:, j]
    for c, v in cols.items():
        out[c] = v
    return out


def evaluate_spots(predictions: pd.DataFrame, names: Sequence[str], kind: str, k: int = KNN_K,
                   conditions: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """Per-volume scores on the spots of the trained sections.

    ``predictions``: the spot table with ``split``, ``volume_id``, positions, ``true/<target>``,
    ``pred/<target>`` (the model) and optionally ``ridge/<target>``. The model, the ridge and the
    baselines without CT (from the training spots) are scored on every split, except extrusion
    and kNN on training spots (they would copy the spot's own label).

    Returns ``{"scores": [score rows], "splits": {split: {"n_spots", "n_volumes", <metric>: mean
    over volumes}}, "held_out_split", "pearson_mean"}``: ``splits`` averages the model's
    per-volume values (never pooled); ``pearson_mean`` is the held-out split's (test, else val).
    """
    table = spot_baselines(predictions.reset_index(drop=True), names, k)
    true_cols = [f"true/{n}" for n in names]
    rows: list[dict[str, Any]] = []
    for vid, g in table.groupby("volume_id", sort=False):
        for split in ("train", "val", "test"):
            part = g[g["split"] == split]
            if part.empty:
                continue
            preds = {"model": part[[f"pred/{n}" for n in names]].to_numpy(float)}
            for name in ("ridge", *BASELINES):
                if name == "section_extrusion" or (split == "train" and name in ("extrusion", "knn")):
                    continue  # on the section's own spots they would copy the spot's own label
                cols = [f"{name}/{n}" for n in names]
                if all(c in part for c in cols) and np.isfinite(part[cols].to_numpy(float)).all():
                    preds[name] = part[cols].to_numpy(float)
            rows += score_rows(preds, part[true_cols].to_numpy(float), names, kind, volume_id=str(vid),
                               condition=(conditions or {}).get(str(vid)), where=f"{split} spots", distance_um=0.0)
    splits = _volume_means(rows, "model")
    held_out = "test" if "test" in splits else "val"
    return {"scores": rows, "splits": splits, "baseline_train_mean": _volume_means(rows, "train_mean"),
            "held_out_split": held_out, "pearson_mean": splits.get(held_out, {}).get("pearson_mean", math.nan)}


def _volume_means(rows: list[dict[str, Any]], predictor: str) -> dict[str, Any]:
    """Per split: one predictor's metrics averaged over volumes (NaN-skipping), spots summed."""
    df = pd.DataFrame([r for r in rows if r["predictor"] == predictor])
    out: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        part = df[df["where"] == f"{split} spots"] if len(df) else df
        if len(part):
            means = part.drop(columns=["volume_id", "condition", "where", "distance_um", "predictor", "n"]).mean(numeric_only=True)
            out[split] = {"n_spots": int(part["n"].sum()), "n_volumes": int(len(part)), **{k: float(v) for k, v in means.items()}}
    return out


def _order(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    if df.empty:
        return df
    df["_w"] = df["where"].map(_WHERE_ORDER).fillna(9)
    df["_d"] = pd.to_numeric(df["distance_um"], errors="coerce").fillna(math.inf)
    return df.sort_values(["_w", "volume_id", "_d"], kind="stable").drop(columns=["_w", "_d"])


def scores_table(rows: Iterable[Mapping[str, Any]], title: str, wheres: Sequence[str] | None = None) -> Table:
    """A rich table, one line per (volume, where, distance): the model's r, R^2, JSD and AUC
    and, beside them, each baseline's r and R^2 (the per-animal mean: R^2 only, its r is n/a
    by construction). Undefined values print as n/a; ``-`` where a predictor does not apply."""
    df = _order(rows)
    if wheres is not None and len(df):
        df = df[df["where"].isin(wheres)]
    table = Table(title=title, title_justify="left")
    if df.empty:
        return table
    present = [p for p in _SHORT if p in set(df["predictor"])]
    extra = [m for m in ("jsd_mean", "macro_auc") if m in df.columns and df.loc[df["predictor"] == "model", m].notna().any()]
    columns: list[tuple[str, str, str]] = []
    for p in present:
        if p != "animal_mean":
            columns.append((p, "pearson_mean", f"{_SHORT[p]} r"))
        if p != "section_extrusion":
            columns.append((p, "r2_mean", f"{_SHORT[p]} R²"))
        if p == "model":
            columns += [(p, m, {"jsd_mean": "JSD", "macro_auc": "AUC"}[m]) for m in extra]
    for name in ("volume", "condition", "where", "µm", "points"):
        table.add_column(name, justify="left" if name in ("volume", "condition", "where") else "right")
    for _, _, label in columns:
        table.add_column(label, justify="right", style="bold" if label.startswith("model") else None)
    for (vid, where, dist), g in df.groupby(["volume_id", "where", "distance_um"], sort=False, dropna=False):
        by = {r["predictor"]: r for _, r in g.iterrows()}
        if "model" not in by:
            continue
        d = "" if not np.isfinite(float(dist)) else f"{float(dist):g}"
        cond = by["model"].get("condition")
        cells = [format_score(by[p].get(m)) if p in by else "-" for p, m, _ in columns]
        table.add_row(str(vid), cond if isinstance(cond, str) else "", str(where), d, str(int(by["model"]["n"])), *cells)
    legend = {"ridge": "ridge: features + ridge on the same patch",
              "extrusion": "extr.: 2D extrusion (nearest training spot in the section plane, copied along the normal)",
              "knn": f"kNN: mean of the {KNN_K} nearest training spots in-plane",
              "animal_mean": "mean: the animal's training-spot mean (the training mean for an animal without a section)",
              "section_extrusion": "all-spot extr.: extrusion from every spot of the section, held-out ones included (a "
                                   "reference with labels the model never saw)"}
    table.caption = ("r: Pearson, R²: coefficient of determination, mean over programs, per volume. "
                     + "; ".join(legend[p] for p in present if p in legend) + ".")  # only the columns shown
    table.caption_justify = "left"
    return table

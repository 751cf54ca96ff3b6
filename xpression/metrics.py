"""Regression metrics on ``(N, T)`` arrays (numpy), per target and averaged, plus each target
kind's own (``TargetKind.metrics``: JSD, dominant accuracy and AUC for compositions).

``regression_metrics`` is the one scoring function of the project: training monitors, held-out
spots, the off-plane probe, swept maps and the benchmark all call it, always on the points of
*one* volume (scores are never pooled across animals: a predictor that only knows which animal a
point is in would otherwise correlate with the truth).

Undefined values: Pearson/Spearman of a column where prediction or target is constant, and R^2 of
a constant target column, have no value. So has a column whose truth *hardly* varies: when the
target's standard deviation over the scored points is below ``min_truth_sd`` (default
``MIN_TRUTH_SD`` = 0.02 target units, i.e. two percentage points of a composition), Pearson,
Spearman and R^2 of that column are undefined too (a correlation with a flat truth measures
noise). Undefined values are reported as ``undefined`` (NaN by default, printed "n/a"; the
training module passes 0.0, "no skill", so a monitored metric stays finite). The ``*_mean``
entries average the defined per-target values; with none defined they are ``undefined`` too.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata

from xpression.data.kinds import get_kind
from xpression.data.kinds import paired as _check
from xpression.data.kinds.composition import js_divergence, macro_auc

__all__ = ["MIN_TRUTH_SD", "format_score", "js_divergence", "macro_auc", "mse_per_target", "pearson_per_target",
           "r2_per_target", "regression_metrics", "spearman_per_target"]

MIN_TRUTH_SD = 0.02
"""Below this standard deviation of the truth (target units) over the scored points, a target's
correlations and R^2 are undefined (n/a)."""


def pearson_per_target(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r of each column ``(T,)``; NaN where either column is constant."""
    p, y = _check(pred, target)
    constant = (np.ptp(p, axis=0) == 0) | (np.ptp(y, axis=0) == 0)
    p = p - p.mean(0)
    y = y - y.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * y).sum(0) / np.sqrt((p * p).sum(0) * (y * y).sum(0))
    r[constant] = np.nan
    return np.clip(r, -1.0, 1.0)


def spearman_per_target(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Spearman rho (Pearson r of average ranks) of each column; NaN where a column is constant."""
    p, y = _check(pred, target)
    return pearson_per_target(rankdata(p, axis=0), rankdata(y, axis=0))


def r2_per_target(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Coefficient of determination ``1 - SS_res / SS_tot`` per column; NaN for a constant target."""
    p, y = _check(pred, target)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    ss_res = ((y - p) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1 - ss_res / ss_tot
    r2[np.ptp(y, axis=0) == 0] = np.nan
    return r2


def mse_per_target(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean squared error per column (target units squared)."""
    p, y = _check(pred, target)
    return ((p - y) ** 2).mean(0)


def _mean(v: np.ndarray, undefined: float) -> float:
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float(undefined)


def regression_metrics(pred: np.ndarray, target: np.ndarray, names: Sequence[str],
                       kind: str = "log_expression", undefined: float = float("nan"),
                       min_truth_sd: float = MIN_TRUTH_SD) -> dict[str, float]:
    """Flat dict of metrics: ``{"pearson_mean", "pearson/<name>", "spearman_*", "r2_*", "mse_*"}``
    and the kind's own metrics (``TargetKind.metrics``; for compositions ``"jsd_mean"`` (bits,
    averaged over spots), ``"dominant_acc"`` (fraction of points whose arg-max program matches)
    and ``"macro_auc"`` (:func:`macro_auc`)).

    Args:
        pred, target: ``(N, T)`` in target units (compositions: rows summing to 1), the points of
            one volume.
        names: the ``T`` target names.
        kind: the target kind.
        undefined: value reported where a correlation or R^2 is undefined (see module docstring).
        min_truth_sd: targets whose truth sd over the points is below this have no correlation
            or R^2 (target units; 0 keeps every non-constant target).
    """
    p, y = _check(pred, target)
    if len(names) != p.shape[1]:
        raise ValueError(f"{len(names)} names for {p.shape[1]} targets")
    flat = y.std(0) < float(min_truth_sd) if len(y) else np.ones(p.shape[1], bool)
    out: dict[str, float] = {}
    for key, fn in (("pearson", pearson_per_target), ("spearman", spearman_per_target),
                    ("r2", r2_per_target), ("mse", mse_per_target)):
        if len(p) < 2 and key != "mse":
            vals = np.full(p.shape[1], np.nan)
        else:
            vals = fn(p, y)
        if key != "mse":
            vals = np.where(flat, np.nan, vals)
        out[f"{key}_mean"] = _mean(vals, undefined)
        for n, v in zip(names, vals):
            out[f"{key}/{n}"] = float(v) if np.isfinite(v) else float(undefined)
    out.update(get_kind(kind).metrics(p, y, undefined))
    return out


def format_score(value: Any, digits: int = 3) -> str:
    """A score for a table: ``n/a`` where it is undefined (NaN / None)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:.{digits}f}" if math.isfinite(v) else "n/a"

"""Does a map know where it is wrong? Its SD and ood channels scored against the truth.

One row per volume (``uncertainty_scores``), on the same points as the accuracy rows:

- ``sd_mean`` / ``abs_error_mean``: mean SD and mean absolute error over points and targets
  (target units: proportions for compositions);
- ``spearman_sd_error``: Spearman correlation, over the volume's points, of the per-point SD
  (mean over targets) with the per-point absolute error (mean over targets); per target
  ``spearman_sd_error/<target>`` and their mean ``spearman_sd_error_targets``;
- ``coverage_2sd``: the fraction of (point, target) pairs whose truth lies within the mean
  +- 2 SD (0.954 for a calibrated Gaussian); per target ``coverage_2sd/<target>``; for a
  calibrated map (``calibrate=true``) ``coverage_2sd_uncalibrated`` is the same with the SD
  divided back by its per-target scale (the members' spread alone);
- ``ood_mean``, ``ood_p95``, ``ood_above_train_p99`` (the fraction of points scoring above the
  training spots' own 99th percentile) and ``spearman_ood_error`` (ood in the score's own units:
  training spreads for ``mahalanobis``, 0-2 for ``knn``);
- ``n_nonfinite_sd`` / ``n_nonfinite_ood``: points whose SD (any target) or ood is NaN or +-inf.
  Every point is scored as it is, none dropped: an infinite ood ranks above every finite one and
  makes ``ood_mean`` (and ``ood_p95`` if it reaches them) inf, a NaN makes the statistics it enters
  NaN, and a logged warning gives the counts.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from scipy.stats import spearmanr

__all__ = ["uncertainty_scores", "UNCERTAINTY_COLUMNS"]

log = logging.getLogger(__name__)

UNCERTAINTY_COLUMNS = ("volume_id", "condition", "trained", "n", "n_nonfinite_sd", "n_nonfinite_ood", "sd_mean", "abs_error_mean", "spearman_sd_error",
                       "spearman_sd_error_targets", "coverage_2sd", "coverage_2sd_uncalibrated", "ood_mean", "ood_p95", "ood_above_train_p99",
                       "spearman_ood_error")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (+-inf rank at the ends; any NaN, fewer than 3 points or a constant: NaN)."""
    if len(a) < 3 or np.isnan(a).any() or np.isnan(b).any() or len(np.unique(a)) < 2 or len(np.unique(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _percentile(x: np.ndarray, q: float) -> float:
    """``np.percentile`` that stays inf where it falls between two +inf (numpy gives NaN there)."""
    with np.errstate(invalid="ignore"):
        p = float(np.percentile(x, q))
    return float("inf") if np.isnan(p) and not np.isnan(x).any() else p


def _count_nonfinite(x: np.ndarray, what: str, where: str) -> int:
    """Points (rows) of ``x`` with any non-finite value, warned about with the count."""
    bad = ~np.isfinite(x) if x.ndim == 1 else ~np.isfinite(x).all(axis=1)
    n = int(bad.sum())
    if n:
        log.warning("uncertainty scores%s: %d of %d points have a non-finite %s (%d +-inf, %d NaN values); all are "
                    "scored (n_nonfinite_%s), so its mean and percentiles may be inf or NaN", where, n, len(x), what,
                    int(np.isinf(x).sum()), int(np.isnan(x).sum()), what)
    return n


def uncertainty_scores(pred: np.ndarray, truth: np.ndarray, names: Sequence[str], sd: np.ndarray | None = None,
                       ood: np.ndarray | None = None, ood_threshold: float | None = None,
                       sd_scale: Sequence[float] | None = None, where: str = "") -> dict:
    """Scores of ``(N, T)`` predictions ``pred`` against ``truth`` with their ``(N, T)`` ``sd``
    and ``(N,)`` ``ood`` (either may be None); ``ood_threshold``: the training spots' 99th
    percentile; ``sd_scale``: the ``(T,)`` calibration factors already in ``sd`` (or None);
    ``where``: the volume, for the warnings. Every one of the ``N`` points is scored (``n``);
    non-finite SD or ood values are counted (``n_nonfinite_sd``, ``n_nonfinite_ood``) and warned
    about, never dropped. Undefined correlations (a constant SD) are NaN."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    err = np.abs(pred - truth)
    where = f" ({where})" if where else ""
    row: dict = {"n": int(len(pred)), "abs_error_mean": float(err.mean()) if err.size else float("nan")}
    if sd is not None:
        sd = np.asarray(sd, np.float64)
        row["n_nonfinite_sd"] = _count_nonfinite(sd, "sd", where)
        row["sd_mean"] = float(sd.mean())
        row["spearman_sd_error"] = _spearman(sd.mean(axis=1), err.mean(axis=1))
        per = [_spearman(sd[:, j], err[:, j]) for j in range(len(names))]
        row["spearman_sd_error_targets"] = float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
        row["coverage_2sd"] = float(np.mean(err <= 2 * sd))
        if sd_scale is not None:
            row["coverage_2sd_uncalibrated"] = float(np.mean(err <= 2 * sd / np.asarray(sd_scale, np.float64)))
        for j, t in enumerate(names):
            row[f"spearman_sd_error/{t}"] = per[j]
            row[f"coverage_2sd/{t}"] = float(np.mean(err[:, j] <= 2 * sd[:, j]))
    if ood is not None:
        ood = np.asarray(ood, np.float64)
        row["n_nonfinite_ood"] = _count_nonfinite(ood, "ood", where)
        with np.errstate(invalid="ignore"):
            row["ood_mean"] = float(ood.mean())
        row["ood_p95"] = _percentile(ood, 95)
        if ood_threshold is not None:
            row["ood_above_train_p99"] = float(np.mean(ood > ood_threshold))
        row["spearman_ood_error"] = _spearman(ood, err.mean(axis=1))
    return row

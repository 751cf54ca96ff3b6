"""``composition``: proportions of each point that sum to 1 (programs, cell types)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata

from xpression.data.geometry import DataError
from xpression.data.kinds import TargetKind, paired, refuse_negative, register_kind

__all__ = ["Composition", "SUM_TOLERANCE", "js_divergence", "macro_auc"]

SUM_TOLERANCE = 1e-3  # |row sum - 1| accepted as a composition (float32 scores round)


def js_divergence(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence per row ``(N,)`` in bits (0..1); rows are renormalised to sum 1."""
    p, y = paired(pred, target)
    p = np.clip(p, 0, None)
    y = np.clip(y, 0, None)
    p = p / np.maximum(p.sum(1, keepdims=True), 1e-300)
    y = y / np.maximum(y.sum(1, keepdims=True), 1e-300)
    m = 0.5 * (p + y)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(a > 0, a * np.log2(a / np.where(b > 0, b, 1)), 0.0)
        return t.sum(1)

    return np.clip(0.5 * kl(p, m) + 0.5 * kl(y, m), 0.0, 1.0)


def macro_auc(pred: np.ndarray, target: np.ndarray) -> float:
    """One-vs-rest ROC AUC on the dominant program, averaged over the programs that are dominant
    at some but not all points: for program ``k`` the positives are the points whose true
    arg-max is ``k`` and the score is the predicted value of ``k`` (ties count half, as in
    scikit-learn's ``roc_auc_score``). NaN when no program qualifies (e.g. one program
    dominates everywhere)."""
    p, y = paired(pred, target)
    dominant = y.argmax(1)
    aucs = []
    for k in range(p.shape[1]):
        pos = dominant == k
        n_pos = int(pos.sum())
        n_neg = len(p) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = rankdata(p[:, k])  # Mann-Whitney U from average ranks
        aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else math.nan


class Composition(TargetKind):
    name = "composition"
    default_loss = "kl"
    value_label = "proportion"
    parts_of_whole = True

    def activate(self, raw: Any, dim: int = 1) -> Any:
        import torch

        return torch.softmax(raw, dim=dim)

    def activate_numpy(self, values: np.ndarray) -> np.ndarray:
        """Negative predictions clipped to 0, rows rescaled to sum 1."""
        pred = np.clip(values, 0.0, None)
        return pred / np.maximum(pred.sum(1, keepdims=True), 1e-12)

    def check_declared(self, values: np.ndarray, where: object, what: str) -> None:
        refuse_negative(values, where, what, "proportions cannot be negative: for signed scores use target.kind=log_expression")
        off = np.abs(values.sum(axis=1) - 1.0) > SUM_TOLERANCE
        if off.any():
            sums = values.sum(axis=1)[off]
            raise DataError(where, f"{what}, but {int(off.sum())} of {len(values)} spots' values do not sum to 1 "
                            f"(sums from {sums.min():.4g} to {sums.max():.4g}); set target.renormalize=true to scale "
                            "each spot to proportions, or target.kind=log_expression")

    def dominant(self, values: np.ndarray) -> np.ndarray:
        """The largest proportion."""
        return np.asarray(values, dtype=np.float64).argmax(axis=1).astype(np.int64)

    def metrics(self, pred: np.ndarray, target: np.ndarray, undefined: float = float("nan")) -> dict[str, float]:
        """``jsd_mean`` (bits, averaged over points), ``dominant_acc`` (share of points whose
        arg-max target matches) and ``macro_auc`` (:func:`macro_auc`)."""
        p, y = paired(pred, target)
        out = {"jsd_mean": float(js_divergence(p, y).mean()) if len(p) else float(undefined),
               "dominant_acc": float((p.argmax(1) == y.argmax(1)).mean()) if len(p) else float(undefined)}
        auc = macro_auc(p, y) if len(p) else math.nan
        out["macro_auc"] = auc if np.isfinite(auc) else float(undefined)
        return out


register_kind(Composition())

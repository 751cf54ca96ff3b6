"""Evaluation: baselines without CT (``baselines``), per-volume scores of a run (``scores``,
``generalisation``, ``maps``), the benchmark report and its figures. The metrics themselves are
``xpression.metrics`` (the training module logs them too); they are re-exported here."""

from xpression.metrics import (MIN_TRUTH_SD, format_score, js_divergence, macro_auc, mse_per_target,
                               pearson_per_target, r2_per_target, regression_metrics, spearman_per_target)

__all__ = ["regression_metrics", "pearson_per_target", "spearman_per_target", "r2_per_target",
           "mse_per_target", "js_divergence", "macro_auc", "format_score", "MIN_TRUTH_SD"]

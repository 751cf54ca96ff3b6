"""Evaluation: metrics (``metrics``); benchmark tables and figures live beside it."""

from xpression.evaluation.metrics import (js_divergence, mse_per_target, pearson_per_target,
                                          r2_per_target, regression_metrics, spearman_per_target)

__all__ = ["regression_metrics", "pearson_per_target", "spearman_per_target", "r2_per_target",
           "mse_per_target", "js_divergence"]

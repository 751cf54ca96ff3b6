"""What a target kind is: the contract every kind file fills in (see ``xpression.data.kinds``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from xpression.data.geometry import DataError
from xpression.registry import Registry

__all__ = ["KINDS", "TargetKind", "get_kind", "paired", "refuse_negative"]

KINDS: Registry["TargetKind"] = Registry("target kind")


def get_kind(kind: "str | TargetKind") -> "TargetKind":
    """The registered kind named ``kind`` (a kind object is returned as is)."""
    return kind if isinstance(kind, TargetKind) else KINDS.get(kind)


def paired(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` and ``target`` as float64 ``(N, T)`` arrays of one shape (1D: one target)."""
    p = np.asarray(pred, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if p.ndim == 1:
        p, y = p[:, None], y[:, None] if y.ndim == 1 else y
    if p.shape != y.shape or p.ndim != 2:
        raise ValueError(f"pred and target must both be (N, T), got {p.shape} and {y.shape}")
    return p, y


def refuse_negative(values: np.ndarray, where: object, what: str, hint: str) -> None:
    """Raise :class:`DataError` for negative entries beyond float round-off (1e-6 of the largest value)."""
    tolerance = 1e-6 * float(np.abs(values).max(initial=0.0))
    negative = values < -tolerance
    if negative.any():
        rows = int(negative.any(axis=1).sum())
        raise DataError(where, f"{what}: {rows} of {len(values)} spots have negative values (min {values.min():.4g}); {hint}")


class TargetKind:
    """How one kind of target is predicted, trained, checked, scored and drawn.

    Subclass it in a new file of ``xpression/data/kinds/`` and register an instance with
    ``KINDS.register(name, Kind())``. Attributes: ``name``; ``default_loss`` (a registered loss
    name, ``loss=auto``); ``value_label`` (axis label of maps and figures); ``parts_of_whole``
    (values of one point sum to 1: figures stack them).
    """

    name = "kind"
    default_loss = "mse"
    value_label = "value"
    parts_of_whole = False

    def activate(self, raw: Any, dim: int = 1) -> Any:
        """Raw head outputs (torch) -> values in target units along ``dim``."""
        return raw

    def activate_numpy(self, values: np.ndarray) -> np.ndarray:
        """Predictions of a model without a head (the ridge baseline) made valid for this kind,
        ``(N, T)`` -> ``(N, T)``."""
        return values

    def check_declared(self, values: np.ndarray, where: object, what: str) -> None:
        """Raise :class:`DataError` when ``values`` (N, T), used as they are, are not of this kind."""

    def dominant(self, values: np.ndarray) -> np.ndarray:
        """Index of each row's dominant target (N,): the largest column z-score."""
        v = np.asarray(values, dtype=np.float64)
        v = (v - v.mean(axis=0)) / (v.std(axis=0) + 1e-12)
        return v.argmax(axis=1).astype(np.int64)

    def metrics(self, pred: np.ndarray, target: np.ndarray, undefined: float = float("nan")) -> dict[str, float]:
        """Metrics of this kind beside the per-target correlations, R^2 and MSE every kind gets
        (``xpression.metrics.regression_metrics``); ``undefined`` where one cannot be computed."""
        return {}

    def __repr__(self) -> str:
        return f"<target kind {self.name}>"

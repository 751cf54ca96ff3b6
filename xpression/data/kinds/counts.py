"""``counts``: raw non-negative counts (count losses such as ``poisson``), softplus rates."""

from __future__ import annotations

import numpy as np

from xpression.data.kinds import TargetKind, refuse_negative, register_kind

__all__ = ["Counts"]


class Counts(TargetKind):
    name = "counts"
    default_loss = "poisson"

    def activate(self, raw, dim: int = 1):
        import torch.nn.functional as F

        return F.softplus(raw)

    def check_declared(self, values: np.ndarray, where: object, what: str) -> None:
        refuse_negative(values, where, what, "counts cannot be negative; use target.kind=log_expression")


register_kind(Counts())

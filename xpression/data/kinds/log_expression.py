"""``log_expression``: log-normalised expression (or any signed score), used as it is."""

from __future__ import annotations

from xpression.data.kinds import TargetKind, register_kind

__all__ = ["LogExpression"]


class LogExpression(TargetKind):
    name = "log_expression"
    default_loss = "mse"


register_kind(LogExpression())

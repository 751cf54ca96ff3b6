"""Target heads: a linear layer plus the activation that matches the target kind.

=================  ==========  =====================================================
kind               activation  raw output kept for
=================  ==========  =====================================================
composition        softmax     logits (``kl`` uses ``log_softmax`` on them)
log_expression     identity    -
counts             softplus    -
=================  ==========  =====================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xpression.models.targets import KINDS


def activate(raw: torch.Tensor, kind: str, dim: int = 1) -> torch.Tensor:
    """Map raw head outputs to target units (``dim`` is the target axis)."""
    if kind == "composition":
        return torch.softmax(raw, dim=dim)
    if kind == "log_expression":
        return raw
    if kind == "counts":
        return F.softplus(raw)
    raise ValueError(f"unknown target kind {kind!r}; valid kinds: {', '.join(KINDS)}")


class Head(nn.Module):
    """``Linear(num_features, num_targets)``; ``forward`` gives raw outputs, ``activate`` targets."""

    def __init__(self, num_features: int, num_targets: int, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown target kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        self.kind = kind
        self.fc = nn.Linear(num_features, num_targets)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` -> raw ``(B, T)``."""
        return self.fc(features)

    def dense(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(B, F, *spatial)`` -> raw ``(B, T, *spatial)``: the same layer at every position."""
        return torch.movedim(self.fc(torch.movedim(fmap, 1, -1)), -1, 1)

    def activate(self, raw: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return activate(raw, self.kind, dim)

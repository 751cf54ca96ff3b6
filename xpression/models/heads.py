"""Target heads: a linear layer plus the activation of the target kind (``xpression.data.kinds``:
softmax for compositions, identity for log expression, softplus for counts). Raw outputs are kept
for the losses (``kl`` uses ``log_softmax`` on a composition's logits)."""

from __future__ import annotations

import torch
from torch import nn

from xpression.data.kinds import get_kind


def activate(raw: torch.Tensor, kind: str, dim: int = 1) -> torch.Tensor:
    """Map raw head outputs to target units (``dim`` is the target axis)."""
    return get_kind(kind).activate(raw, dim=dim)


class Head(nn.Module):
    """``Linear(num_features, num_targets)``; ``forward`` gives raw outputs, ``activate`` targets."""

    def __init__(self, num_features: int, num_targets: int, kind: str) -> None:
        super().__init__()
        self._kind = get_kind(kind)  # ValueError naming the registered kinds
        self.kind = kind
        self.fc = nn.Linear(num_features, num_targets)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` -> raw ``(B, T)``."""
        return self.fc(features)

    def dense(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(B, F, *spatial)`` -> raw ``(B, T, *spatial)``: the same layer at every position."""
        return torch.movedim(self.fc(torch.movedim(fmap, 1, -1)), -1, 1)

    def activate(self, raw: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return self._kind.activate(raw, dim=dim)

"""Exponential moving average of a network's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copy of ``net`` whose parameters follow ``decay * ema + (1 - decay) * net``.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates so the
    average is not dominated by the initial weights. Buffers (BatchNorm statistics) are copied.
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.net = copy.deepcopy(net)
        self.net.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        n = int(self.num_updates)
        d = min(self.decay, (1 + n) / (10 + n))
        for e, p in zip(self.net.parameters(), net.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.net.buffers(), net.buffers()):
            e.copy_(b)
        self.num_updates += 1

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.net(*args, **kwargs)

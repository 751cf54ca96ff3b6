"""Losses on raw head outputs ``(B, T)`` and targets ``(B, T)``, with a registry.

Every loss is built for one target kind and takes the head's *raw* output (logits for
compositions), applying the kind's activation itself; ``kl`` uses ``log_softmax`` for stability.

========  ===================================  =============================================
name      accepts                              value
========  ===================================  =============================================
kl        composition                          mean_b sum_t y log(y / p)   (0 log 0 = 0)
mse       all kinds                            mean (p - y)^2
huber     all kinds                            mean Huber_delta(p - y)
poisson   counts                               mean p - y log(p + eps)  (p = softplus(raw))
pearson   all kinds                            mean_t (1 - r_t), r_t across the batch
mix       the kinds all its terms accept       sum_i w_i loss_i
========  ===================================  =============================================
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xpression.data.kinds import get_kind
from xpression.registry import Registry

LOSSES: Registry[type["Loss"]] = Registry("loss")


def register_loss(name: str) -> Callable[[type["Loss"]], type["Loss"]]:
    def deco(cls: type[Loss]) -> type[Loss]:
        cls.name = name
        LOSSES.register(name, cls)
        return cls

    return deco


def list_losses() -> list[str]:
    """Sorted names of the registered losses."""
    return LOSSES.names()


class LossKindError(ValueError):
    """A loss chosen for a kind of target it does not fit (an input error: one line, no traceback)."""


class Loss(nn.Module):
    """Base class: checks ``kind`` against ``accepts`` (None: every kind) at construction."""

    name = "loss"
    accepts: tuple[str, ...] | None = None

    def __init__(self, kind: str) -> None:
        super().__init__()
        self._kind = get_kind(kind)
        if self.accepts is not None and kind not in self.accepts:
            raise LossKindError(f"loss {self.name!r} accepts targets of kind {list(self.accepts)}, not {kind!r}: "
                                "choose another loss= (loss=auto picks the kind's own)")
        self.kind = kind

    def pred(self, raw: torch.Tensor) -> torch.Tensor:
        return self._kind.activate(raw, dim=1)


@register_loss("kl")
class KLLoss(Loss):
    """KL(target || prediction) per spot, summed over programs, averaged over the batch."""

    accepts = ("composition",)

    def forward(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(raw, dim=1)
        return (torch.xlogy(target, target) - target * logp).sum(1).mean()


@register_loss("mse")
class MSELoss(Loss):
    def forward(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.pred(raw), target)


@register_loss("huber")
class HuberLoss(Loss):
    """Huber with threshold ``delta`` (target units)."""

    def __init__(self, kind: str, delta: float = 1.0) -> None:
        super().__init__(kind)
        self.delta = float(delta)

    def forward(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(self.pred(raw), target, delta=self.delta)


@register_loss("poisson")
class PoissonLoss(Loss):
    """Poisson negative log-likelihood (without the log y! constant), rate ``softplus(raw)``."""

    accepts = ("counts",)

    def __init__(self, kind: str, eps: float = 1e-8) -> None:
        super().__init__(kind)
        self.eps = float(eps)

    def forward(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rate = self.pred(raw)
        return (rate - target * torch.log(rate + self.eps)).mean()


@register_loss("pearson")
class PearsonLoss(Loss):
    """``1 - r`` per target across the batch, averaged over targets. ``eps`` guards a constant
    column (its ``r`` is then ~0). Needs a batch of at least 2."""

    def __init__(self, kind: str, eps: float = 1e-8) -> None:
        super().__init__(kind)
        self.eps = float(eps)

    def forward(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = self.pred(raw)
        p = p - p.mean(0)
        y = target - target.mean(0)
        r = (p * y).sum(0) / torch.sqrt((p * p).sum(0) * (y * y).sum(0) + self.eps)
        return (1 - r).mean()


@register_loss("mix")
class MixLoss(Loss):
    """Weighted sum of losses: ``terms=[{"name": "kl", "weight": 1.0}, {"name": "pearson",
    "weight": 0.1}]``; any other keys of a term go to that loss."""

    def __init__(self, kind: str, terms: Sequence[Mapping[str, Any]]) -> None:
        nn.Module.__init__(self)
        if not terms:
            raise ValueError("loss 'mix' needs at least one term")
        self.kind = kind
        self.weights = [float(t.get("weight", 1.0)) for t in terms]
        self.terms = nn.ModuleList(
            build_loss({k: v for k, v in t.items() if k != "weight"}, kind) for t in terms)

    def forward(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * term(raw, target) for w, term in zip(self.weights, self.terms))


def build_loss(cfg: str | Mapping[str, Any] | None, kind: str, **kwargs: Any) -> Loss:
    """A loss for targets of ``kind`` from a name or ``{"name": ..., **kwargs}``.

    ``None`` or the name ``"auto"`` picks the kind's default (``TargetKind.default_loss``: kl /
    mse / poisson). Unknown names and kinds the loss cannot take raise ``ValueError``.
    """
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    cfg = {**dict(cfg or {}), **kwargs}
    name = cfg.pop("name", None)
    if name in (None, "auto"):
        name = get_kind(kind).default_loss
    return LOSSES.get(name)(kind=kind, **cfg)

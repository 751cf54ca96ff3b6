"""``XPressionNet``: a backbone and a target head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xpression.models.backbones import create_backbone
from xpression.models.heads import Head


class XPressionNet(nn.Module):
    """``forward(x: (B, 1, D, H, W)) -> (B, T)`` predictions in target units.

    ``forward_features`` gives ``(B, F)``, ``forward_head`` the raw ``(B, T)`` (logits for
    compositions), ``head.activate`` the predictions. ``dense_forward`` runs the backbone over a
    larger input where the backbone supports it (see ``xpression.models.backbones``).
    """

    def __init__(self, backbone: nn.Module, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def kind(self) -> str:
        return self.head.kind

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        return tuple(self.backbone.patch_shape)  # type: ignore[return-value]

    @property
    def dense_equivalent(self) -> bool:
        return bool(getattr(self.backbone, "dense_equivalent", False))

    @property
    def output_stride(self) -> Any:
        return getattr(self.backbone, "output_stride", None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.activate(self.forward_raw(x))

    def dense_forward(self, x: torch.Tensor, raw: bool = False, **kwargs: Any) -> torch.Tensor:
        """Predictions over a larger input: ``(B, T, d, h, w)`` (cnn3d) or ``(B, T, H', W')`` (unet).

        ``kwargs`` go to the backbone's ``dense_features`` (e.g. ``spot_average`` for unet).
        """
        if not hasattr(self.backbone, "dense_features"):
            raise NotImplementedError(
                f"{type(self.backbone).__name__} has no dense mode; predict patch by patch")
        out = self.head.dense(self.backbone.dense_features(x, **kwargs))
        return out if raw else self.head.activate(out, dim=1)


def build_net(backbone: dict[str, Any], target_spec: Any, patch_shape: Any,
              spot_radius_vox: float | None = None) -> XPressionNet:
    """``XPressionNet`` from a backbone config ``{"name": ..., **kwargs}`` and a ``TargetSpec``.

    ``patch_shape`` is ``(D, H, W)`` voxels; ``spot_radius_vox`` (in-plane voxels) is passed to
    the families that use it (unet).
    """
    cfg = dict(backbone)
    if "name" not in cfg:
        raise ValueError(f"backbone config needs a 'name', got keys {sorted(cfg)}")
    name = cfg.pop("name")
    bb = create_backbone(name, patch_shape=tuple(int(s) for s in patch_shape),
                         spot_radius_vox=spot_radius_vox, **cfg)
    return XPressionNet(bb, Head(bb.num_features, len(target_spec.names), target_spec.kind))

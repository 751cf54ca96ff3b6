"""``multiscale``: two encoders, one on the fine patch and one on its context view.

The input is ``(B, 2, D, H, W)``: channel 0 the full-resolution patch, channel 1 the wide,
coarse view around the same centre on the same voxel grid shape (``patch.context_um``;
:class:`xpression.data.context.ContextView`). Each channel goes through its own backbone (any
registered family, e.g. ``cnn3d`` or ``resnet3d``; the context encoder is the fine one's
architecture with its own weights unless ``context`` names another) and the pooled features are
concatenated before the head. There is no dense mode: the context view is not a sliding window
of the fine grid, so the sweep predicts patch by patch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from xpression.models.registry import register_backbone


@register_backbone("multiscale")
class MultiScale(nn.Module):
    """``forward_features(x: (B, 2, D, H, W)) -> (B, F_fine + F_context)``.

    Args:
        patch_shape: ``(D, H, W)`` voxels of the patch and of the context view.
        fine: the patch encoder's backbone config ``{"name": ..., **kwargs}``.
        context: the context encoder's config; None = the same as ``fine`` (own weights).
        spot_radius_vox: passed on to families that take it.
    """

    views = 2  # input channels: the patch, then its context view

    def __init__(self, patch_shape: Sequence[int], fine: Mapping[str, Any], context: Mapping[str, Any] | None = None,
                 spot_radius_vox: float | None = None) -> None:
        super().__init__()
        from xpression.models.backbones import create_backbone  # the package imports this module

        def build(cfg: Mapping[str, Any], role: str) -> nn.Module:
            cfg = dict(cfg)
            name = cfg.pop("name", None)
            if name is None or name == "multiscale":
                raise ValueError(f"multiscale backbone: '{role}' needs the 'name' of a single-view backbone, got {name!r}")
            return create_backbone(name, patch_shape=tuple(int(s) for s in patch_shape), spot_radius_vox=spot_radius_vox, **cfg)

        self.fine = build(fine, "fine")
        self.context = build(fine if context is None else context, "context")
        self.patch_shape = tuple(self.fine.patch_shape)
        self.num_features = int(self.fine.num_features) + int(self.context.num_features)
        self.dense_equivalent = False
        self.output_stride = None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 2:
            raise ValueError(f"multiscale backbone expects (B, 2, D, H, W) (patch, context view), got {tuple(x.shape)}")
        return torch.cat([self.fine.forward_features(x[:, :1]), self.context.forward_features(x[:, 1:])], dim=1)

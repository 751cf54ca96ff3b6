"""Any timm image model over a CT patch, its ``D`` depth slices used as input channels."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from xpression.models.registry import register_backbone


def make_timm(model_name: str, in_chans: int, weights: str | Path | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that never downloads: random init unless ``weights`` is a local file."""
    if weights is None:
        return timm.create_model(model_name, pretrained=False, in_chans=in_chans, **kwargs)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file for {model_name!r} not found: {path}")
    # timm adapts the first conv to in_chans and drops a mismatched classifier.
    return timm.create_model(model_name, pretrained=True, in_chans=in_chans,
                             pretrained_cfg_overlay={"file": str(path)}, **kwargs)


def fit_size(hw: tuple[int, int], divisor: int, fit: str, what: str) -> tuple[int, int]:
    """In-plane size the model gets: ``hw`` itself, or a multiple of ``divisor``: the next one up
    for ``fit="pad"``, the nearest one for ``fit="resize"``."""
    if all(s % divisor == 0 for s in hw):
        return hw
    if fit == "error":
        raise ValueError(
            f"{what} needs H and W divisible by {divisor}, but the patch is {hw[0]}x{hw[1]} voxels; "
            f"choose a patch size that is a multiple of {divisor} voxels, a model patch size that "
            f"divides it (model_kwargs: {{patch_size: ...}}), or fit='pad' / fit='resize'")
    rnd = math.ceil if fit == "pad" else round
    return tuple(max(divisor, int(rnd(s / divisor)) * divisor) for s in hw)  # type: ignore[return-value]


def adapt_input(x: torch.Tensor, size: tuple[int, int], fit: str) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, *size)`` by zero padding (centred) or bilinear resizing."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if fit == "resize":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    dh, dw = size[0] - h, size[1] - w
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


def dry_run(model: nn.Module, shape: Sequence[int], what: str) -> Any:
    """Run a zero input once so a too-small patch fails at construction, not mid-training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(1, *shape))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ValueError(f"patch of {tuple(shape)} (channels=depth slices, H, W voxels) does not fit "
                         f"{what}: {e}") from e
    finally:
        model.train(was_training)


@register_backbone("timm")
class TimmBackbone(nn.Module):
    """A timm model (``num_classes=0``: pooled features) with ``in_chans = D``.

    Args:
        patch_shape: ``(D, H, W)`` voxels.
        model_name: a timm model, e.g. ``resnet18``, ``convnext_atto``, ``efficientnet_b0``,
            ``vit_tiny_patch16_224`` (built with ``img_size`` = the in-plane patch size).
        weights: optional local checkpoint file (timm/torch state dict); nothing is downloaded.
        fit: when the model needs H, W divisible by its patch size: ``"error"``, ``"pad"`` (zeros,
            centred, up to the next multiple) or ``"resize"`` (bilinear, to the nearest multiple).
        drop_rate: classifier-input dropout passed to timm.
        model_kwargs: extra keyword arguments for ``timm.create_model``.
    """

    dense_equivalent = False
    output_stride = None

    def __init__(self, patch_shape: Sequence[int], model_name: str = "resnet18",
                 weights: str | None = None, fit: str = "error", drop_rate: float = 0.0,
                 model_kwargs: dict | None = None) -> None:
        super().__init__()
        if fit not in ("error", "pad", "resize"):
            raise ValueError(f"fit must be 'error', 'pad' or 'resize', got {fit!r}")
        d, h, w = (int(s) for s in patch_shape)
        self.patch_shape = (d, h, w)
        self.fit = fit
        kw = dict(num_classes=0, drop_rate=drop_rate, **(model_kwargs or {}))
        self.input_size = (h, w)
        try:
            model = make_timm(model_name, d, weights, img_size=self.input_size, **kw)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            model = make_timm(model_name, d, weights, **kw)
        else:
            ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
            if ps is not None:
                size = fit_size(self.input_size, int(max(ps)), fit, model_name)
                if size != self.input_size:
                    self.input_size = size
                    model = make_timm(model_name, d, weights, img_size=size, **kw)
        self.model = model
        self.num_features = int(model.num_features)
        dry_run(self.model, (d, *self.input_size), f"timm model {model_name!r}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> ``(B, num_features)``."""
        return self.model(adapt_input(x[:, 0], self.input_size, self.fit))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

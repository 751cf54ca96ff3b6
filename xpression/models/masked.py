"""Masked-volume reconstruction: a backbone's encoder learns what the CT shows without labels.

Random 3D blocks of a CT patch are blanked (set to 0), the backbone encodes the rest into its
``(B, num_features)`` features (the very features a target head reads after fine-tuning), and a
light decoder rebuilds the whole patch from them; the loss is the mean squared error over the
blanked voxels only. Any registered backbone works, as the decoder needs only its features.

The decoder: one linear layer from the features to a coarse ``channels x D x ceil(H/4) x
ceil(W/4)`` map, a 3x3x3 convolution there, a 1x1x1 convolution to one channel, then trilinear
upsampling to the patch (about 1 M parameters for a 9 x 33 x 33 patch; it is dropped after
pretraining), added to the patch's mean over its visible voxels (:func:`visible_mean`): it
starts near zero, so the loss starts near where a mean fill is and falls only as far as the
encoder's features describe the blanked structure.

An encoder checkpoint (:func:`save_encoder`) holds the backbone's weights under ``backbone.``
and, under :data:`ENCODER_KEY`, the backbone config, patch and input normalisation it was
pretrained with. ``XPressionModule(init_from=<it>)`` loads it into its backbone (the target head
starts fresh) through :func:`load_encoder`, which refuses another backbone in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xpression.models.backbones import create_backbone

__all__ = ["ENCODER_KEY", "InitFromError", "MaskedReconstruction", "block_mask", "load_encoder", "save_encoder",
           "visible_mean"]

ENCODER_KEY = "xpression_pretrained_encoder"  # marks a checkpoint holding an encoder only


class InitFromError(ValueError):
    """An ``init_from`` checkpoint that does not fit the run's network or targets."""


def block_mask(batch: int, patch_shape: Sequence[int], block_vox: Sequence[int], ratio: float,
               generator: torch.Generator) -> torch.Tensor:
    """``(batch, 1, D, H, W)`` bool, True where a voxel is blanked: the patch tiled by
    ``block_vox`` blocks (z, y, x voxels; the last ones cut by the patch's edge), each blanked
    with probability ``ratio``; every patch keeps at least one blanked and one visible block."""
    shape = [int(s) for s in patch_shape]
    block = [max(1, min(int(b), s)) for b, s in zip(block_vox, shape)]
    grid = [-(-s // b) for s, b in zip(shape, block)]
    n = grid[0] * grid[1] * grid[2]
    keep = torch.rand(batch, n, generator=generator) < float(ratio)
    if n > 1:  # never all blanked, never none: one block of each, forced at random positions
        order = torch.rand(batch, n, generator=generator).argsort(dim=1)
        rows = torch.arange(batch)
        keep[rows, order[:, 0]] = True
        keep[rows, order[:, 1]] = False
    coarse = keep.view(batch, 1, *grid)
    for axis, b in enumerate(block):
        coarse = coarse.repeat_interleave(b, dim=axis + 2)
    return coarse[:, :, : shape[0], : shape[1], : shape[2]]


def visible_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, 1, 1, 1, 1)``: each patch's mean over its visible voxels (``mask`` False)."""
    seen = (~mask).to(x.dtype)
    return (x * seen).sum((1, 2, 3, 4), keepdim=True) / seen.sum((1, 2, 3, 4), keepdim=True).clamp_min(1.0)


class MaskedReconstruction(nn.Module):
    """A backbone (``backbone_cfg``: ``{"name": ..., **kwargs}`` as in ``conf/model/backbone/``)
    built for ``patch_shape`` (D, H, W voxels) and the decoder of the module doc.

    ``forward(x, mask)`` -> the reconstruction ``(B, 1, D, H, W)`` of ``x`` from its visible voxels;
    :meth:`loss` -> the mean squared error over the blanked voxels.
    """

    def __init__(self, backbone_cfg: Mapping[str, Any], patch_shape: Sequence[int], decoder_channels: int = 16) -> None:
        super().__init__()
        cfg = dict(backbone_cfg)
        if "name" not in cfg:
            raise ValueError(f"backbone config needs a 'name', got keys {sorted(cfg)}")
        self.backbone_cfg = dict(cfg)
        self.patch_shape = tuple(int(s) for s in patch_shape)
        self.backbone = create_backbone(cfg.pop("name"), patch_shape=self.patch_shape, **cfg)
        d, h, w = self.patch_shape
        self.coarse = (d, -(-h // 4), -(-w // 4))
        c = int(decoder_channels)
        self.decoder = nn.ModuleDict({
            "expand": nn.Linear(int(self.backbone.num_features), c * self.coarse[0] * self.coarse[1] * self.coarse[2]),
            "mix": nn.Conv3d(c, c, 3, padding=1),
            "out": nn.Conv3d(c, 1, 1),
        })
        self.decoder_channels = c
        # the decoder adds detail to each patch's visible mean, starting from almost none: the loss
        # starts near what filling with the mean gives and falls only as the features carry
        # structure (not zero: gradients reach the encoder from the first step)
        nn.init.normal_(self.decoder["out"].weight, std=0.01)
        nn.init.zeros_(self.decoder["out"].bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        visible = x.masked_fill(mask, 0.0)
        features = self.backbone.forward_features(visible)
        coarse = F.gelu(self.decoder["expand"](features)).view(len(x), self.decoder_channels, *self.coarse)
        coarse = self.decoder["out"](F.gelu(self.decoder["mix"](coarse)))
        detail = F.interpolate(coarse, size=self.patch_shape, mode="trilinear", align_corners=False)
        return visible_mean(visible, mask) + detail

    def loss(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the reconstruction over the blanked voxels of ``mask``."""
        err = (self(x, mask) - x).square()
        return err[mask].mean()


def save_encoder(path: str | Path, model: MaskedReconstruction, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s backbone as an encoder checkpoint (``meta``: what it was pretrained on,
    recorded beside the backbone config and patch); the file must not exist yet."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; pretraining never overwrites a checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**dict(meta), "backbone": dict(model.backbone_cfg), "patch_shape": list(model.patch_shape)}
    state = {f"backbone.{k}": v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({ENCODER_KEY: record, "state_dict": state,
                "decoder": {k: v.detach().cpu() for k, v in model.decoder.state_dict().items()}}, tmp)
    tmp.replace(path)
    return path


def load_encoder(backbone: nn.Module, checkpoint: Mapping[str, Any], path: str | Path,
                 backbone_cfg: Mapping[str, Any], patch_shape: Sequence[int]) -> None:
    """Copy an encoder checkpoint's weights (:func:`save_encoder`) into ``backbone``.

    Raises :class:`InitFromError` (one line) when ``backbone`` (built from ``backbone_cfg`` for
    ``patch_shape``) is another family or does not take every tensor with its shape.
    """
    record = checkpoint[ENCODER_KEY]
    src_cfg, src_patch = dict(record.get("backbone", {})), list(record.get("patch_shape", []))
    state = {k[len("backbone."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if src_cfg.get("name") != backbone_cfg.get("name") or missing or unexpected or reshaped:
        first = (f"{reshaped[0]} is {tuple(state[reshaped[0]].shape)} there, {tuple(own[reshaped[0]].shape)} here"
                 if reshaped else f"{(missing or unexpected or ['the family'])[0]} differs")
        raise InitFromError(
            f"init_from {path}: the encoder was pretrained as backbone {src_cfg} on a {src_patch}-voxel patch and does "
            f"not fit this run's backbone {dict(backbone_cfg)} on a {list(patch_shape)}-voxel patch "
            f"({len(missing)} missing, {len(unexpected)} extra, {len(reshaped)} reshaped tensors; {first}); "
            f"pretrain with the same model= and patch")
    backbone.load_state_dict(state, strict=True)

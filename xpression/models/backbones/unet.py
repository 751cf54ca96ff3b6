"""A 2D U-Net over a patch's depth slices: dense feature maps of the central plane."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xpression.models.backbones.timm2d import dry_run, make_timm
from xpression.models.registry import register_backbone


def disk_mask(hw: tuple[int, int], radius_vox: float) -> torch.Tensor:
    """Boolean ``(H, W)`` mask of the voxels whose centres lie within ``radius_vox`` of the centre."""
    h, w = hw
    yy = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
    xx = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
    return (yy[:, None] ** 2 + xx[None, :] ** 2) <= float(radius_vox) ** 2


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


@register_backbone("unet")
class UNet(nn.Module):
    """timm encoder (``features_only``, ``in_chans = D``) plus a light upsampling decoder.

    ``dense_features`` maps ``(B, 1, D, H', W')`` to ``(B, F, H', W')`` over the central plane at
    every in-plane voxel; ``forward_features`` averages that map over the spot's disk at the patch
    centre, which is how a spot's measured value is modelled in training. The head is linear, so
    averaging features equals averaging the head's pre-activation outputs.

    Args:
        patch_shape: ``(D, H, W)`` voxels.
        spot_radius_vox: spot radius in in-plane voxels (e.g. 27.5 um / voxel size in um).
        encoder: timm model name used with ``features_only=True``.
        decoder_channels: channels of each decoder stage, deepest first (an int: all stages).
        weights: optional local encoder checkpoint; nothing is downloaded.
        out_indices: encoder stages to use (timm ``out_indices``); default all.
    """

    dense_equivalent = False
    output_stride = (1, 1, 1)

    def __init__(self, patch_shape: Sequence[int], spot_radius_vox: float | None = None,
                 encoder: str = "resnet18", decoder_channels: int | Sequence[int] = 32,
                 weights: str | None = None, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        d, h, w = (int(s) for s in patch_shape)
        self.patch_shape = (d, h, w)
        if spot_radius_vox is None or spot_radius_vox <= 0:
            raise ValueError("unet needs spot_radius_vox > 0 (the spot radius in in-plane voxels)")
        if 2 * spot_radius_vox > min(h, w):
            raise ValueError(f"the spot disk (radius {spot_radius_vox} voxels) does not fit in the "
                             f"{h}x{w} patch plane; use a larger patch")
        self.spot_radius_vox = float(spot_radius_vox)
        kw = {"features_only": True}
        if out_indices is not None:
            kw["out_indices"] = tuple(out_indices)
        self.encoder = make_timm(encoder, d, weights, **kw)
        chans = list(self.encoder.feature_info.channels())
        n_stages = len(chans) - 1
        dec = [decoder_channels] * max(n_stages, 1) if isinstance(decoder_channels, int) \
            else [int(c) for c in decoder_channels]
        if len(dec) != max(n_stages, 1):
            raise ValueError(f"decoder_channels needs {max(n_stages, 1)} entries for {encoder!r}")
        blocks, cin = [], chans[-1]
        for skip, cout in zip(reversed(chans[:-1]), dec):
            blocks.append(_block(cin + skip, cout))
            cin = cout
        self.decoder = nn.ModuleList(blocks)
        self.final = _block(cin, dec[-1])
        self.num_features = dec[-1]
        self.register_buffer("disk", disk_mask((h, w), spot_radius_vox), persistent=False)
        dry_run(self.encoder, (d, h, w), f"timm encoder {encoder!r}")

    def dense_features(self, x: torch.Tensor, spot_average: bool = False) -> torch.Tensor:
        """``(B, 1, D, H', W')`` -> ``(B, F, H', W')`` features of the central plane.

        With ``spot_average`` each pixel gets the mean over the spot disk centred there (zero
        padded at the border), i.e. the training-time spot prediction for a spot at that pixel.
        """
        feats = self.encoder(x[:, 0])
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1])):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], 1))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        y = self.final(y)
        if spot_average:
            r = int(self.spot_radius_vox)
            k = disk_mask((2 * r + 1, 2 * r + 1), self.spot_radius_vox).to(y)
            k = (k / k.sum()).expand(y.shape[1], 1, *k.shape)
            y = F.conv2d(y, k, padding=r, groups=y.shape[1])
        return y

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` patch -> ``(B, F)``: the dense map averaged over the central disk."""
        if tuple(x.shape[2:]) != self.patch_shape:
            raise ValueError(f"expected a patch of {self.patch_shape} voxels, got {tuple(x.shape[2:])}")
        fmap = self.dense_features(x)
        m = self.disk.to(fmap.dtype)
        return (fmap * m).sum((-2, -1)) / m.sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

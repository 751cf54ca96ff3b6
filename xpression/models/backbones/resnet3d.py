"""3D ResNets built from torchvision's video ResNet blocks (``r3d_18``, ``mc3_18``, ``r2plus1d_18``).

The layout and parameter names are torchvision's ``VideoResNet`` (``stem``, ``layer1`` ...), so a
torchvision checkpoint of the same architecture loads (``weights``: a local file; its 3-channel
stem kernel is summed over RGB for the 1-channel CT, as timm does for ``in_chans=1``; its ``fc``
is dropped). What changes for CT patches:

- one input channel;
- configurable strides. A video clip has 16 frames and torchvision halves the time axis in
  ``layer2``-``layer4``; a CT patch has 5-21 slices, so by default depth is never strided and the
  feature map keeps the patch's depth (in-plane: stem 2, then 2 per stage from ``layer2``);
- widths and blocks per stage are configurable (``[64, 128, 256, 512]`` / ``[2, 2, 2, 2]`` are
  the 18-layer networks), as is the stem kernel.

``arch`` picks the convolution of each stage: ``r3d`` 3x3x3 everywhere; ``mc3`` 3x3x3 in the first
stage and 1x3x3 (in-plane only) after it; ``r2plus1d`` a 1x3x3 then a 3x1x1 convolution.

``padding="same"`` (torchvision's): the network reads zeros beyond the patch's border and pools
globally, so a run over a larger input is not the per-patch answer: not dense-equivalent, no
dense mode (the sweep predicts patch by patch). ``padding="valid"``: no padding anywhere, each
block's shortcut cropped to the centre of its residual branch, and the global average pool a
sliding mean over the patch's feature map, so ``dense_features`` over a larger input gives,
at output ``k``, exactly the per-patch answer of the crop starting at ``k * output_stride``.
A valid network must fit its patch (the 18-layer networks do not fit 33 voxels; see
``conf/model/resnet3d_valid.yaml``).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, Conv3DNoTemporal, Conv3DSimple

from xpression.models.backbones.cnn3d import Triple, _triple
from xpression.models.backbones.weights import load_into, read_state_dict
from xpression.models.registry import register_backbone

log = logging.getLogger(__name__)

ARCHS = ("r3d", "mc3", "r2plus1d")


def _conv_builder(kind: type, padding: int) -> Callable[..., nn.Module]:
    """torchvision's conv maker ``kind`` with a (z, y, x) stride and the given padding; torchvision
    takes one stride for all axes (and fixes depth at 1 for ``Conv3DNoTemporal``)."""

    def build(cin: int, cout: int, mid: int, stride: int | Sequence[int] = 1) -> nn.Module:
        s = _triple(stride, "stride")
        if kind is Conv3DSimple:
            return Conv3DSimple(cin, cout, mid, stride=s, padding=padding)  # type: ignore[arg-type]
        m = kind(cin, cout, mid, stride=1, padding=padding)
        if kind is Conv3DNoTemporal:
            m.stride = s
        else:  # Conv2Plus1D: in-plane conv, BN, ReLU, depth conv
            m[0].stride, m[3].stride = (1, s[1], s[2]), (s[0], 1, 1)
        return m

    return build


def _convs(module: nn.Module) -> list[nn.Conv3d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv3d)]


def _out_shape(shape: Sequence[int], conv: nn.Conv3d) -> Triple:
    return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in  # type: ignore[return-value]
                 zip(shape, conv.kernel_size, conv.stride, conv.padding))


class Block(BasicBlock):
    """torchvision's ``BasicBlock`` whose shortcut reads the voxels at the centre of the residual
    branch's outputs: ``crop`` voxels in from the start (0 with same padding, where the branch
    keeps the input's grid)."""

    def __init__(self, cin: int, cout: int, conv_builder: Callable[..., nn.Module], stride: Triple) -> None:
        downsample = None
        if stride != (1, 1, 1) or cin != cout:
            downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))
        super().__init__(cin, cout, conv_builder, stride, downsample)  # type: ignore[arg-type]
        # output 0 of the branch is centred on input voxel `crop` (per axis)
        crop, jump = [0, 0, 0], [1, 1, 1]
        for c in _convs(self.conv1) + _convs(self.conv2):
            for a in range(3):
                crop[a] += ((c.kernel_size[a] - 1) // 2 - c.padding[a]) * jump[a]
                jump[a] *= c.stride[a]
        self.crop: Triple = tuple(crop)  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        cz, cy, cx = self.crop
        residual = x[:, :, cz:, cy:, cx:]
        if self.downsample is not None:
            residual = self.downsample(residual)
        d, h, w = out.shape[2:]
        return self.relu(out + residual[:, :, :d, :h, :w])


@register_backbone("resnet3d")
class ResNet3D(nn.Module):
    """A torchvision video ResNet over a ``(B, 1, D, H, W)`` CT patch; see the module doc.

    Args:
        patch_shape: input patch ``(D, H, W)`` in voxels.
        arch: ``"r3d"``, ``"mc3"`` or ``"r2plus1d"`` (convolution per stage).
        widths: output channels of each stage (``num_features`` = the last).
        layers: residual blocks per stage.
        strides: ``(z, y, x)`` stride of each stage's first block.
        stem_kernel: stem convolution ``(z, y, x)`` (r2plus1d: split into ``1 x y x x`` and
            ``z x 1 x 1``); default torchvision's ``(3, 7, 7)``.
        stem_stride: stem stride ``(z, y, x)``.
        padding: ``"same"`` (torchvision's; not dense-equivalent) or ``"valid"`` (dense-equivalent).
        weights: optional local torchvision checkpoint of the same architecture; nothing is downloaded.
        drop_rate: dropout on the pooled features.
        in_chans: input channels (1 for a CT patch).
    """

    def __init__(self, patch_shape: Sequence[int], arch: str = "r3d",
                 widths: Sequence[int] = (64, 128, 256, 512), layers: Sequence[int] = (2, 2, 2, 2),
                 strides: Sequence[Sequence[int]] = ((1, 1, 1), (1, 2, 2), (1, 2, 2), (1, 2, 2)),
                 stem_kernel: Sequence[int] = (3, 7, 7), stem_stride: Sequence[int] = (1, 2, 2),
                 padding: str = "same", weights: str | None = None, drop_rate: float = 0.0,
                 in_chans: int = 1) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        if not (len(widths) == len(layers) == len(strides) >= 1):
            raise ValueError(f"widths, layers and strides need one entry per stage, got "
                             f"{len(widths)}, {len(layers)} and {len(strides)}")
        if min(int(n) for n in layers) < 1:
            raise ValueError(f"every stage needs at least one block, got layers {list(layers)}")
        self.patch_shape: Triple = _triple(patch_shape, "patch_shape")
        self.arch, self.padding, self.widths = arch, padding, [int(w) for w in widths]
        pad = 1 if padding == "same" else 0
        self.stem = self._stem(arch, in_chans, int(widths[0]), _triple(stem_kernel, "stem_kernel"),
                               _triple(stem_stride, "stem_stride"), padding)
        cin = int(widths[0])
        for i, (w, n, s) in enumerate(zip(widths, layers, strides)):
            kind = Conv3DSimple if arch == "r3d" or (arch == "mc3" and i == 0) else \
                Conv3DNoTemporal if arch == "mc3" else Conv2Plus1D
            build = _conv_builder(kind, pad)
            blocks = [Block(cin, int(w), build, _triple(s, "strides"))]
            blocks += [Block(int(w), int(w), build, (1, 1, 1)) for _ in range(int(n) - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = int(w)
        self.n_stages = len(widths)
        self.num_features = cin
        self.drop = nn.Dropout(drop_rate)
        self._init_weights()

        self.feature_shape = self._check_shapes()
        self.dense_equivalent = padding == "valid"
        stride, rf = [1, 1, 1], [1, 1, 1]
        for c in self._main_convs():
            for a in range(3):
                rf[a] += (c.kernel_size[a] - 1) * stride[a]
                stride[a] *= c.stride[a]
        # only a valid network has a dense mode: the sweep reads output_stride to offer one
        self.output_stride: Triple | None = tuple(stride) if self.dense_equivalent else None  # type: ignore[assignment]
        # voxels of the patch (from its start) that reach the output
        self.used_shape: Triple = self.patch_shape if padding == "same" else tuple(  # type: ignore[assignment]
            (f - 1) * s + r for f, s, r in zip(self.feature_shape, stride, rf))
        if self.used_shape != self.patch_shape:
            log.warning("resnet3d reads only %s of the %s-voxel patch (strides drop trailing voxels), so "
                        "its receptive field is off-centre; choose kernels/strides that fit the patch",
                        self.used_shape, self.patch_shape)
        if weights is not None:
            self.load_torchvision(weights)

    @staticmethod
    def _stem(arch: str, cin: int, cout: int, kernel: Triple, stride: Triple, padding: str) -> nn.Sequential:
        """torchvision's ``BasicStem`` / ``R2Plus1dStem`` layout with ``cin`` channels."""
        p = [k // 2 if padding == "same" else 0 for k in kernel]
        if arch != "r2plus1d":
            return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride=stride, padding=p, bias=False),
                                 nn.BatchNorm3d(cout), nn.ReLU(inplace=True))
        mid = max(1, round(45 * cout / 64))  # torchvision: 45 channels for a 64-channel stem
        return nn.Sequential(
            nn.Conv3d(cin, mid, (1, kernel[1], kernel[2]), stride=(1, stride[1], stride[2]),
                      padding=(0, p[1], p[2]), bias=False), nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
            nn.Conv3d(mid, cout, (kernel[0], 1, 1), stride=(stride[0], 1, 1), padding=(p[0], 0, 0),
                      bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))

    def _init_weights(self) -> None:
        for m in self.modules():  # as torchvision's VideoResNet
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.n_stages)]

    def _main_convs(self) -> list[nn.Conv3d]:
        """The convolutions on the path from input to output, in order (shortcuts excluded)."""
        convs = _convs(self.stem)
        for stage in self.stages():
            for block in stage:
                convs += _convs(block.conv1) + _convs(block.conv2)
        return convs

    def _check_shapes(self) -> Triple:
        """Feature-map shape for the patch; a clear error where a layer would leave nothing."""
        shape: Triple = self.patch_shape
        names = {id(m): n for n, m in self.named_modules()}
        for conv in self._main_convs():
            shape = _out_shape(shape, conv)
            if min(shape) < 1:
                raise ValueError(
                    f"patch {self.patch_shape} (D, H, W voxels) is too small for resnet3d "
                    f"(arch {self.arch!r}, padding {self.padding!r}): the feature map after "
                    f"{names[id(conv)]} would be {shape}. Use a larger patch, fewer blocks, smaller "
                    f"strides or a smaller stem kernel")
        return shape

    def load_torchvision(self, weights: str) -> None:
        """Load a local torchvision video-ResNet checkpoint (or one of this backbone): RGB stem
        kernels are summed over channels, the classifier ``fc`` is dropped."""
        state = {k: v for k, v in read_state_dict(weights, f"resnet3d {self.arch!r}").items()
                 if not k.startswith("fc.")}
        first = self.stem[0].weight
        w = state.get("stem.0.weight")
        if w is not None and w.ndim == 5 and w.shape[1] != first.shape[1] and first.shape[1] == 1:
            state["stem.0.weight"] = w.sum(dim=1, keepdim=True)
        load_into(self, state, weights, f"resnet3d {self.arch!r} with widths {self.widths}")

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> the last stage's feature map."""
        x = self.stem(x)
        for stage in self.stages():
            x = stage(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` patch -> ``(B, num_features)``: the feature map's mean."""
        if tuple(x.shape[2:]) != self.patch_shape:
            raise ValueError(f"expected a patch of {self.patch_shape} voxels, got {tuple(x.shape[2:])}")
        return self.drop(self.trunk(x).mean((2, 3, 4)))

    def dense_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D', H', W')`` -> ``(B, num_features, d, h, w)`` (valid padding only).

        Output ``k`` (per axis) is the patch starting at input voxel ``k * output_stride``; only
        patches lying wholly inside the input are returned: ``(L - P) // stride + 1`` per axis.
        """
        if not self.dense_equivalent:
            raise NotImplementedError("resnet3d with padding 'same' has no dense mode; predict patch "
                                      "by patch (or build it with padding 'valid')")
        if any(s < p for s, p in zip(x.shape[2:], self.patch_shape)):
            raise ValueError(f"input {tuple(x.shape[2:])} is smaller than the patch {self.patch_shape}")
        out = F.avg_pool3d(self.trunk(x), self.feature_shape, stride=1)
        n = [(s - p) // st + 1 for s, p, st in zip(x.shape[2:], self.patch_shape, self.output_stride)]  # type: ignore[arg-type]
        return self.drop(out[:, :, : n[0], : n[1], : n[2]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

"""The 3D CNN family: the published network and a dense-equivalent variant.

Layout: ``Conv3d(w_0) -> ReLU -> MaxPool -> Conv3d(w_1) -> ReLU -> MaxPool -> ... -> Conv3d(w_n) ->
ReLU -> Flatten -> Dense(dense_width) -> ReLU -> Dropout``; the target head (``Dense T``) sits in
``XPressionNet``. With ``padding="valid"`` the Flatten->Dense is a convolution whose kernel covers
the final feature map, so running the trunk over a larger input gives, at output position ``k``,
exactly the per-patch answer of the crop starting at ``k * output_stride`` voxels (its centre at
``k * output_stride + (patch_shape - 1) / 2``). With ``padding="same"`` (the paper) every patch
sees zero padding at its own border, which a dense run does not: not dense-equivalent.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xpression.models.backbones.depth_fold import FoldConv3d, conv3d
from xpression.models.registry import register_backbone

Triple = tuple[int, int, int]
log = logging.getLogger(__name__)


def _triple(v: int | Sequence[int], what: str) -> Triple:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"{what} must be an int or 3 ints (z, y, x), got {v!r}")
    return t  # type: ignore[return-value]


def _per_layer(v: int | Sequence, n: int, what: str) -> list[Triple]:
    """One (z, y, x) triple per layer from an int, a triple, or a list of n of those."""
    if isinstance(v, int) or (len(v) == 3 and all(isinstance(x, int) for x in v)):
        return [_triple(v, what)] * n
    if len(v) != n:
        raise ValueError(f"{what}: expected {n} per-layer entries, got {len(v)}")
    return [_triple(x, what) for x in v]


def trunk_shape(patch_shape: Sequence[int], kernels: list[Triple], pools: list[Triple],
                padding: str) -> list[Triple]:
    """Feature-map shape (voxels) after each conv (and its pool) for a ``patch_shape`` input."""
    shape = tuple(int(s) for s in patch_shape)
    shapes = []
    for i, k in enumerate(kernels):
        if padding == "valid":
            shape = tuple(s - kk + 1 for s, kk in zip(shape, k))
        if i < len(pools):
            shape = tuple(s // p for s, p in zip(shape, pools[i])) if min(shape) >= 1 else shape
        shapes.append(shape)
    return shapes


@register_backbone("cnn3d")
class CNN3D(nn.Module):
    """Configurable 3D CNN over a ``(B, 1, D, H, W)`` patch.

    Args:
        patch_shape: input patch ``(D, H, W)`` in voxels.
        widths: output channels of each conv layer.
        kernel_size: conv kernel (voxels): an int, a ``(z, y, x)`` triple, or one per layer.
        pool: max-pool size = stride between conv layers (an int, a triple, or one per gap).
        padding: ``"valid"`` (dense-equivalent) or ``"same"`` (the paper).
        dense_width: width of the Dense layer after Flatten (``num_features``).
        dropout: dropout after the Dense layer.
        in_chans: input channels (1 for a CT patch).
    """

    def __init__(self, patch_shape: Sequence[int], widths: Sequence[int] = (16, 32, 64),
                 kernel_size: int | Sequence = ((3, 4, 4), (3, 4, 4), (1, 3, 3)),
                 pool: int | Sequence = (1, 2, 2), padding: str = "valid", dense_width: int = 64,
                 dropout: float = 0.3, in_chans: int = 1) -> None:
        super().__init__()
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        if len(widths) < 1:
            raise ValueError("widths must name at least one conv layer")
        self.patch_shape: Triple = _triple(tuple(patch_shape), "patch_shape")
        kernels = _per_layer(kernel_size, len(widths), "kernel_size")
        pools = _per_layer(pool, len(widths) - 1, "pool") if len(widths) > 1 else []
        shapes = trunk_shape(self.patch_shape, kernels, pools, padding)
        for i, s in enumerate(shapes):
            if min(s) < 1:
                raise ValueError(
                    f"patch {self.patch_shape} (D, H, W voxels) is too small for cnn3d "
                    f"(kernels {kernels}, pools {pools}, padding {padding!r}): the feature map "
                    f"after layer {i} would be {s}. Use a larger patch or fewer/smaller layers.")
        self.padding = padding
        self.dense_equivalent = padding == "valid"
        stride = [1, 1, 1]
        for p in pools:
            stride = [a * b for a, b in zip(stride, p)]
        self.output_stride: Triple = tuple(stride)  # type: ignore[assignment]
        self.feature_shape: Triple = shapes[-1]
        # Layers that mix neighbours, in order (each conv, each pool, the Dense-as-conv) and,
        # per axis, the last of them whose kernel exceeds 1: where dense_features(step=) strides.
        mixing: list[Triple] = []
        for i, k in enumerate(kernels):
            mixing += [k, pools[i]] if i < len(pools) else [k]
        mixing.append(self.feature_shape)
        self._n_mixing = len(mixing)
        self._stride_at: Triple = tuple(  # type: ignore[assignment]
            next((i for i in reversed(range(len(mixing))) if mixing[i][a] > 1), len(mixing) - 1) for a in range(3))
        self.used_shape = self._used_shape(kernels, pools)
        if self.dense_equivalent and self.used_shape != self.patch_shape:
            log.warning("cnn3d reads only %s of the %s-voxel patch (pooling drops trailing voxels), "
                        "so its receptive field is off-centre; choose kernels/pools that fit the patch",
                        self.used_shape, self.patch_shape)

        layers: list[nn.Module] = []
        cin = in_chans
        for i, (w, k) in enumerate(zip(widths, kernels)):
            layers += [FoldConv3d(cin, int(w), k, padding=padding), nn.ReLU(inplace=True)]
            if i < len(pools):
                layers.append(nn.MaxPool3d(pools[i]))
            cin = int(w)
        self.trunk = nn.Sequential(*layers)
        self.dense = nn.Linear(cin * self.feature_shape[0] * self.feature_shape[1]
                               * self.feature_shape[2], dense_width)
        self.drop = nn.Dropout(dropout)
        self.num_features = int(dense_width)
        self._trunk_channels = cin

    def _used_shape(self, kernels: list[Triple], pools: list[Triple]) -> Triple:
        """Voxels of the patch (from its start) that reach the output: the receptive field."""
        if self.padding == "same":
            return self.patch_shape
        s = list(self.feature_shape)
        for i in reversed(range(len(kernels))):
            s = [a + k - 1 for a, k in zip(s, kernels[i])]
            if i > 0:
                s = [a * p for a, p in zip(s, pools[i - 1])]
        return tuple(s)  # type: ignore[return-value]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` patch -> ``(B, num_features)``."""
        if tuple(x.shape[2:]) != self.patch_shape:
            raise ValueError(f"expected a patch of {self.patch_shape} voxels, got {tuple(x.shape[2:])}")
        f = self.trunk(x).flatten(1)
        return self.drop(F.relu(self.dense(f)))

    def dense_features(self, x: torch.Tensor, step: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, 1, D', H', W')`` -> ``(B, num_features, d, h, w)``: the Dense layer as a conv.

        Output ``k`` (per axis) is the patch starting at input voxel ``k * output_stride``; only
        patches lying wholly inside the input are returned: ``(L - P) // stride + 1`` per axis.
        ``step`` (per axis, in outputs): return only every ``step``-th output, i.e. output ``j``
        is the patch starting at ``j * step * output_stride``. With valid padding the skipped
        outputs are never computed: the stride goes into the last layer that mixes neighbours
        along that axis, which is exact (only pointwise layers follow it). A sweep on a grid
        coarser than ``output_stride`` saves most of its head and last-layer work this way.
        """
        if any(s < p for s, p in zip(x.shape[2:], self.patch_shape)):
            raise ValueError(f"input {tuple(x.shape[2:])} is smaller than the patch {self.patch_shape}")
        step_t = _triple(tuple(step) if step is not None else 1, "step")
        if min(step_t) < 1:
            raise ValueError(f"step must be >= 1 per axis, got {step_t}")
        n = [(s - p) // st + 1 for s, p, st in zip(x.shape[2:], self.patch_shape, self.output_stride)]
        n = [(k - 1) // m + 1 for k, m in zip(n, step_t)]  # outputs kept per axis
        w = self.dense.weight.view(self.num_features, self._trunk_channels, *self.feature_shape)
        if self.padding != "valid" or step_t == (1, 1, 1):
            out = F.conv3d(self.trunk(x), w, self.dense.bias)
            out = out[:, :, :: step_t[0], :: step_t[1], :: step_t[2]]
        else:
            out = self._strided_tail(x, w, step_t)
        out = self.drop(F.relu(out))
        # when pooling drops trailing voxels a patch overhanging the input still has an output
        return out[:, :, : n[0], : n[1], : n[2]]

    def _strided_tail(self, x: torch.Tensor, dense_w: torch.Tensor, step: Triple) -> torch.Tensor:
        """Trunk + Dense-as-conv with outputs only every ``step`` positions (valid padding):
        per axis the stride goes into layer ``_stride_at`` (only pointwise layers follow it)."""
        strides = [[1, 1, 1] for _ in range(self._n_mixing)]
        for a, at in enumerate(self._stride_at):
            strides[at][a] = step[a]
        layer = iter(strides)
        f = x
        for m in self.trunk:
            if isinstance(m, nn.Conv3d):
                f = conv3d(f, m.weight, m.bias, stride=next(layer))
            elif isinstance(m, nn.MaxPool3d):
                f = F.max_pool3d(f, m.kernel_size, [s * e for s, e in zip(_triple(m.stride, "pool"), next(layer))])
            else:
                f = m(f)
        return F.conv3d(f, dense_w, self.dense.bias, stride=next(layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@register_backbone("cnn3d_paper")
def cnn3d_paper(patch_shape: Sequence[int] = (21, 128, 128), dropout: float = 0.3) -> CNN3D:
    """The published network: Conv3D 32/64/128/256, kernel 3x9x9 same padding, ReLU,
    MaxPool 2 in between, Flatten -> Dense 64 ReLU -> Dropout 0.3 (for a 21x128x128 patch)."""
    return CNN3D(patch_shape, widths=(32, 64, 128, 256), kernel_size=(3, 9, 9), pool=2,
                 padding="same", dense_width=64, dropout=dropout)

"""3D convolutions computed as 2D ones with the kernel's depth folded into the channels.

A ``kd x kh x kw`` convolution of ``C`` channels equals, at each output depth ``d``, a
``kh x kw`` 2D convolution of the ``kd`` input planes ``d * stride_z + i`` stacked as ``C * kd``
channels. cuDNN serves some 3D shapes with a slow generic kernel. Measured on an H200 (bf16,
channels-last, cuDNN 9.19; ``benchmarks/sweep.py --model published``, two 21 x 1136 x 1136
slabs): the published trunk's second layer took 53 ms as a 3D convolution and 17 ms folded, its
third 29 ms and 2 ms; its first (one input channel) 59 ms and 89 ms, so it stays 3D. The trunk
went from 292 to 502 MVoxel/s. With channels-last inputs the folded output is
already in the 3D channels-last layout, so only the input planes are copied (``kd`` times).
For thin inputs the kernel's x taps can be folded into the channels as well (``kh x 1`` 2D
kernels over ``C * kd * kw`` channels, 27 for the first layer), stacked straight into the
channels-last layout: a third way, and a fourth with the channels padded with zeros to a
multiple of 8 (what tensor-core kernels take), both for that first layer and not yet timed on a
GPU. Under autocast the input is cast before it is copied into the folded planes (the
convolution would cast it anyway), which halves those copies' bytes.

:func:`conv3d` picks, per layer and input shape, whichever way is fastest on the device
(timed once, like cuDNN's autotuner; ``mode="auto"`` on CUDA), or one of them by ``mode``.
On the CPU it stays a 3D convolution unless told otherwise. Both give the same numbers up to
floating-point summation order.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FoldConv3d", "conv3d", "conv3d_folded", "fold_choices", "FOLD_MODE", "WAYS"]

log = logging.getLogger(__name__)

# "auto": time the ways on CUDA, keep the fastest; else always this one on any device:
# "off" (3D), "depth" (kernel depth folded into channels), "depth+x" (and the kernel's x taps),
# "depth+x8" (those channels padded with zeros to a multiple of 8).
FOLD_MODE = {"mode": "auto"}
WAYS = ("3d", "depth", "depth+x", "depth+x8")
_COLUMN_WAYS = {"depth+x": 1, "depth+x8": 8}  # channel multiple of each way folding the x taps
# the x taps are copied kw times: only for thin inputs (the first layer), where it pays
MAX_COLUMN_CHANNELS = 64
_timings: dict[tuple, dict[str, float]] = {}  # ms of each way, per layer and input (key of conv3d)


def _pad_of(weight: torch.Tensor, padding: str | Sequence[int]) -> tuple[int, int, int] | None:
    """Symmetric zero padding per axis, or None where it is not symmetric ('same' with even kernels)."""
    if padding == "valid":
        return (0, 0, 0)
    if padding == "same":
        k = weight.shape[2:]
        return None if any(n % 2 == 0 for n in k) else tuple(n // 2 for n in k)  # type: ignore[return-value]
    p = tuple(int(v) for v in (padding if isinstance(padding, (tuple, list)) else (padding,) * 3))
    return p if len(p) == 3 else None


def _outputs(extent: int, k: int, stride: int) -> int:
    """Outputs of a valid convolution of ``k`` taps and ``stride`` over ``extent`` (padded) voxels."""
    if extent < k:
        raise ValueError(f"input extent {extent} (padded) is smaller than the kernel extent {k}")
    return (extent - k) // stride + 1


def _taps(x: torch.Tensor, dim: int, k: int, stride: int) -> tuple[torch.Tensor, int]:
    """The ``k`` strided shifts of ``x`` along ``dim`` that a kernel of ``k`` taps reads, stacked
    as axis 2 (after the channels); and the number of outputs along ``dim``."""
    n_out = _outputs(x.shape[dim], k, stride)
    span = (n_out - 1) * stride + 1
    return torch.stack([x.narrow(dim, i, span)[(slice(None),) * dim + (slice(None, None, stride),)] for i in range(k)],
                       dim=2), n_out


def _x_taps(x: torch.Tensor, kd: int, kw: int, sz: int, sx: int, multiple: int) -> tuple[torch.Tensor, int]:
    """``(N, C, D, H, W)`` (padded) -> ``(N * D', K, H, W')`` channels-last: the ``C * kd * kw``
    strided shifts a kernel's depth and x taps read, channel order ``(c, i, j)``, followed by
    zero channels up to ``K``, a multiple of ``multiple``; one copy. Also returns ``D'``."""
    n, c, d, h, w = x.shape
    d_out, w_out = _outputs(d, kd, sz), _outputs(w, kw, sx)
    taps = [x[:, ci, i : i + (d_out - 1) * sz + 1 : sz, :, j : j + (w_out - 1) * sx + 1 : sx]
            for ci in range(c) for i in range(kd) for j in range(kw)]                 # each N, D', H, W'
    taps += [x.new_zeros(()).expand(taps[0].shape)] * (-len(taps) % multiple)
    cols = torch.stack(taps, dim=-1)                                                   # N, D', H, W', K
    return cols.view(n * d_out, h, w_out, len(taps)).permute(0, 3, 1, 2), d_out


def conv3d_folded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  stride: Sequence[int] = (1, 1, 1), padding: Sequence[int] = (0, 0, 0),
                  columns: bool = False, channel_multiple: int = 1) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride, padding)`` as one 2D convolution over depth-folded planes;
    with ``columns`` the kernel's x taps are folded into the channels too (a ``kh x 1`` 2D kernel
    over ``C * kd * kw`` channels, zero-padded to a multiple of ``channel_multiple``, which suits
    tensor cores where ``C`` is 1).

    ``x``: ``(N, C, D, H, W)``; ``weight``: ``(O, C, kd, kh, kw)``; dilation 1, groups 1.
    """
    n, c, _, _, _ = x.shape
    o, _, kd, kh, kw = weight.shape
    sz, sy, sx = (int(s) for s in stride)
    pz, py, px = (int(p) for p in padding)
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    if torch.is_autocast_enabled(x.device.type):  # the convolution casts it anyway: copy half the bytes
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if pz or (columns and px):
        x = F.pad(x, (px if columns else 0, px if columns else 0, 0, 0, pz, pz))
    if columns:
        folded, d_out = _x_taps(x, kd, kw, sz, sx, channel_multiple)
        w2 = weight.permute(0, 1, 2, 4, 3).reshape(o, c * kd * kw, kh, 1)            # channel order (c, i, j)
        if folded.shape[1] > w2.shape[1]:
            w2 = torch.cat([w2, w2.new_zeros(o, folded.shape[1] - w2.shape[1], kh, 1)], dim=1)
        y = F.conv2d(folded, w2, bias, (sy, 1), (py, 0))
    else:
        planes, d_out = _taps(x, 2, kd, sz)                                             # N, C, kd, D', H, W
        folded = planes.permute(0, 3, 1, 2, 4, 5).reshape(n * d_out, c * kd, *x.shape[3:])
        if channels_last:
            folded = folded.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(folded, weight.reshape(o, c * kd, kh, kw), bias, (sy, sx), (py, px))
    # (N * D', O, H', W') -> (N, O, D', H', W'): channels-last 2D is channels-last 3D here
    return y.view(n, d_out, o, *y.shape[2:]).permute(0, 2, 1, 3, 4)


def _time(fn, reps: int = 3) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _run(way: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         stride: Sequence[int], pad: tuple[int, int, int]) -> torch.Tensor:
    if way == "3d":
        return F.conv3d(x, weight, bias, tuple(stride), pad)
    return conv3d_folded(x, weight, bias, stride, pad, columns=way in _COLUMN_WAYS,
                         channel_multiple=_COLUMN_WAYS.get(way, 1))


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           stride: Sequence[int] = (1, 1, 1), padding: str | Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """A 3D convolution, folded into 2D where that is faster (see the module doc)."""
    mode = FOLD_MODE["mode"]
    pad = _pad_of(weight, padding)
    if mode == "off" or weight.shape[2] == 1 or pad is None or (mode == "auto" and x.device.type != "cuda"):
        return F.conv3d(x, weight, bias, tuple(stride), padding if isinstance(padding, str) else tuple(padding))
    if mode != "auto":
        return _run(mode, x, weight, bias, stride, pad)
    key = (tuple(x.shape), tuple(x.stride()), tuple(weight.shape), tuple(stride), pad, x.dtype,
           torch.is_autocast_enabled(x.device.type), x.device, torch.backends.cudnn.benchmark)
    ms = _timings.get(key)
    if ms is None and torch.compiler.is_compiling():  # no timing inside a traced graph: what eager chose, else 3D
        return _run("3d", x, weight, bias, stride, pad)
    if ms is None:
        thin = x.shape[1] * weight.shape[2] * weight.shape[4] <= MAX_COLUMN_CHANNELS
        ways = [w for w in WAYS if w not in _COLUMN_WAYS or thin]
        with torch.no_grad():
            ms = _timings[key] = {w: _time(lambda: _run(w, x, weight, bias, stride, pad)) for w in ways}
        log.debug("conv3d %s x %s: %s", tuple(x.shape), tuple(weight.shape), ms)
    return _run(min(ms, key=ms.get), x, weight, bias, stride, pad)


def fold_choices() -> list[dict]:
    """What ``mode="auto"`` chose so far: input and weight shapes, ms of each way, the way taken."""
    return [{"input": list(k[0]), "weight": list(k[2]), "stride": list(k[3]),
             "ms": {w: round(t, 3) for w, t in ms.items()}, "chosen": min(ms, key=ms.get)} for k, ms in _timings.items()]


class FoldConv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state dict) whose forward is :func:`conv3d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups != 1 or tuple(self.dilation) != (1, 1, 1) or self.padding_mode != "zeros":
            return super().forward(x)
        return conv3d(x, self.weight, self.bias, self.stride, self.padding)

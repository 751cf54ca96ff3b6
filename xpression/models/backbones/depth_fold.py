"""3D convolutions computed as 2D ones with the kernel's depth folded into the channels.

A ``kd x kh x kw`` convolution of ``C`` channels equals, at each output depth ``d``, a
``kh x kw`` 2D convolution of the ``kd`` input planes ``d * stride_z + i`` stacked as ``C * kd``
channels. cuDNN serves some 3D shapes with a slow generic kernel. Measured on an H200 (bf16,
channels-last, cuDNN 9.19; ``benchmarks/sweep.py --model published``, two 21 x 1136 x 1136
slabs): the published trunk's second layer took 53 ms as a 3D convolution and 17 ms folded, its
third 29 ms and 2 ms; its first (one input channel) 59 ms and 89 ms, so it stays 3D. The trunk
went from 292 to 502 MVoxel/s. With channels-last inputs the folded output is
already in the 3D channels-last layout, so only the input planes are copied (``kd`` times).

:func:`conv3d` picks, per layer and input shape, whichever of the two is faster on the device
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

__all__ = ["FoldConv3d", "conv3d", "conv3d_folded", "fold_choices", "FOLD_MODE"]

log = logging.getLogger(__name__)

# "auto": time both on CUDA, keep the faster; "on" / "off": always / never fold (any device).
FOLD_MODE = {"mode": "auto"}
_choices: dict[tuple, bool] = {}


def _pad_of(weight: torch.Tensor, padding: str | Sequence[int]) -> tuple[int, int, int] | None:
    """Symmetric zero padding per axis, or None where it is not symmetric ('same' with even kernels)."""
    if padding == "valid":
        return (0, 0, 0)
    if padding == "same":
        k = weight.shape[2:]
        return None if any(n % 2 == 0 for n in k) else tuple(n // 2 for n in k)  # type: ignore[return-value]
    p = tuple(int(v) for v in (padding if isinstance(padding, (tuple, list)) else (padding,) * 3))
    return p if len(p) == 3 else None


def conv3d_folded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  stride: Sequence[int] = (1, 1, 1), padding: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride, padding)`` as one 2D convolution over depth-folded planes.

    ``x``: ``(N, C, D, H, W)``; ``weight``: ``(O, C, kd, kh, kw)``; dilation 1, groups 1.
    """
    n, c, _, _, _ = x.shape
    o, _, kd, kh, kw = weight.shape
    sz, sy, sx = (int(s) for s in stride)
    pz, py, px = (int(p) for p in padding)
    if pz:
        x = F.pad(x, (0, 0, 0, 0, pz, pz))
    depth = x.shape[2]
    d_out = (depth - kd) // sz + 1
    if d_out < 1:
        raise ValueError(f"input depth {depth} (padded) is smaller than the kernel depth {kd}")
    last = kd + (d_out - 1) * sz
    planes = torch.stack([x[:, :, i : i + last - kd + 1 : sz] for i in range(kd)], dim=2)  # N, C, kd, D', H, W
    folded = planes.permute(0, 3, 1, 2, 4, 5).reshape(n * d_out, c * kd, *x.shape[3:])
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
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


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           stride: Sequence[int] = (1, 1, 1), padding: str | Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """A 3D convolution, folded into 2D where that is faster (see the module doc)."""
    mode = FOLD_MODE["mode"]
    pad = _pad_of(weight, padding)
    if mode == "off" or weight.shape[2] == 1 or pad is None or (mode == "auto" and x.device.type != "cuda"):
        return F.conv3d(x, weight, bias, tuple(stride), padding if isinstance(padding, str) else tuple(padding))
    if mode == "on":
        return conv3d_folded(x, weight, bias, stride, pad)
    key = (tuple(x.shape), tuple(x.stride()), tuple(weight.shape), tuple(stride), pad, x.dtype,
           torch.is_autocast_enabled(x.device.type), x.device, torch.backends.cudnn.benchmark)
    fold = _choices.get(key)
    if fold is None:
        with torch.no_grad():
            t3 = _time(lambda: F.conv3d(x, weight, bias, tuple(stride), pad))
            t2 = _time(lambda: conv3d_folded(x, weight, bias, stride, pad))
        fold = _choices[key] = t2 < t3
        log.debug("conv3d %s x %s: 3D %.2f ms, folded %.2f ms", tuple(x.shape), tuple(weight.shape), t3, t2)
        _timings[key] = (t3, t2)
    return conv3d_folded(x, weight, bias, stride, pad) if fold else F.conv3d(x, weight, bias, tuple(stride), pad)


_timings: dict[tuple, tuple[float, float]] = {}


def fold_choices() -> list[dict]:
    """What ``mode="auto"`` chose so far: input and weight shapes, ms as 3D and folded."""
    return [{"input": list(k[0]), "weight": list(k[2]), "stride": list(k[3]), "ms_3d": round(t[0], 3),
             "ms_folded": round(t[1], 3), "folded": _choices[k]} for k, t in _timings.items()]


class FoldConv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state dict) whose forward is :func:`conv3d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups != 1 or tuple(self.dilation) != (1, 1, 1) or self.padding_mode != "zeros":
            return super().forward(x)
        return conv3d(x, self.weight, self.bias, self.stride, self.padding)

"""Which voxels of a CT patch drove each predicted program: integrated gradients and occlusion.

Both take ``fn``, a network mapping ``(B, 1, D, H, W)`` float32 patches to ``(B, T)`` outputs, one
patch ``x`` ``(D, H, W)`` (normalised intensities, as the network sees them) and a baseline
patch of the same shape, and return ``(T, D, H, W)`` attributions in the units of the output
(a program proportion for compositions) per voxel.

- :func:`integrated_gradients` (Sundararajan et al. 2017): ``(x - b) * mean over the path of
  d f / d x``, the path ``b + a (x - b)`` sampled at ``steps`` midpoints of ``a`` in [0, 1].
  Completeness: the attributions of one output sum to ``f(x) - f(b)`` up to the quadrature
  error, which :class:`Attribution` reports (``delta``).
- :func:`occlusion`: a cube of ``cube`` voxels slid over the patch with stride ``stride``, its
  voxels replaced by the baseline's; each voxel gets the mean drop ``f(x) - f(x occluded)`` over
  the cubes that cover it (as Captum's ``Occlusion`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["Attribution", "integrated_gradients", "occlusion"]

Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Attribution:
    """``values`` ``(T, D, H, W)``; ``output`` ``f(x)`` and ``baseline_output`` ``f(b)``, each
    ``(T,)``; ``delta``: ``sum(values[t]) - (f(x) - f(b))[t]`` (integrated gradients only)."""

    method: str
    values: np.ndarray
    output: np.ndarray
    baseline_output: np.ndarray
    delta: np.ndarray | None = None


def _as_input(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    if t.ndim != 3:
        raise ValueError(f"a patch must be (D, H, W), got shape {tuple(t.shape)}")
    return t


def _forward(fn: Network, batch: torch.Tensor) -> torch.Tensor:
    out = fn(batch[:, None])
    if out.ndim != 2:
        raise ValueError(f"the network must return (B, T) outputs, got shape {tuple(out.shape)}")
    return out.float()


def integrated_gradients(fn: Network, x: np.ndarray | torch.Tensor, baseline: np.ndarray | torch.Tensor,
                         steps: int = 32, targets: Sequence[int] | None = None, batch_size: int = 32) -> Attribution:
    """Integrated gradients of every output (or of ``targets``) with ``steps`` midpoint samples."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x, b = _as_input(x), _as_input(baseline)
    if x.shape != b.shape:
        raise ValueError(f"baseline shape {tuple(b.shape)} differs from the patch's {tuple(x.shape)}")
    with torch.no_grad():
        ends = _forward(fn, torch.stack([x, b]))
    tlist = list(range(ends.shape[1])) if targets is None else [int(t) for t in targets]
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    grads = torch.zeros((len(tlist),) + tuple(x.shape))
    for start in range(0, steps, batch_size):
        a = alphas[start : start + batch_size].view(-1, 1, 1, 1)
        path = (b + a * (x - b)).requires_grad_(True)
        with torch.enable_grad():
            out = _forward(fn, path)
            for i, t in enumerate(tlist):
                (g,) = torch.autograd.grad(out[:, t].sum(), path, retain_graph=i + 1 < len(tlist))
                grads[i] += g.sum(dim=0)
    values = ((x - b)[None] * grads / steps).numpy()
    fx, fb = ends[0, tlist].numpy(), ends[1, tlist].numpy()
    return Attribution("integrated_gradients", values, fx, fb, values.reshape(len(tlist), -1).sum(axis=1) - (fx - fb))


def occlusion(fn: Network, x: np.ndarray | torch.Tensor, baseline: np.ndarray | torch.Tensor,
              cube: Sequence[int], stride: Sequence[int] | None = None, targets: Sequence[int] | None = None,
              batch_size: int = 64) -> Attribution:
    """Occlusion attributions with a ``cube`` (voxels, z y x) slid by ``stride`` (default: the
    cube, no overlap); the last position per axis is moved in so the cubes cover every voxel."""
    x, b = _as_input(x), _as_input(baseline)
    shape = tuple(x.shape)
    cube = tuple(int(min(max(c, 1), s)) for c, s in zip(cube, shape))
    stride = cube if stride is None else tuple(int(max(s, 1)) for s in stride)
    starts = []
    for n, c, s in zip(shape, cube, stride):
        axis = list(range(0, n - c + 1, s))
        if axis[-1] != n - c:
            axis.append(n - c)
        starts.append(axis)
    corners = [(z, y, w) for z in starts[0] for y in starts[1] for w in starts[2]]
    with torch.no_grad():
        ends = _forward(fn, torch.stack([x, b]))
        tlist = list(range(ends.shape[1])) if targets is None else [int(t) for t in targets]
        total = torch.zeros((len(tlist),) + shape)
        count = torch.zeros(shape)
        for start in range(0, len(corners), batch_size):
            chunk = corners[start : start + batch_size]
            batch = x.repeat(len(chunk), 1, 1, 1)
            for i, (z, y, w) in enumerate(chunk):
                sl = (slice(z, z + cube[0]), slice(y, y + cube[1]), slice(w, w + cube[2]))
                batch[(i,) + sl] = b[sl]
            drop = ends[0, tlist][None] - _forward(fn, batch)[:, tlist]  # (n, T)
            for i, (z, y, w) in enumerate(chunk):
                sl = (slice(z, z + cube[0]), slice(y, y + cube[1]), slice(w, w + cube[2]))
                total[(slice(None),) + sl] += drop[i].view(-1, 1, 1, 1)
                count[sl] += 1
    values = (total / count.clamp(min=1)).numpy()
    return Attribution("occlusion", values, ends[0, tlist].numpy(), ends[1, tlist].numpy())

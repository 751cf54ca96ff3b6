"""The sweep: a trained network over a whole volume, tile by tile, as a pure function.

``sweep_tiles(volume, model, grid, ...)`` yields one :class:`TileResult` per computed tile;
``sweep(...)`` gathers them into one ``(T, nz, ny, nx)`` array. Nothing here writes files:
the writers and the resumable/sharded bookkeeping consume the tile stream.

Two modes give the same numbers for a dense-equivalent network (within float error):

- ``patch``: the reference. One network forward per grid point on the patch centred there,
  ``batch_size`` patches per forward. Patches are cut from the tile's input block, so the
  volume is read once per tile.
- ``dense``: the network's ``dense_forward`` over the whole tile plus the halo its patch needs
  (``P // 2`` voxels below, ``P - P // 2 - 1`` above each grid point); every grid point of the
  tile is read from that one output. Along an axis whose grid step is at least the patch size
  the tile is cut into one slab per grid plane (batched, ``batch_size`` slabs per forward)
  instead, since nothing is shared between planes there. Networks that are not
  dense-equivalent (``same`` padding, U-Nets) get ``overlap``: an extra context margin of
  ``overlap x tile extent`` voxels on every side (of the axes not cut into slabs) whose
  outputs are dropped, so each tile's points never sit near the edge of the network's input
  (the overlap-tile strategy of the U-Net paper, Ronneberger et al. 2015). Each grid point is answered by exactly one tile.

A multi-scale model (a ``context``: :class:`ContextSource`) also reads, per tile, one block of
the low-pass filtered context volume. In patch mode every grid point's input is its patch and, as
a second channel, every ``stride``-th voxel of that block around it; in dense mode each input slab
goes to the network with the part of that block holding its views
(:meth:`~xpression.models.backbones.multiscale.MultiScale.dense_features`), with the same answers.

Only tiles with at least one grid point in the tissue mask are computed, and each input slab
is cut to the bounding box of its tissue points (on a GPU it spans the whole tile instead, so
every forward has one shape); points outside the mask are NaN. The next tiles' inputs are read
(and, on the CPU, normalised) by background threads while the network runs. On a GPU the raw
blocks are read into page-locked memory, copied asynchronously and normalised on the device
(``apply_torch`` of the transforms in :mod:`xpression.data.intensity`, the same numbers), and a
tile's values are copied back while the next tile computes. Memory is bounded by the tile size
(input block + activations) and the read-ahead depth, not by the volume.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from torch import nn

from xpression.data.context import ContextView
from xpression.data.intensity import has_torch_transform
from xpression.inference.grid import OutputGrid, Tile, Tiling
from xpression.inference.predictor import InferenceError, Predictor

__all__ = ["AxisPlan", "ContextSource", "SweepPlan", "TileResult", "check_context", "default_overlap", "plan_sweep", "sweep", "sweep_tiles", "tile_mask", "tissue_tiles"]

MaskLike = Any  # None | bool array of the grid shape | callable(points_um (N, 3)) -> bool (N,) | obj.contains


@dataclass(frozen=True)
class AxisPlan:
    """Per axis: ``split`` (one input slab per grid index), input voxels ``lo`` before the first
    and ``hi`` after the last grid point of a slab, and the dense output ``stride``/``offset``
    (output ``k`` is centred on input voxel ``offset + k * stride`` of the slab). ``step``:
    outputs per grid step; only every ``step``-th output is asked of the network."""

    split: bool
    lo: int
    hi: int
    stride: int = 1
    offset: int = 0
    step: int = 1


@dataclass(frozen=True)
class SweepPlan:
    mode: str
    axes: tuple[AxisPlan, AxisPlan, AxisPlan]
    patch_shape: tuple[int, int, int]


@dataclass
class TileResult:
    """``values``: ``(T, *tile.shape)`` float32, NaN outside the mask; ``n_points``: grid points
    in the mask; ``voxels``: volume voxels the tile covers; ``seconds``: network time."""

    tile: Tile
    values: np.ndarray
    n_points: int
    voxels: int
    seconds: float


def default_overlap(predictor: Predictor, mode: str) -> float:
    """Context margin per side (fraction of the tile) when none is given: 0 where dense equals
    patch (patch mode, dense-equivalent networks), 0.25 otherwise."""
    return 0.0 if (mode == "patch" or predictor.dense_equivalent) else 0.25


def plan_sweep(predictor: Predictor, grid: OutputGrid, mode: str = "dense", overlap: float | None = None,
               tile_shape: Sequence[int] = (1, 1, 1)) -> SweepPlan:
    """Input geometry per axis for ``mode`` (``"patch"`` or ``"dense"``); see the module doc.

    ``overlap`` (dense mode only): extra context per side as a fraction of the tile extent
    (``None``: :func:`default_overlap`).
    Raises :class:`InferenceError` when the grid does not fall on the model's dense outputs.
    """
    if overlap is None:
        overlap = default_overlap(predictor, mode)
    p = predictor.patch_shape
    if mode == "patch":
        axes = tuple(AxisPlan(grid.step_vox[a] >= p[a], p[a] // 2, p[a] - p[a] // 2 - 1) for a in range(3))
        return SweepPlan("patch", axes, p)  # type: ignore[arg-type]
    if mode != "dense":
        raise InferenceError(f"mode must be 'patch' or 'dense', got {mode!r}")
    geo = predictor.dense_geometry()
    axes = []
    for a in range(3):
        s, o, step = geo.stride[a], geo.offset[a], grid.step_vox[a]
        split = (a == 0 and geo.plane) or (not geo.plane and step >= p[a])
        # a split axis has one grid plane per slab, hence no seams to hide: its slab is the patch
        extra = 0 if split else int(math.ceil(overlap * tile_shape[a] * step))
        if not split and step % s:
            raise InferenceError(
                f"grid step {step} voxels along {'zyx'[a]} is not a multiple of the model's output "
                f"stride {s}; build the grid with multiple_of=dense_multiples(...) or use mode=patch")
        m = 1 if split else step // s
        lo = p[a] // 2 + extra
        # the first grid point must land on an output the network is asked for (every m-th)
        lo += (-(lo - o)) % (s * m)
        hi = p[a] - p[a] // 2 - 1 + extra
        axes.append(AxisPlan(split, lo, hi, s, o, m))
    return SweepPlan("dense", tuple(axes), p)  # type: ignore[arg-type]


def dense_multiples(predictor: Predictor, voxel_size_um: Sequence[float], spacing_um: Sequence[float]) -> tuple[int, int, int]:
    """Per axis the multiple of voxels a dense-mode grid step must be (the output stride, or 1
    where each grid plane gets its own slab)."""
    geo = predictor.dense_geometry()
    out = []
    for a in range(3):
        step = max(1, round(float(np.broadcast_to(spacing_um, (3,))[a]) / float(voxel_size_um[a])))
        split = (a == 0 and geo.plane) or (not geo.plane and step >= predictor.patch_shape[a])
        out.append(1 if split else int(geo.stride[a]))
    return tuple(out)  # type: ignore[return-value]


# -- masks ---------------------------------------------------------------------------------------


def tile_mask(mask: MaskLike, grid: OutputGrid, tile: Tile) -> np.ndarray:
    """Boolean ``tile.shape`` array: which of the tile's grid points are tissue."""
    if mask is None:
        return np.ones(tile.shape, dtype=bool)
    if isinstance(mask, np.ndarray):
        if mask.shape != grid.shape:
            raise InferenceError(f"mask array has shape {mask.shape}, the grid {grid.shape}")
        return np.asarray(mask[tile.slices], dtype=bool)
    fn = mask.contains if hasattr(mask, "contains") else mask
    return np.asarray(fn(grid.points_um(tile.start, tile.stop)), dtype=bool).reshape(tile.shape)


def tissue_tiles(tiling: Tiling, grid: OutputGrid, mask: MaskLike) -> list[int]:
    """Indices of the tiles holding at least one tissue grid point."""
    return [t.index for t in tiling if tile_mask(mask, grid, t).any()]


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slab:
    gstart: tuple[int, int, int]  # grid indices [gstart, gstop)
    gstop: tuple[int, int, int]
    vstart: tuple[int, int, int]  # input voxels [vstart, vstop)
    vstop: tuple[int, int, int]


def _slabs(plan: SweepPlan, grid: OutputGrid, tile: Tile, m: np.ndarray) -> list[_Slab]:
    """Input slabs of a tile: one per grid index along split axes, each shrunk to the bounding
    box of its tissue points (slabs without tissue are dropped)."""
    ranges = []
    for a, ax in enumerate(plan.axes):
        r = [(g, g + 1) for g in range(tile.start[a], tile.stop[a])] if ax.split else [(tile.start[a], tile.stop[a])]
        ranges.append(r)
    out = []
    for combo in itertools.product(*ranges):
        sub = m[tuple(slice(c[0] - t, c[1] - t) for c, t in zip(combo, tile.start))]
        if not sub.any():
            continue
        gs, ge = [], []
        for a, c in enumerate(combo):
            hit = np.flatnonzero(sub.any(axis=tuple(b for b in range(3) if b != a)))
            gs.append(c[0] + int(hit[0]))
            ge.append(c[0] + int(hit[-1]) + 1)
        vs = tuple(int(grid.origin_vox[a] + gs[a] * grid.step_vox[a] - plan.axes[a].lo) for a in range(3))
        ve = tuple(int(grid.origin_vox[a] + (ge[a] - 1) * grid.step_vox[a] + plan.axes[a].hi + 1) for a in range(3))
        out.append(_Slab(tuple(gs), tuple(ge), vs, ve))  # type: ignore[arg-type]
    return out


def _as_predictor(model: nn.Module | Predictor, context: "ContextSource | None") -> Predictor:
    """``model`` as a :class:`Predictor` (a module gets the context view's stride)."""
    if isinstance(model, Predictor):
        return model
    return Predictor(model, context_stride=None if context is None else context.view.stride)


def check_context(pred: Predictor, context: "ContextSource | None", mode: str) -> None:
    """A multi-scale model needs its context view, a single-view model none; in dense mode the
    Predictor's ``context_stride`` must be the view's. :class:`InferenceError` otherwise."""
    if (context is None) != (pred.views == 1):
        raise InferenceError("a multi-scale model (patch and context view) needs context=ContextSource(...)"
                             if context is None else "context= given, but the network takes the patch only")
    if context is not None and mode == "dense" and pred.context_stride != tuple(context.view.stride):
        raise InferenceError(f"the Predictor's context_stride {pred.context_stride} is not the context view's "
                             f"stride {tuple(context.view.stride)}; build it with Predictor(..., context_stride=view.stride)")


def _identity(block: np.ndarray) -> np.ndarray:
    return np.asarray(block, dtype=np.float32)


@dataclass(frozen=True)
class ContextSource:
    """A multi-scale model's context view for the sweep: ``volume`` and ``normalize`` as
    :meth:`~xpression.data.input_spec.InputSpec.prepare_context` gives them (the low-pass
    filtered volume on the same model-voxel lattice as the swept one), and the ``view``."""

    volume: Any
    normalize: Callable[[np.ndarray], np.ndarray]
    view: ContextView

    def margins(self) -> tuple[np.ndarray, np.ndarray]:
        """Voxels the views reach before the first and after the last voxel of the patches they
        go with (per axis): ``span // 2 - P // 2`` and ``span - span // 2 - (P - P // 2)``."""
        span, p = np.asarray(self.view.span_shape), np.asarray(self.view.patch_shape)
        return span // 2 - p // 2, (span - span // 2) - (p - p // 2)

    def region(self, sl: "_Slab") -> tuple[np.ndarray, np.ndarray]:
        """Context voxels ``[lo, hi)`` holding the views of every patch inside input slab ``sl``."""
        before, after = self.margins()
        return np.asarray(sl.vstart) - before, np.asarray(sl.vstop) + after

    def read(self, grid: OutputGrid, parts: Sequence["_Slab"]) -> tuple[np.ndarray, np.ndarray]:
        """The normalised block holding the views of every patch of ``parts``, and its first voxel."""
        regions = [self.region(sl) for sl in parts]
        lo = np.min([r[0] for r in regions], axis=0)
        hi = np.max([r[1] for r in regions], axis=0)
        block = np.asarray(self.normalize(self.volume.read_block(tuple(lo), tuple(hi), fill=0)), dtype=np.float32)
        return block, lo


@dataclass
class _TileInput:
    """A tile read from the volume: its tissue mask, its input slabs and the one block they
    are views of (``block``, a numpy array or a pinned tensor, starts at voxel ``origin``;
    ``raw``: still in the volume's units, to be normalised on the device)."""

    tile: Tile
    mask: np.ndarray
    slabs: list
    origin: np.ndarray | None = None
    block: Any = None
    raw: bool = False
    context_block: Any = None  # a multi-scale model's context block (normalised), from voxel context_origin
    context_origin: np.ndarray | None = None


def _padded(plan: SweepPlan, grid: OutputGrid, tile: Tile, full: Sequence[int], m: np.ndarray) -> list[_Slab]:
    """Slabs of a tile that always have the input shape of a whole tile of ``full`` grid points
    (reaching past the tile's grid points and the tissue), so every forward sees one shape."""
    out = []
    per_axis = []
    for a, ax in enumerate(plan.axes):
        if ax.split:
            per_axis.append([(g, g + 1, 1) for g in range(tile.start[a], tile.stop[a])])
        else:
            per_axis.append([(tile.start[a], tile.stop[a], full[a])])
    for combo in itertools.product(*per_axis):
        if not m[tuple(slice(c[0] - t, c[1] - t) for c, t in zip(combo, tile.start))].any():
            continue
        gs = tuple(c[0] for c in combo)
        ge = tuple(c[1] for c in combo)
        vs = tuple(int(grid.origin_vox[a] + gs[a] * grid.step_vox[a] - plan.axes[a].lo) for a in range(3))
        ve = tuple(int(grid.origin_vox[a] + (gs[a] + combo[a][2] - 1) * grid.step_vox[a] + plan.axes[a].hi + 1)
                   for a in range(3))
        out.append(_Slab(gs, ge, vs, ve))  # type: ignore[arg-type]
    return out


def tile_block(plan: SweepPlan, grid: OutputGrid, tile: Tile, mask: MaskLike,
               pad: Sequence[int] | None) -> tuple[np.ndarray, list, np.ndarray | None, np.ndarray | None]:
    """``(tile mask, slabs, lo, hi)``: the one block ``[lo, hi)`` (volume voxels, z y x) a tile's
    slabs are read from (``pad``: every tile's slabs padded to that shape, as on a GPU); no
    slabs and ``None`` bounds for a tile without tissue."""
    m = tile_mask(mask, grid, tile)
    if not m.any():
        return m, [], None, None
    parts = _padded(plan, grid, tile, pad, m) if pad is not None else _slabs(plan, grid, tile, m)
    return m, parts, np.min([sl.vstart for sl in parts], axis=0), np.max([sl.vstop for sl in parts], axis=0)


def _read_tile(volume: Any, plan: SweepPlan, grid: OutputGrid, tile: Tile, mask: MaskLike,
               normalize: Callable[[np.ndarray], np.ndarray], raw: bool, pin: bool,
               pad: Sequence[int] | None, context: ContextSource | None = None) -> _TileInput:
    """One read per tile (its slabs share chunks, e.g. all z-planes of a tile); slabs are views."""
    m, parts, lo, hi = tile_block(plan, grid, tile, mask, pad)
    if not parts:
        return _TileInput(tile, m, [])
    if raw and pin:
        import torch

        # Page-locked memory, so the copy to the GPU runs asynchronously. The tensor itself (not
        # a numpy view) goes on: torch then keeps its memory from reuse until that copy is done.
        block = torch.empty(tuple(int(n) for n in hi - lo), dtype=_torch_dtype(volume.dtype), pin_memory=True)
        if "out" in inspect.signature(volume.read_block).parameters:
            volume.read_block(tuple(lo), tuple(hi), fill=0, out=block.numpy())
        else:
            block.numpy()[...] = volume.read_block(tuple(lo), tuple(hi), fill=0)
    elif raw:
        block = volume.read_block(tuple(lo), tuple(hi), fill=0)
    else:
        block = np.asarray(normalize(volume.read_block(tuple(lo), tuple(hi), fill=0)), dtype=np.float32)
    if context is None:
        return _TileInput(tile, m, parts, lo, block, raw)
    return _TileInput(tile, m, parts, lo, block, raw, *context.read(grid, parts))


def _torch_dtype(dtype: Any) -> Any:
    import torch

    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


# Volume dtypes whose raw blocks go to the device as they are (the others are normalised on the host).
_DEVICE_DTYPES = tuple(np.dtype(t) for t in ("uint8", "int8", "int16", "uint16", "int32", "float16", "float32"))


def _read_ahead(read: Callable[[Tile], _TileInput], tiles: Iterable[Tile], depth: int,
                workers: int) -> Iterator[_TileInput]:
    """``read`` over ``tiles`` in order, up to ``depth`` tiles ahead on ``workers`` threads
    (volume decoding and normalisation release the GIL); ``depth = 0`` reads inline."""
    if depth <= 0:
        yield from map(read, tiles)
        return
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="xpression-read")
    pending: deque = deque()
    items = iter(tiles)
    try:
        for tile in itertools.islice(items, depth):
            pending.append(pool.submit(read, tile))
        while pending:
            result = pending.popleft().result()
            nxt = next(items, None)
            if nxt is not None:
                pending.append(pool.submit(read, nxt))
            yield result
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)


# -- compute -------------------------------------------------------------------------------------


def _view(block: Any, origin: np.ndarray, sl: _Slab) -> Any:
    return block[tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(sl.vstart, sl.vstop, origin))]


def _windows(block: Any, corners: np.ndarray, shape: Sequence[int], stride: Sequence[int] = (1, 1, 1),
             numpy_gather: bool | None = None) -> Any:
    """``(N, D, H, W)``: the ``shape`` windows of the tensor ``block`` whose first voxels are
    ``corners`` (``(N, 3)`` block voxels), every ``stride``-th voxel; one gather from a view of
    all windows (a copy), the values of slicing each window out in turn. On the CPU numpy
    gathers (several times faster than torch there; ``numpy_gather`` overrides)."""
    import torch

    span = [(n - 1) * k + 1 for n, k in zip(shape, stride)]
    thin = (Ellipsis,) + tuple(slice(None, None, k) for k in stride)
    if block.device.type == "cpu" if numpy_gather is None else numpy_gather:
        every = np.lib.stride_tricks.sliding_window_view(block.numpy(), span)[thin]
        return torch.from_numpy(every[corners[:, 0], corners[:, 1], corners[:, 2]])
    every = block.unfold(0, span[0], 1).unfold(1, span[1], 1).unfold(2, span[2], 1)[thin]
    index = torch.as_tensor(corners, device=block.device)
    return every[index[:, 0], index[:, 1], index[:, 2]]


def _run_patch(pred: Predictor, plan: SweepPlan, grid: OutputGrid, inp: _TileInput, block: Any,
               batch_size: int, out: Any, context: tuple[Any, ContextView] | None = None) -> None:
    """Patch mode; ``context``: the tile's context block (on the device) and the view, for a
    multi-scale model (its second input channel). Each batch's patches (and views) are cut
    from the block in one gather."""
    import torch

    tile, m = inp.tile, inp.mask
    p = plan.patch_shape
    centres, local = [], []  # per grid point: its centre voxel and its index in the tile
    for sl in inp.slabs:
        sub = m[tuple(slice(a - t, b - t) for a, b, t in zip(sl.gstart, sl.gstop, tile.start))]
        idx = np.argwhere(sub) + np.asarray(sl.gstart)
        centres.append(np.asarray(grid.origin_vox) + idx * np.asarray(grid.step_vox))
        local.append(idx - np.asarray(tile.start))
    centre = np.concatenate(centres).astype(np.int64)
    corner = centre - np.array([q // 2 for q in p]) - np.asarray(inp.origin, np.int64)
    loc = torch.as_tensor(np.concatenate(local), device=out.device)
    cblock, view = context if context is not None else (None, None)
    if view is not None:
        ccorner = centre - np.asarray(inp.context_origin, np.int64) - np.asarray(view.span_shape) // 2
    for b0 in range(0, len(centre), batch_size):
        part = slice(b0, b0 + batch_size)
        batch = _windows(block, corner[part], p).to(torch.float32)
        if view is not None:
            batch = torch.stack([batch, _windows(cblock, ccorner[part], p, view.stride).to(torch.float32)], dim=1)
        res = pred.patches_tensor(batch)
        here = loc[part]
        out[:, here[:, 0], here[:, 1], here[:, 2]] = res.T


def _run_dense(pred: Predictor, plan: SweepPlan, grid: OutputGrid, inp: _TileInput, block: Any,
               batch_size: int, out: Any, context: tuple[Any, "ContextSource"] | None = None) -> None:
    """Dense mode; ``context``: the tile's context block (on the device) and its source, for a
    multi-scale model (each slab goes with the part of the block holding its views)."""
    import torch

    tile = inp.tile
    by_shape: dict[tuple, list] = {}
    for sl in inp.slabs:  # slabs of equal shape share a forward
        data, views = _view(block, inp.origin, sl), None
        if context is not None:
            cblock, source = context
            lo, hi = source.region(sl)
            views = cblock[tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, inp.context_origin))]
        by_shape.setdefault(tuple(data.shape), []).append((sl, data, views))
    batches = [g[b0 : b0 + batch_size] for g in by_shape.values() for b0 in range(0, len(g), batch_size)]
    steps = tuple(ax.step for ax in plan.axes)
    for part in batches:
        views = None if context is None else torch.stack([v for _, _, v in part])
        res = pred.dense_tensor(torch.stack([d for _, d, _ in part]), step=steps, context=views)
        for (sl, _, _), r in zip(part, res):
            src, dst = [], []
            for a, ax in enumerate(plan.axes):
                n = sl.gstop[a] - sl.gstart[a]
                first = grid.origin_vox[a] + sl.gstart[a] * grid.step_vox[a] - sl.vstart[a] - ax.offset
                j0 = first // (ax.stride * ax.step)  # index among the outputs returned
                if first % (ax.stride * ax.step) or j0 < 0 or j0 + n > r.shape[a + 1]:
                    raise InferenceError(
                        f"dense output {tuple(r.shape[1:])} of an input {tuple(sl_d - sl_s for sl_s, sl_d in zip(sl.vstart, sl.vstop))} "
                        f"has no position {j0 + n - 1} along {'zyx'[a]}; the model's output_stride/offset "
                        f"({ax.stride}, {ax.offset}) do not match its dense output")
                src.append(slice(j0, j0 + n))
                dst.append(slice(sl.gstart[a] - tile.start[a], sl.gstop[a] - tile.start[a]))
            out[(slice(None),) + tuple(dst)] = r[(slice(None),) + tuple(src)]


@dataclass
class _Launched:
    """A tile whose network work is queued on the device; ``values`` arrive in host memory
    once ``done`` (a CUDA event, or None on the CPU) has completed."""

    tile: Tile
    values: Any
    n_points: int
    voxels: int
    t0: float
    done: Any = None

    def result(self) -> TileResult:
        if self.done is not None:
            self.done.synchronize()
        return TileResult(self.tile, self.values.numpy(), self.n_points, self.voxels, time.perf_counter() - self.t0)


def _launch(pred: Predictor, plan: SweepPlan, grid: OutputGrid, inp: _TileInput, batch_size: int,
            normalize: Any, voxels: int, context: ContextSource | None = None) -> _Launched:
    import torch

    t0 = time.perf_counter()
    dev = pred.device
    block = inp.block if isinstance(inp.block, torch.Tensor) else torch.from_numpy(inp.block)
    if dev.type != "cpu":
        block = block.to(dev, non_blocking=True)
    if inp.raw:
        block = normalize.apply_torch(block)
    T = pred.num_targets
    out = torch.full((T,) + inp.tile.shape, float("nan"), dtype=torch.float32, device=dev)
    cblock = None if context is None else torch.from_numpy(inp.context_block).to(dev, non_blocking=True)
    if plan.mode == "patch":
        _run_patch(pred, plan, grid, inp, block, batch_size, out, None if context is None else (cblock, context.view))
    else:
        _run_dense(pred, plan, grid, inp, block, batch_size, out, None if context is None else (cblock, context))
        outside = torch.from_numpy(~inp.mask).to(dev, non_blocking=True)
        out.masked_fill_(outside, float("nan"))  # broadcast over targets; no host sync
    if dev.type != "cuda":
        return _Launched(inp.tile, out.cpu(), int(inp.mask.sum()), voxels, t0)
    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    host.copy_(out, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(dev))
    return _Launched(inp.tile, host, int(inp.mask.sum()), voxels, t0, done)


def sweep_tiles(
    volume: Any,
    model: nn.Module | Predictor,
    grid: OutputGrid,
    tile_shape: Sequence[int] = (8, 32, 32),
    mode: str = "dense",
    overlap: float | None = None,
    batch_size: int = 64,
    mask: MaskLike = None,
    normalize: Callable[[np.ndarray], np.ndarray] | None = None,
    tiles: Iterable[int] | None = None,
    prefetch: int | None = None,
    skip_empty: bool = True,
    readers: int | None = None,
    pad_tiles: bool | None = None,
    normalize_on_device: bool | None = None,
    context: ContextSource | None = None,
) -> Iterator[TileResult]:
    """Predict every grid point of ``grid`` over ``volume``, tile by tile.

    Args:
        volume: anything with ``read_block(start_vox, stop_vox, fill)`` (a ``Volume``).
        model: a network (see :mod:`xpression.inference.predictor`) or a :class:`Predictor`.
        grid: the output points (voxels of ``volume``).
        tile_shape: grid points per tile (z, y, x); the unit of compute, storage and resumption.
        mode: ``"patch"`` (one forward per grid point) or ``"dense"``.
        overlap: dense mode, extra context per side as a fraction of the tile extent; default 0
            for dense-equivalent networks, 0.25 otherwise.
        batch_size: patches (patch mode) or input slabs (dense mode) per forward.
        mask: tissue at grid points: ``None`` (all), a bool array of ``grid.shape``, a callable
            on ``(N, 3)`` um points, or an object with ``contains`` (a ``TissueMask``).
        normalize: raw block -> float32 intensities the network was trained on (default: cast).
            One with ``apply_torch`` (``xpression.data.intensity``) runs on the GPU there.
        tiles: tile indices to compute (default: all), in this order.
        prefetch: tiles read ahead of the network (0: read inline; default: one more than
            ``readers``, at least 2).
        skip_empty: do not yield tiles without tissue.
        readers: threads reading ahead (default 1 on the CPU, up to 4 beside a GPU; each read
            also decodes its chunks on the volume library's own threads).
        normalize_on_device: normalise raw blocks with the transform's ``apply_torch`` next to
            the network (default: on a GPU, when the transform has one; same numbers).
        pad_tiles: dense mode, every slab spans a whole tile (past the volume and the tissue;
            those outputs are dropped) so that every forward has the same input shape (cuDNN
            autotuning, compiled graphs). Default: on a GPU. The values are the same for
            dense-equivalent networks (others see more context).
        context: a multi-scale model's context view (both modes; its dense mode needs the
            Predictor's ``context_stride``, set from it when ``model`` is a module).

    Yields:
        :class:`TileResult` per tile, in the order of ``tiles``. On a GPU the next tile's work is
        queued before a tile is handed over, so the device is not idle while it is stored.
    """
    pred = _as_predictor(model, context)
    check_context(pred, context, mode)
    tiling = Tiling(grid.shape, tuple(int(t) for t in tile_shape))  # type: ignore[arg-type]
    plan = plan_sweep(pred, grid, mode, overlap, tiling.tile_shape)
    order = range(len(tiling)) if tiles is None else tiles
    on_gpu = pred.device.type == "cuda"
    if readers is None:
        readers = min(4, max(1, (os.cpu_count() or 2) // 2)) if on_gpu else 1
    if prefetch is None:
        prefetch = max(2, readers + 1)
    if pad_tiles is None:
        pad_tiles = on_gpu
    normalize = normalize or _identity
    # Raw blocks travel to the GPU (fewer bytes) and are normalised there, with the same numbers.
    if normalize_on_device is None:
        normalize_on_device = pred.device.type != "cpu" and np.dtype(volume.dtype) in _DEVICE_DTYPES
    raw = bool(normalize_on_device) and has_torch_transform(normalize)
    pad = tiling.tile_shape if (pad_tiles and plan.mode == "dense") else None

    def read(tile: Tile) -> _TileInput:
        return _read_tile(volume, plan, grid, tile, mask, normalize, raw, on_gpu, pad, context)

    T = pred.num_targets
    pending: _Launched | None = None
    for inp in _read_ahead(read, (tiling.tile(int(i)) for i in order), prefetch, readers):
        tile = inp.tile
        voxels = int(np.prod(np.asarray(tile.shape) * np.asarray(grid.step_vox)))
        if not inp.slabs:
            if not skip_empty:
                if pending is not None:
                    yield pending.result()
                    pending = None
                yield TileResult(tile, np.full((T,) + tile.shape, np.nan, np.float32), 0, voxels, 0.0)
            continue
        launched = _launch(pred, plan, grid, inp, batch_size, normalize, voxels, context)
        if pending is not None:
            yield pending.result()
        pending = launched
        if not on_gpu:  # nothing runs asynchronously: hand it over now
            yield pending.result()
            pending = None
    if pending is not None:
        yield pending.result()


def sweep(volume: Any, model: nn.Module | Predictor, grid: OutputGrid, **kwargs: Any) -> np.ndarray:
    """All of :func:`sweep_tiles` in memory: ``(T, nz, ny, nx)`` float32, NaN outside the mask.

    For volumes whose output does not fit in memory, stream :func:`sweep_tiles` into a writer.
    """
    pred = _as_predictor(model, kwargs.get("context"))
    out = np.full((pred.num_targets,) + tuple(grid.shape), np.nan, dtype=np.float32)
    for res in sweep_tiles(volume, pred, grid, **kwargs):
        out[(slice(None),) + res.tile.slices] = res.values
    return out

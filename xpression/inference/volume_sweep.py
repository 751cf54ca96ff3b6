"""One volume end to end: grid, tissue tiles, this process's share, the sweep, the store.

``infer_volume`` is what ``infer.py`` runs per volume; it is resumable (finished tiles are
skipped) and shardable (``rank``/``world``: each process computes every ``world``-th tissue
tile and writes only its own chunks; rank 0 then waits for all tiles and builds the pyramid).
Tiles are stored by a background thread (a bounded queue), so compression and disk writes do
not hold up the network; a tile is recorded as done only once its chunk is written.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from xpression.data.context import context_block_shape
from xpression.inference.grid import OutputGrid, Tiling, choose_tile_shape, make_grid
from xpression.inference.predictor import InferenceError, Predictor
from xpression.inference.shards import shard, wait_for
from xpression.inference.sweep import TileResult, default_overlap, dense_multiples, plan_sweep, sweep_tiles, tissue_tiles
from xpression.inference.writers import MapStore, _read_meta

__all__ = ["DEFAULT_TILE_VOX", "SweepSettings", "VolumeSweep", "auto_tile_vox", "infer_volume", "plan_grid", "slab_input_shape"]

# Tile extent (voxels, z y x) on the CPU and wherever no device memory is known.
DEFAULT_TILE_VOX = (64, 256, 256)
# In-plane tile extents auto_tile_vox chooses from on a GPU (voxels).
_GPU_TILE_YX = (4096, 2048, 1024, 512, 256)

log = logging.getLogger(__name__)


@dataclass
class VolumeSweep:
    """What one process did for one volume."""

    path: Path
    grid: OutputGrid
    tile_shape: tuple[int, int, int]
    notes: list[str]
    tiles_total: int = 0
    tiles_tissue: int = 0
    tiles_computed: int = 0
    points: int = 0
    seconds: float = 0.0
    skipped: bool = False
    complete: bool = False
    extra: dict = field(default_factory=dict)


def plan_grid(volume: Any, predictor: Predictor, spacing_um: Sequence[float] | float, mode: str,
              anchor_um: Sequence[float | None] | None = None) -> tuple[OutputGrid, list[str]]:
    """The output grid for ``volume``: ``spacing_um`` rounded to whole voxels and, when the model
    has a dense mode, to steps it can produce densely (in both modes, so they compare)."""
    spacing = np.broadcast_to(np.asarray(spacing_um, float), (3,))
    mult = (1, 1, 1)
    if predictor.can_dense:
        mult = dense_multiples(predictor, volume.voxel_size_um, spacing)
    elif mode == "dense":
        raise InferenceError(f"{type(predictor.net).__name__} has no dense mode; use mode=patch")
    return make_grid(volume.shape, volume.voxel_size_um, spacing, mult, anchor_um, getattr(volume, "origin_um", (0, 0, 0)))


def slab_input_shape(plan: Any, tile_shape: Sequence[int]) -> tuple[int, tuple[int, int, int]]:
    """``(slabs, (D, H, W))``: how many input slabs a whole tile of ``tile_shape`` grid points
    is cut into and the voxels of each (dense mode, see :func:`~xpression.inference.sweep.plan_sweep`)."""
    n = [1 if ax.split else int(t) for ax, t in zip(plan.axes, tile_shape)]
    count = int(np.prod([int(t) if ax.split else 1 for ax, t in zip(plan.axes, tile_shape)]))
    shape = tuple(ax.lo + ax.hi + 1 + (k - 1) * ax.stride * ax.step for ax, k in zip(plan.axes, n))
    return count, shape  # type: ignore[return-value]


# CUDA and cuDNN kernels index a tensor with 32-bit integers: a forward holding a larger tensor
# fails (an illegal memory access was seen on an H200 with 3 x 32 x 21 x 2048^2 activations)
# or falls back to slow 64-bit kernels.
_MAX_TENSOR_ELEMENTS = 2**31 - 1


def _peak_bytes(net: Any, plan: Any, batch: int, shape: Sequence[int], half: bool,
                context_stride: Sequence[int] | None = None) -> tuple[int, int]:
    """Device memory one dense forward of ``batch`` slabs of ``shape`` voxels needs, estimated
    without running it: the network on the meta device, the largest sum over its operations of
    their input and output tensors (floating point in the compute precision), plus the float32
    input block; and the element count of the largest single tensor. ``context_stride``: a
    multi-scale model's, whose forward also takes its context block."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * ((2 if half else 4) if t.is_floating_point() else t.element_size())

    class Largest(TorchDispatchMode):
        peak = 0
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            seen = {id(t): t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)}
            total = sum(nbytes(t) for t in seen.values())
            if "max_pool" in str(func) and isinstance(out, torch.Tensor):
                total += out.numel() * 8  # on CUDA max pooling also returns int64 indices
            Largest.peak = max(Largest.peak, total)
            Largest.numel = max([Largest.numel, *(t.numel() for t in seen.values())])
            return out

    steps = tuple(ax.step for ax in plan.axes)
    kwargs = {"step": steps} if any(s > 1 for s in steps) else {}
    x = torch.zeros((batch, 1) + tuple(int(s) for s in shape), device="meta")
    if context_stride is not None:
        cshape = context_block_shape(shape, plan.patch_shape, context_stride)
        kwargs.update(context=torch.zeros((batch, 1) + cshape, device="meta"), context_stride=tuple(context_stride))
    with torch.inference_mode(), Largest():
        try:
            net.dense_forward(x, **kwargs)
        except TypeError:  # a dense path without ``step``
            net.dense_forward(x)
    return int(Largest.peak + x.numel() * 4), int(max(Largest.numel, x.numel()))


def auto_tile_vox(predictor: Predictor, grid: OutputGrid, volume_shape: Sequence[int], mode: str = "dense",
                  overlap: float | None = None, batch_size: int = 64, chunks: Sequence[int] | None = None,
                  memory_bytes: int | None = None, fraction: float = 0.5) -> tuple[int, int, int]:
    """Tile extent (voxels, z y x) for this device: :data:`DEFAULT_TILE_VOX` on the CPU; on a
    GPU the largest in-plane extent (4096 ... 256 voxels, no larger than the volume needs) whose
    dense forward is estimated (:func:`_peak_bytes`, from the network's shapes alone, so every
    process and every resumption of a sweep gets the same answer) to fit in ``fraction`` of the
    device's memory with no tensor over 2^31 elements (32-bit kernel indexing), then shrunk to
    cover the volume with as few tiles (see :func:`_balanced`).
    Larger tiles recompute less halo: 2048^2 tiles of a 128-voxel patch do 13% more work than
    the tile itself, 256^2 tiles 124% more."""
    if mode != "dense" or predictor.device.type != "cuda" or not predictor.can_dense:
        return DEFAULT_TILE_VOX
    import torch

    total = memory_bytes or torch.cuda.get_device_properties(predictor.device).total_memory
    extent = max(int(volume_shape[1]), int(volume_shape[2]))
    fits = [c for c in _GPU_TILE_YX if c < extent] + [min([c for c in _GPU_TILE_YX if c >= extent] or [max(_GPU_TILE_YX)])]
    try:
        net = copy.deepcopy(predictor.net).to("meta")
    except Exception:  # networks that cannot be copied to the meta device
        return DEFAULT_TILE_VOX
    half = predictor.precision == "bf16"
    for yx in sorted(set(fits), reverse=True):
        want = (DEFAULT_TILE_VOX[0], yx, yx)
        tile_shape = choose_tile_shape(grid, want, chunks)
        plan = plan_sweep(predictor, grid, "dense", overlap, tile_shape)
        count, shape = slab_input_shape(plan, tile_shape)
        try:
            need, _ = _peak_bytes(net, plan, min(count, batch_size), shape, half, predictor.context_stride)
            _, largest = _peak_bytes(net, plan, 1, shape, half, predictor.context_stride)  # the sweep stacks fewer slabs if need be
        except Exception:
            return DEFAULT_TILE_VOX
        if need <= fraction * total and largest <= _MAX_TENSOR_ELEMENTS:
            log.info("tiles of %s voxels: one forward needs about %.1f GiB of the GPU's %.0f GiB", want, need / 2**30, total / 2**30)
            return (want[0], _balanced(int(volume_shape[1]), yx), _balanced(int(volume_shape[2]), yx))
    yx = min(_GPU_TILE_YX)
    return (DEFAULT_TILE_VOX[0], _balanced(int(volume_shape[1]), yx), _balanced(int(volume_shape[2]), yx))


def dense_slabs_per_forward(predictor: Predictor, grid: OutputGrid, tile_shape: Sequence[int], mode: str,
                            overlap: float, batch_size: int) -> int:
    """Input slabs stacked into one dense forward on a GPU: ``batch_size``, fewer where the
    stack would hold a tensor over 2^31 elements (32-bit kernel indexing); on the CPU, in patch
    mode and for networks that cannot be copied to the meta device, ``batch_size``."""
    if mode != "dense" or predictor.device.type != "cuda" or not predictor.can_dense:
        return batch_size
    try:
        net = copy.deepcopy(predictor.net).to("meta")
        plan = plan_sweep(predictor, grid, "dense", overlap, tile_shape)
        _, shape = slab_input_shape(plan, tile_shape)
        _, per_slab = _peak_bytes(net, plan, 1, shape, predictor.precision == "bf16", predictor.context_stride)
    except Exception:
        return batch_size
    return max(1, min(batch_size, _MAX_TENSOR_ELEMENTS // max(per_slab, 1)))


def _balanced(extent: int, most: int, multiple: int = 64) -> int:
    """The smallest tile extent (a multiple of ``multiple``, at most ``most``) that covers
    ``extent`` voxels with as few tiles as ``most`` does: padded GPU tiles waste little at the
    volume's edge (9,000 voxels: 5 tiles of 1,856, not 5 of 2,048)."""
    n = max(1, math.ceil(extent / most))
    return min(most, max(multiple, math.ceil(extent / n / multiple) * multiple))


def _stored_tile_shape(out: Path, rank: int, overwrite: bool, wait_s: float) -> tuple[int, int, int] | None:
    """The tile shape of the map store being resumed (or, for rank > 0, the one rank 0 made)."""
    if rank > 0:
        started = time.time() - 5.0
        wait_for(lambda: (m := _read_meta(out)) is not None and (not overwrite or m.get("created", 0) >= started),
                 wait_s, f"rank 0 to create {out}")
    meta = None if (overwrite and rank == 0) else _read_meta(out)
    return tuple(int(t) for t in meta["tile_shape"]) if meta and "tile_shape" in meta else None  # type: ignore[return-value]


class _WriteBehind:
    """Stores tiles on a background thread from a queue of at most ``depth`` tiles; ``after``
    runs there once a tile is stored. An error in either reaches the caller at its next
    :meth:`put` or at :meth:`close`."""

    def __init__(self, store: MapStore, after: Callable[[TileResult], None], depth: int = 4):
        self.store, self.after = store, after
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.error: BaseException | None = None
        self.abort = False
        self.thread = threading.Thread(target=self._run, name="xpression-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            tr = self.q.get()
            if tr is None:
                return
            if self.error is not None or self.abort:
                continue  # drain: the tile is not marked done, so a resumed sweep recomputes it
            try:
                self.store.write_tile(tr.tile, tr.values)
                self.after(tr)
            except BaseException as exc:  # handed to the caller
                self.error = exc

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, tr: TileResult) -> None:
        while True:
            self._raise()
            try:
                self.q.put(tr, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self, abort: bool = False) -> None:
        self.abort = abort
        self.q.put(None)
        self.thread.join()
        if not abort:
            self._raise()


@dataclass(frozen=True)
class SweepSettings:
    """How a volume is swept and stored (``infer.py``'s grid, sweep and store keys; a config
    builds it with ``_target_: xpression.inference.volume_sweep.SweepSettings``).

    ``spacing_um``: output grid spacing (um, z y x); ``mode``: ``dense`` or ``patch`` (one
    forward per grid point); ``tile_vox``: tile extent (voxels, z y x, rounded to whole grid
    steps and to storage chunks), or ``"auto"``/``None``: :func:`auto_tile_vox` (a resumed store
    keeps its own tiles); ``overlap``, ``batch_size``, ``prefetch``, ``readers``, ``pad_tiles``:
    as in :func:`~xpression.inference.sweep.sweep_tiles` (``batch_size`` None: the predictor's
    ``default_batch_size``, 64 for networks); ``levels``: pyramid levels of the
    store; ``overwrite``: replace a finished store (never done silently); ``write_queue``:
    computed tiles waiting to be stored; ``wait_s``: how long a process waits for the others.
    """

    spacing_um: Sequence[float] | float = (33.6, 25.6, 25.6)
    mode: str = "dense"
    tile_vox: Sequence[int] | str | None = DEFAULT_TILE_VOX
    overlap: float | None = None
    batch_size: int | None = None
    prefetch: int | None = None
    readers: int | None = None
    pad_tiles: bool | None = None
    levels: int = 3
    overwrite: bool = False
    write_queue: int = 4
    progress: bool = True
    wait_s: float = 86400.0

    def replace(self, **changes: Any) -> "SweepSettings":
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


def infer_volume(
    volume: Any,
    predictor: Predictor,
    out: str | Path,
    settings: SweepSettings = SweepSettings(),
    *,
    mask: Any = None,
    normalize: Callable[[np.ndarray], np.ndarray] | None = None,
    identity: dict | None = None,
    metadata: dict | None = None,
    anchor_um: Sequence[float | None] | None = None,
    rank: int = 0,
    world: int = 1,
    on_tile: Callable[[TileResult], None] | None = None,
    context: Any = None,
) -> VolumeSweep:
    """Sweep ``volume`` into the map store ``out`` (see :mod:`xpression.inference.writers`) as
    ``settings`` say.

    ``mask``: the tissue mask (tiles without tissue are skipped, points outside are NaN);
    ``normalize``: raw block -> the model's input intensities (``InputSpec.prepare``);
    ``identity``: the run's identity (a store holding another is an error); ``metadata``: kept
    in the store; ``anchor_um``: a plane the grid passes through (z, y, x; None: free);
    ``rank``/``world``: this process's share of the tiles. ``on_tile`` is called (on the
    writing thread) after each tile is stored. A finished store is left alone unless
    ``settings.overwrite``. ``context``: a multi-scale model's
    :class:`~xpression.inference.sweep.ContextSource` (either mode).
    """
    st = settings
    spacing_um, mode, tile_vox, overlap, batch_size = st.spacing_um, st.mode, st.tile_vox, st.overlap, st.batch_size
    overwrite, wait_s = st.overwrite, st.wait_s
    if batch_size is None:
        batch_size = predictor.default_batch_size
    grid, notes = plan_grid(volume, predictor, spacing_um, mode, anchor_um)
    if overlap is None:
        overlap = default_overlap(predictor, mode)
    chunks = getattr(volume, "chunks", None)
    if tile_vox is None or isinstance(tile_vox, str):
        if tile_vox not in (None, "auto"):
            raise InferenceError(f"tile_vox must be 3 voxel counts (z, y, x) or 'auto', got {tile_vox!r}")
        tile_shape = _stored_tile_shape(Path(out), rank, overwrite, wait_s) or choose_tile_shape(
            grid, auto_tile_vox(predictor, grid, volume.shape, mode, overlap, batch_size, chunks), chunks)
    else:
        tile_shape = choose_tile_shape(grid, tile_vox, chunks)
    recorded = {"mode": mode, "overlap": float(overlap), "spacing_um": list(grid.spacing_um),
                "volume_shape": list(volume.shape), "volume_path": str(getattr(volume, "path", ""))}
    ident = dict(identity or {}, model=predictor.identity())
    store = MapStore.open(out, grid, tile_shape, predictor.output_names(), ident, recorded,
                          metadata={**(metadata or {}), "notes": notes}, levels=st.levels,
                          overwrite=overwrite, rank=rank)
    res = VolumeSweep(store.path, grid, tile_shape, notes)
    if store.complete:
        res.skipped = res.complete = True
        log.info("%s is complete; skipped (overwrite=true recomputes it)", store.path)
        return res
    tiling = Tiling(grid.shape, tile_shape)
    tissue = tissue_tiles(tiling, grid, mask)
    res.tiles_total, res.tiles_tissue = len(tiling), len(tissue)
    done = store.done()
    todo = [i for i in shard(tissue, rank, world) if i not in done]
    slabs_per_forward = dense_slabs_per_forward(predictor, grid, tile_shape, mode, overlap, batch_size)
    if slabs_per_forward < batch_size:
        log.info("dense forwards of %d input slab(s), not %d: a larger stack would hold a tensor over 2^31 elements",
                 slabs_per_forward, batch_size)
    t0 = time.perf_counter()
    name = (metadata or {}).get("volume_id") or getattr(volume, "path", None) or Path(out).name
    with _Progress(len(todo), f"{Path(str(name)).name} [{mode}]", st.progress) as bar:

        def stored(tr: TileResult) -> None:
            res.tiles_computed += 1
            res.points += tr.n_points
            bar.advance(tr.voxels)
            if on_tile is not None:
                on_tile(tr)

        writer = _WriteBehind(store, stored, st.write_queue)
        try:
            for tr in sweep_tiles(volume, predictor, grid, tile_shape, mode, overlap, slabs_per_forward, mask,
                                  normalize, tiles=todo, prefetch=st.prefetch, readers=st.readers, pad_tiles=st.pad_tiles,
                                  context=context):
                writer.put(tr)
        except BaseException:
            writer.close(abort=True)
            raise
        writer.close()
    res.seconds = time.perf_counter() - t0
    if rank == 0:
        store.finalize(tissue, wait_s=wait_s, extra={"tiles_tissue": len(tissue), "tiles_total": len(tiling)})
        res.complete = True
    store.log.close()
    return res


class _Progress:
    """Tiles done, volume voxels per second and ETA: a live bar (rich) on a terminal; elsewhere
    (a batch job's log, ``> file``) a log line after the first tile (the first time left), then
    every ``every_s`` seconds, and one at the end."""

    def __init__(self, total: int, desc: str, enabled: bool, every_s: float = 30.0, terminal: bool | None = None):
        self.enabled = enabled and total > 0
        self.total, self.done, self.voxels, self.t0 = total, 0, 0, time.perf_counter()
        self.desc, self.every_s, self.last_line = desc, float(every_s), self.t0
        if terminal is None:
            from rich.console import Console

            terminal = Console().is_terminal
        self.live = self.enabled and terminal
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("tiles  {task.fields[rate]}"), TimeRemainingColumn())
            self.task = self.p.add_task(desc, total=total, rate="")

    def __enter__(self) -> "_Progress":
        if self.live:
            self.p.start()
        return self

    def advance(self, voxels: int) -> None:
        self.voxels += voxels
        self.done += 1
        now = time.perf_counter()
        rate = self.voxels / max(now - self.t0, 1e-9)
        if self.live:
            self.p.update(self.task, advance=1, rate=f"{rate / 1e6:.2f} Mvox/s")
        elif self.enabled and (now - self.last_line >= self.every_s or self.done in (1, self.total)):
            self.last_line = now
            eta = (now - self.t0) / self.done * (self.total - self.done)
            log.info("%s: %d/%d tiles (%.0f%%), %.2f Mvox/s, %s left", self.desc, self.done, self.total,
                     100 * self.done / self.total, rate / 1e6, _duration(eta))

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.p.stop()


def _duration(seconds: float) -> str:
    """``1 h 02 min``, ``3 min 05 s`` or ``42 s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"

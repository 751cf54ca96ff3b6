"""One volume end to end: grid, tissue tiles, this process's share, the sweep, the store.

``infer_volume`` is what ``infer.py`` runs per volume; it is resumable (finished tiles are
skipped) and shardable (``rank``/``world``: each process computes every ``world``-th tissue
tile and writes only its own chunks; rank 0 then waits for all tiles and builds the pyramid).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from xpression.inference.grid import OutputGrid, Tiling, choose_tile_shape, make_grid
from xpression.inference.predictor import Predictor
from xpression.inference.shards import shard
from xpression.inference.sweep import TileResult, default_overlap, dense_multiples, sweep_tiles, tissue_tiles
from xpression.inference.writers import MapStore

__all__ = ["VolumeSweep", "infer_volume", "plan_grid"]

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
        from xpression.inference.predictor import InferenceError

        raise InferenceError(f"{type(predictor.net).__name__} has no dense mode; use mode=patch")
    return make_grid(volume.shape, volume.voxel_size_um, spacing, mult, anchor_um, getattr(volume, "origin_um", (0, 0, 0)))


def infer_volume(
    volume: Any,
    predictor: Predictor,
    out: str | Path,
    *,
    spacing_um: Sequence[float] | float,
    mode: str = "dense",
    tile_vox: Sequence[int] = (64, 256, 256),
    overlap: float | None = None,
    batch_size: int = 64,
    mask: Any = None,
    normalize: Callable[[np.ndarray], np.ndarray] | None = None,
    identity: dict | None = None,
    metadata: dict | None = None,
    anchor_um: Sequence[float | None] | None = None,
    levels: int = 3,
    overwrite: bool = False,
    rank: int = 0,
    world: int = 1,
    prefetch: int = 2,
    progress: bool = True,
    on_tile: Callable[[TileResult], None] | None = None,
    wait_s: float = 86400.0,
) -> VolumeSweep:
    """Sweep ``volume`` into the map store ``out`` (see :mod:`xpression.inference.writers`).

    ``spacing_um``: output grid spacing (um); ``tile_vox``: tile extent (voxels, z y x, rounded
    to whole grid steps and to storage chunks); other arguments as in
    :func:`~xpression.inference.sweep.sweep_tiles`. ``identity``: the run's identity (a store
    holding another is an error). ``on_tile`` is called after each tile is stored.
    A finished store is left alone unless ``overwrite``.
    """
    grid, notes = plan_grid(volume, predictor, spacing_um, mode, anchor_um)
    tile_shape = choose_tile_shape(grid, tile_vox, getattr(volume, "chunks", None))
    if overlap is None:
        overlap = default_overlap(predictor, mode)
    settings = {"mode": mode, "overlap": float(overlap), "spacing_um": list(grid.spacing_um),
                "volume_shape": list(volume.shape), "volume_path": str(getattr(volume, "path", ""))}
    ident = dict(identity or {}, model=predictor.identity())
    store = MapStore.open(out, grid, tile_shape, predictor.target_names or [], ident, settings,
                          metadata={**(metadata or {}), "notes": notes}, levels=levels,
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
    t0 = time.perf_counter()
    with _Progress(len(todo), f"{Path(out).name} [{mode}]", progress) as bar:
        for tr in sweep_tiles(volume, predictor, grid, tile_shape, mode, overlap, batch_size, mask,
                              normalize, tiles=todo, prefetch=prefetch):
            store.write_tile(tr.tile, tr.values)
            res.tiles_computed += 1
            res.points += tr.n_points
            bar.advance(tr.voxels)
            if on_tile is not None:
                on_tile(tr)
    res.seconds = time.perf_counter() - t0
    if rank == 0:
        store.finalize(tissue, wait_s=wait_s, extra={"tiles_tissue": len(tissue), "tiles_total": len(tiling)})
        res.complete = True
    store.log.close()
    return res


class _Progress:
    """Tiles done, volume voxels per second and ETA (rich), or nothing."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.enabled = enabled and total > 0
        self.total, self.voxels, self.t0 = total, 0, time.perf_counter()
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("tiles  {task.fields[rate]}"), TimeRemainingColumn())
            self.task = self.p.add_task(desc, total=total, rate="")

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self.p.start()
        return self

    def advance(self, voxels: int) -> None:
        self.voxels += voxels
        if self.enabled:
            rate = self.voxels / max(time.perf_counter() - self.t0, 1e-9)
            self.p.update(self.task, advance=1, rate=f"{rate / 1e6:.2f} Mvox/s")

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.p.stop()

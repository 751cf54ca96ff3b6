"""Sweep speed: end to end against a bare trunk, patch vs dense mode, peak memory.

    python benchmarks/sweep.py [--model cnn3d|published|published-same] [--device cpu|cuda]
                               [--cohort COHORT.yaml | --volume VOLUME.ome.zarr] [--out DIR]
                               [--size-um Z Y X] [--tile-vox Z Y X | --tile-vox auto] [--threads N]

Networks (``--model``), all with random weights (speed does not depend on them), on the paper's
grid density (33.6 x 25.6 x 25.6 um):

- ``cnn3d`` (default): ``conf/model/cnn3d.yaml`` for the phantom's 6.4 um voxels (16/32/64 valid
  convolutions, Dense 64, a 34 x 205 x 205 um patch = 5 x 33 x 33 voxels); ``--widths`` changes
  its widths.
- ``published``: the published layers (Conv3D 32/64/128/256, 3 x 9 x 9 kernels, max-pool 2,
  Dense 64) with valid padding, i.e. dense-equivalent, at the study's own geometry: 1.6 um
  voxels, a 21 x 128 x 128 patch (floor pooling leaves it a receptive field of 18 x 128 x 128).
- ``published-same``: ``cnn3d_paper``, the published network as published (same padding) on the
  same patch. Not dense-equivalent: the script reports how far dense is from patch mode.

Without ``--cohort`` or ``--volume`` a one-volume cohort with the ``large`` phantom preset's
parameters is generated in ``--out`` (``--size-um`` crops it: the full 6.4 mm cube takes long to
generate and patch mode over it would take hours on a CPU; the published networks get 1.6 um
voxels). ``--volume`` sweeps an existing volume (e.g. OME-Zarr) with its own robust-range
normalisation, quantised as a uint8 training cache is (``--mask none`` or ``otsu``).

What is measured, in one run, on ``--device`` (CUDA: bf16 autocast, channels-last):

1. ``--throughput`` (default on CUDA and with ``--volume``): the end-to-end sweep
   (``infer_volume``: read, normalise, network, write the map store) over the whole volume, run
   twice (the first warms up cuDNN's autotuning and the caches); volume voxels per second
   (whole run, and steady state after the first tile), grid points per second, peak GPU memory,
   and the time a whole lung (2,000 x 9,000 x 9,000 voxels) would take at that rate. Next to it
   the bare trunk: the same network on random input slabs of the same shape already on the
   device, no I/O, timed alone; the ratio end to end / bare trunk is what the pipeline costs.
   On CUDA the bare trunk is timed with cuDNN's autotuning off and on, and once more with every
   3D convolution left to cuDNN's 3D kernels (``xpression.models.backbones.depth_fold`` folds a
   layer's kernel depth into 2D channels where that is faster; which layers it folded and the
   times of both are printed).
2. Patch vs dense mode on the same points: dense runs over every tissue tile (CPU) or the
   middle tiles (``--throughput``); patch mode over the first ``--patch-points`` tissue points
   of the middle tiles, and its time for the whole volume is extrapolated from its measured rate
   per grid point (printed as such). Two ceilings are printed next to the measured speed-up: the
   FLOP ceiling (FLOPs of one patch forward over dense FLOPs per grid point for these tiles) and
   the overlap bound (input voxels of a patch over input voxels per grid point: what a sweep
   that computes each first-layer output once could at most save).
3. On the CPU, peak RSS in fresh processes sweeping (dense, streaming to a map store) a crop of
   the volume and a crop 8x larger (2x per axis); ``--no-rss`` skips it.

``--json PATH`` also writes the figures as JSON; ``--profile PATH`` writes the slowest device
kernels of one bare-trunk forward (torch.profiler).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MASK = "truth"


class Crop:
    """The box ``[start, start + shape)`` of a volume as a volume (same voxel size)."""

    def __init__(self, volume, start, shape):
        self.v, self.start = volume, np.asarray(start, np.int64)
        self.shape = tuple(int(s) for s in shape)
        self.voxel_size_um, self.dtype, self.chunks = volume.voxel_size_um, volume.dtype, volume.chunks
        self.origin_um = tuple(float(o + s * v) for o, s, v in zip(volume.origin_um, self.start, volume.voxel_size_um))
        self.path = volume.path

    def read_block(self, start, stop, fill=0):
        lo = np.asarray(start) + self.start
        hi = np.asarray(stop) + self.start
        block = self.v.read_block(lo, hi, fill=fill)
        # Voxels outside the crop read as fill, so the crop behaves like a smaller volume.
        inside = [(np.arange(a, b) >= 0) & (np.arange(a, b) < n) for a, b, n in zip(start, stop, self.shape)]
        block[~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])] = fill
        return block


WIDTHS: list[int] | None = None  # --widths: conv widths instead of conf/model/cnn3d.yaml's
MODEL = "cnn3d"
PUBLISHED_VOXEL_UM = 1.6
PUBLISHED_PATCH = (21, 128, 128)


def build_model(voxel_um: float, targets: int = 6):
    import logging

    import yaml

    from xpression.data.geometry import PatchGeometry
    from xpression.models.net import build_net
    from xpression.models.targets import as_target_spec

    spec = as_target_spec({"names": [f"p{i}" for i in range(targets)], "kind": "composition"})
    if MODEL == "cnn3d":
        cfg = yaml.safe_load((REPO / "conf" / "model" / "backbone" / "cnn3d.yaml").read_text())
        if WIDTHS:
            cfg["widths"] = list(WIDTHS)
        return build_net(cfg, spec, PatchGeometry().shape_vox((voxel_um,) * 3)).eval()
    if abs(voxel_um - PUBLISHED_VOXEL_UM) > 1e-6:
        raise SystemExit(f"--model {MODEL} is built for {PUBLISHED_VOXEL_UM} um voxels, the cohort has {voxel_um} um; "
                         f"generate one with --voxel-um {PUBLISHED_VOXEL_UM} (the default without --cohort)")
    if MODEL == "published-same":
        cfg = {"name": "cnn3d_paper"}
    else:
        cfg = {"name": "cnn3d", "widths": [32, 64, 128, 256], "kernel_size": [[3, 9, 9]] * 3 + [[1, 9, 9]],
               "pool": [[2, 2, 2], [2, 2, 2], [1, 2, 2]], "padding": "valid", "dense_width": 64}
    logging.getLogger("xpression.models.backbones.cnn3d").setLevel(logging.ERROR)  # the known 18-slice field
    return build_net(cfg, spec, PUBLISHED_PATCH).eval()


DEVICE = "cpu"
COMPILE = False


def setup(cohort: Path | None, volume: Path | None = None):
    """``(volume, predictor, normaliser, mask)`` for a cohort's first volume or a volume file."""
    import torch

    from xpression.data.intensity import IntensityNormalizer
    from xpression.data.patches import Quantised
    from xpression.data.mask import tissue_mask
    from xpression.data.volume import open_volume
    from xpression.inference.predictor import Predictor

    if volume is not None:
        vol = open_volume(volume)
        norm = Quantised(IntensityNormalizer.from_volume(vol))
    else:
        from xpression.data.manifest import load_manifest

        entry = load_manifest(cohort).volumes[0]
        vol = open_volume(entry.image, entry.voxel_size_um)
        norm = IntensityNormalizer.from_volume(vol)
    torch.manual_seed(0)
    pred = Predictor(build_model(vol.voxel_size_um[2]), device=DEVICE, precision="auto", compile=COMPILE)
    if MASK == "truth":
        from xpression.data.manifest import load_manifest
        from xpression.phantom import Phantom

        phantom = Phantom.from_spec(load_manifest(cohort).truth.spec)
        return vol, pred, norm, lambda p: phantom.organ_sd(entry.id, p) <= 0
    return vol, pred, norm, (tissue_mask(vol) if MASK == "otsu" else None)


def rss_child(args) -> None:
    """Sweep a crop densely into a map store; print peak RSS (MiB) as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from xpression.inference.volume_sweep import SweepSettings, infer_volume

    vol, pred, norm, mask = setup(args.cohort, args.volume)
    f = args.rss_child
    shape = [max(1, int(s * f)) for s in vol.shape]
    start = [(n - s) // 2 for n, s in zip(vol.shape, shape)]
    crop = Crop(vol, start, shape)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        settings = SweepSettings(spacing_um=args.spacing_um, mode="dense", tile_vox=args.tile_vox, overlap=args.overlap,
                                 batch_size=args.batch_size, progress=False)
        r = infer_volume(crop, pred, Path(tmp) / "m.ome.zarr", settings, mask=mask, normalize=norm)
        sec = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"shape": shape, "voxels": int(np.prod(shape)), "rss_mib": rss, "seconds": sec, "tiles": r.tiles_computed}))


def flop_ceiling(net, patch_shape, plan, tile_points) -> float:
    """Arithmetic ceiling of the dense speed-up: FLOPs of one patch forward over dense FLOPs per
    grid point, for one input slab of a full tile (``tile_points`` grid points per axis), as
    the sweep runs it (``plan``: halo and outputs kept per axis). Counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(net).to("meta")
    with torch.inference_mode():
        with FlopCounterMode(display=False) as count:
            meta(torch.zeros((1, 1) + tuple(patch_shape), device="meta"))
        per_patch = count.get_total_flops()
        n = [1 if ax.split else t for ax, t in zip(plan.axes, tile_points)]
        shape = [ax.lo + ax.hi + 1 + (k - 1) * ax.stride * ax.step for ax, k in zip(plan.axes, n)]
        kwargs = {"step": tuple(ax.step for ax in plan.axes)} if any(ax.step > 1 for ax in plan.axes) else {}
        with FlopCounterMode(display=False) as count:
            meta.dense_forward(torch.zeros([1, 1] + shape, device="meta"), **kwargs)
    return per_patch / (count.get_total_flops() / int(np.prod(n)))


def overlap_bound(patch_shape, grid) -> float:
    """Input voxels one patch reads over input voxels per grid point (each axis: the patch
    extent over the grid step, at least 1): the recomputation a dense sweep can remove."""
    return float(np.prod([max(1.0, p / s) for p, s in zip(patch_shape, grid.step_vox)]))


LUNG_VOXELS = 2000 * 9000 * 9000  # a whole mouse lung at 1.6 um


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_trunk(pred, plan, tile_shape, grid, batch_size: int, seconds: float = 3.0) -> dict:
    """The network alone over random input slabs of one tile, already on the device: volume
    voxels covered per second (the sweep's accounting), timed with device events."""
    import torch

    from xpression.inference.volume_sweep import slab_input_shape

    count, shape = slab_input_shape(plan, tile_shape)
    n = min(count, batch_size)
    steps = tuple(ax.step for ax in plan.axes)
    g = torch.Generator(device=pred.device).manual_seed(0)
    inputs = [torch.rand((n,) + shape, generator=g, device=pred.device) for _ in range(2)]  # never time zeros
    voxels = n * int(np.prod([t * s for t, s in zip([1 if ax.split else t for ax, t in zip(plan.axes, tile_shape)], grid.step_vox)]))
    for x in inputs:  # warm-up: kernels chosen (and autotuned) here
        pred.dense_tensor(x, step=steps)
    _sync(pred.device)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        x = inputs[len(times) % 2]
        if pred.device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            pred.dense_tensor(x, step=steps)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            pred.dense_tensor(x, step=steps)
            times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    return {"slabs": n, "slab_shape": list(shape), "forwards": len(times), "seconds_per_forward": sec,
            "mvox_s": voxels / sec / 1e6}


def profile_trunk(pred, plan, tile_shape, batch_size: int, path: Path) -> None:
    """The device kernels of one bare-trunk forward, slowest first (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from xpression.inference.volume_sweep import slab_input_shape

    count, shape = slab_input_shape(plan, tile_shape)
    x = torch.rand((min(count, batch_size),) + shape, device=pred.device)
    steps = tuple(ax.step for ax in plan.axes)
    pred.dense_tensor(x, step=steps)
    _sync(pred.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pred.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        pred.dense_tensor(x, step=steps)
        _sync(pred.device)
    key = "device_time_total" if pred.device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=25))


def read_only(vol, pred, norm, mask, grid, tile_shape, args) -> dict:
    """The sweep's reading alone (read-ahead threads, pinned memory on a GPU, host normalisation
    where the sweep does it there), over every tissue tile: volume voxels per second."""
    from xpression.data.intensity import has_torch_transform
    from xpression.inference.grid import Tiling
    from xpression.inference.sweep import _read_ahead, _read_tile, plan_sweep, tissue_tiles

    tiling = Tiling(grid.shape, tile_shape)
    plan = plan_sweep(pred, grid, "dense", args.overlap, tile_shape)
    on_gpu = pred.device.type == "cuda"
    raw = on_gpu and has_torch_transform(norm)
    readers = args.readers or (min(4, max(1, (os.cpu_count() or 2) // 2)) if on_gpu else 1)
    tiles = [tiling.tile(i) for i in tissue_tiles(tiling, grid, mask)]
    t0 = time.perf_counter()
    n = 0
    for inp in _read_ahead(lambda t: _read_tile(vol, plan, grid, t, mask, norm, raw, on_gpu, tile_shape if on_gpu else None),
                           tiles, readers + 1, readers):
        n += int(np.prod(np.asarray(inp.tile.shape) * np.asarray(grid.step_vox)))
    sec = time.perf_counter() - t0
    return {"seconds": sec, "mvox_s": n / sec / 1e6, "readers": readers, "normalised_on_host": not raw}


def read_parts(vol, pred, norm, mask, grid, tile_shape, args) -> dict | None:
    """Where the reading's time goes, over the blocks the sweep reads (one per tissue tile), each
    step on its own, on the chunk pool (``XPRESSION_READ_THREADS``), caches warm: the chunk files'
    bytes alone (disk or page cache), their decoding from memory, and whole block reads into
    pageable and (on a GPU) pinned memory. Rates in MB/s of chunk files and MVoxel/s of blocks read
    (tile halos included, so not the tile voxels of ``read_only``). None for a volume that is not
    a local zarr array this project decodes itself."""
    import itertools

    from xpression.data.zarr_chunks import _executor, read_threads
    from xpression.inference.grid import Tiling
    from xpression.inference.sweep import plan_sweep, tile_block, tissue_tiles

    reader = getattr(vol, "_chunk_reader", None)
    if reader is None:
        return None
    tiling = Tiling(grid.shape, tile_shape)
    plan = plan_sweep(pred, grid, "dense", args.overlap, tile_shape)
    pad = tile_shape if pred.device.type == "cuda" else None  # as the sweep pads its tiles there
    blocks = [tile_block(plan, grid, tiling.tile(i), mask, pad) for i in tissue_tiles(tiling, grid, mask)]
    boxes = [(lo.astype(int), hi.astype(int)) for _, parts, lo, hi in blocks if parts]
    shape = np.asarray(vol.shape)
    inside = [(np.clip(lo, 0, shape), np.clip(hi, 0, shape)) for lo, hi in boxes]  # past the faces: fill, no file
    coords = [c for lo, hi in inside if np.all(hi > lo) for c in itertools.product(
        *[range(a // k, (b - 1) // k + 1) for a, b, k in zip(lo, hi, reader.chunks)])]
    coords = [c for c in coords if (reader.root / reader.encode_key(c)).is_file()]  # a missing chunk is the fill value
    voxels = sum(int(np.prod(hi - lo)) for lo, hi in boxes)
    pool = _executor()

    def files():
        return list(pool.map(lambda c: (reader.root / reader.encode_key(c)).read_bytes(), coords))

    t0 = time.perf_counter()
    stored = files()
    t_files = time.perf_counter() - t0
    nbytes = sum(len(b) for b in stored)

    def decode(data: bytes) -> bytes:
        for d in reader.decoders:
            data = d(data)
        return data

    t0 = time.perf_counter()
    list(pool.map(decode, stored))
    t_decode = time.perf_counter() - t0
    del stored

    def whole(pin: bool) -> float:
        import torch

        t = time.perf_counter()
        for lo, hi in boxes:
            shape = tuple(int(n) for n in hi - lo)
            out = torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy() if pin else np.empty(shape, vol.dtype)
            vol.read_block(tuple(lo), tuple(hi), fill=0, out=out)
        return time.perf_counter() - t

    t_pageable = whole(False)
    t_pinned = whole(True) if pred.device.type == "cuda" and np.dtype(vol.dtype) == np.uint8 else None
    out = {"threads": read_threads(), "chunks": len(coords), "blocks": len(boxes), "mbytes": nbytes / 1e6,
           "block_mvox": voxels / 1e6, "files_mb_s": nbytes / t_files / 1e6, "decode_mb_s": nbytes / t_decode / 1e6,
           "files_mvox_s": voxels / t_files / 1e6, "decode_mvox_s": voxels / t_decode / 1e6,
           "pageable_mvox_s": voxels / t_pageable / 1e6, "pinned_mvox_s": voxels / t_pinned / 1e6 if t_pinned else None}
    return out


def throughput(vol, pred, norm, mask, grid, args) -> dict:
    """End-to-end sweep (read, normalise, network, store) over the whole volume, twice; the
    second run is reported. Steady state: volume voxels of tiles 2.. over the time after tile 1."""
    import torch

    from xpression.inference.volume_sweep import SweepSettings, infer_volume

    out = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for attempt in ("warm-up", "timed"):
            stamps = []
            if pred.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pred.device)
            t0 = time.perf_counter()
            settings = SweepSettings(spacing_um=args.spacing_um, mode="dense", tile_vox=args.tile_vox, overlap=args.overlap,
                                     batch_size=args.batch_size, progress=False, levels=args.levels, readers=args.readers)
            res = infer_volume(vol, pred, Path(tmp) / f"{attempt}.ome.zarr", settings, mask=mask, normalize=norm,
                               on_tile=lambda tr: stamps.append((time.perf_counter(), tr.voxels)))
            wall = time.perf_counter() - t0
            voxels = int(np.prod(vol.shape))
            steady = (sum(v for _, v in stamps[1:]) / (stamps[-1][0] - stamps[0][0])) if len(stamps) > 2 else float("nan")
            out[attempt] = {"seconds_wall": wall, "seconds_tiles": res.seconds, "tiles": res.tiles_computed,
                            "points": res.points, "mvox_s": voxels / wall / 1e6,
                            "mvox_s_tiles": voxels / res.seconds / 1e6, "mvox_s_steady": steady / 1e6,
                            "points_s": res.points / res.seconds}
            if pred.device.type == "cuda":
                out[attempt]["peak_gpu_gib"] = torch.cuda.max_memory_allocated(pred.device) / 2**30
            out["tile_shape"] = list(res.tile_shape)
    return out


def grid_subset(grid, tiling, tiles, mask, n_points: int) -> np.ndarray:
    """Boolean grid mask: the first ``n_points`` tissue points of ``tiles`` (patch-mode sample)."""
    from xpression.inference.sweep import tile_mask

    keep = np.zeros(grid.shape, dtype=bool)
    left = n_points
    for i in tiles:
        tile = tiling.tile(i)
        m = tile_mask(mask, grid, tile)
        flat = np.flatnonzero(m)[:left]
        sub = np.zeros(m.size, dtype=bool)
        sub[flat] = True
        keep[tile.slices] = sub.reshape(m.shape)
        left -= len(flat)
        if left <= 0:
            break
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["cnn3d", "published", "published-same"], default="cnn3d",
                    help="the network (see the module doc)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--cohort", type=Path, help="existing cohort.yaml (first volume is used)")
    ap.add_argument("--volume", type=Path, help="an existing volume (OME-Zarr, TIFF, .npy with OME metadata)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to generate the cohort (default data/bench_large, data/bench_large_1.6um for published*)")
    ap.add_argument("--size-um", type=float, nargs=3, default=None,
                    help="cohort size (default 640 3200 3200; 96 1638.4 1638.4 for published*)")
    ap.add_argument("--spacing-um", type=float, nargs=3, default=[33.6, 25.6, 25.6])
    ap.add_argument("--tile-vox", nargs="+", default=None,
                    help="tile extent in voxels, Z Y X or 'auto' (default 32 256 256; 32 512 512 for published*; auto on CUDA)")
    ap.add_argument("--overlap", type=float, default=None,
                    help="dense context margin per side, fraction of the tile (default: the sweep's)")
    ap.add_argument("--patch-points", type=int, default=None,
                    help="grid points timed in patch mode (default 8192; 48 for published* on the CPU, 1024 on CUDA)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="patches (patch mode) or slabs (dense) per forward (default 256; 8 for published*)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--readers", type=int, default=None, help="threads reading tiles (default: the sweep's)")
    ap.add_argument("--levels", type=int, default=3, help="pyramid levels of the map store (--throughput)")
    ap.add_argument("--mask", choices=["truth", "otsu", "none"], default=None,
                    help="tissue: the phantom's organ (truth, default for cohorts), xpression.data.mask.tissue_mask "
                         "(otsu) or everything (none, default for --volume)")
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="conv widths, e.g. 32 64 128 for the published network's (default: conf/model/cnn3d.yaml)")
    ap.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=None,
                    help="end-to-end sweep and bare trunk (default: on CUDA or with --volume)")
    ap.add_argument("--patch", action=argparse.BooleanOptionalAction, default=True, help="patch vs dense mode")
    ap.add_argument("--rss", action=argparse.BooleanOptionalAction, default=None, help="peak RSS children (default: CPU)")
    ap.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                    help="CUDA: autotune convolutions (the bare trunk is timed both ways)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network")
    ap.add_argument("--bare-seconds", type=float, default=3.0, help="time the bare trunk for this long")
    ap.add_argument("--tmp", default=None, help="folder for the temporary map stores")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--profile", type=Path, default=None, help="write a kernel profile of one bare-trunk forward here")
    ap.add_argument("--rss-child", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name in ("cohort", "volume"):
        given = getattr(args, name)
        if given is not None and not given.exists():
            ap.error(f"--{name}: no such file: {given}")
    global MASK, MODEL, WIDTHS, DEVICE, COMPILE
    MODEL, WIDTHS, DEVICE, COMPILE = args.model, args.widths, args.device, args.compile
    MASK = args.mask or ("none" if args.volume else "truth")
    if MASK == "truth" and args.volume:
        ap.error("--mask truth needs a phantom cohort; use --mask otsu or none with --volume")
    published = args.model != "cnn3d"
    cuda = args.device.startswith("cuda")
    if args.widths and published:
        ap.error("--widths changes cnn3d only")
    args.size_um = args.size_um or ([96.0, 1638.4, 1638.4] if published else [640.0, 3200.0, 3200.0])
    if args.tile_vox in (None, ["auto"]):
        args.tile_vox = "auto" if (cuda or args.tile_vox) else ([32, 512, 512] if published else [32, 256, 256])
    else:
        if len(args.tile_vox) != 3:
            ap.error("--tile-vox takes Z Y X voxels or 'auto'")
        args.tile_vox = [int(t) for t in args.tile_vox]
    args.patch_points = args.patch_points or (1024 if cuda else 48 if published else 8192)
    args.batch_size = args.batch_size or (8 if published else 256)
    args.throughput = (cuda or args.volume is not None) if args.throughput is None else args.throughput
    args.rss = (not cuda) if args.rss is None else args.rss
    if args.cohort is None and args.volume is None:
        args.out = args.out or REPO / "data" / ("bench_large_1.6um" if published else "bench_large")
        args.cohort = args.out / "cohort.yaml"
        if not args.cohort.exists():
            print(f"generating the large-preset phantom cropped to {args.size_um} um in {args.out} ...", flush=True)
            voxel = ["--voxel-um", str(PUBLISHED_VOXEL_UM)] if published else []
            subprocess.run([sys.executable, "-m", "xpression.phantom", "--out", str(args.out), "--preset", "large",
                            "--volumes", "1", "--size-um", *map(str, args.size_um), *voxel, "--quiet"], check=True)
    if args.rss_child is not None:
        return rss_child(args)

    import torch

    torch.set_num_threads(args.threads)
    from xpression.inference.grid import Tiling, choose_tile_shape
    from xpression.inference.sweep import plan_sweep, sweep_tiles, tissue_tiles
    from xpression.inference.volume_sweep import auto_tile_vox, dense_slabs_per_forward, plan_grid
    from xpression.models.backbones.depth_fold import FOLD_MODE, fold_choices

    if cuda:
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    vol, pred, norm, mask = setup(args.cohort, args.volume)
    grid, notes = plan_grid(vol, pred, args.spacing_um, "dense")
    tile_vox = auto_tile_vox(pred, grid, vol.shape, "dense", args.overlap, args.batch_size, vol.chunks) \
        if args.tile_vox == "auto" else args.tile_vox
    tile_shape = choose_tile_shape(grid, tile_vox, vol.chunks)
    tiling = Tiling(grid.shape, tile_shape)
    tissue = tissue_tiles(tiling, grid, mask)
    device = pred.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    report: dict = {"device": gpu, "model": args.model, "precision": pred.precision, "volume_shape": list(vol.shape),
                    "voxel_size_um": list(vol.voxel_size_um), "grid_shape": list(grid.shape), "tile_vox": list(tile_vox),
                    "tile_shape": list(tile_shape), "tiles_tissue": len(tissue), "cudnn_benchmark": bool(cuda and args.cudnn_benchmark)}
    print(f"volume {vol.path.name}: {vol.shape} voxels of {vol.voxel_size_um} um; model patch {pred.patch_shape}, "
          f"output stride {pred.output_stride}, {sum(p.numel() for p in pred.net.parameters())} parameters")
    print(f"grid {grid.shape} points, spacing {grid.spacing_um} um ({'; '.join(notes) or 'exact'}); "
          f"tiles of {tuple(tile_vox)} voxels = {tile_shape} points, {len(tissue)} of {len(tiling)} touch tissue; "
          f"{gpu}, {pred.precision}", flush=True)
    plan = plan_sweep(pred, grid, "dense", args.overlap, tile_shape)
    # what the sweep stacks per forward (fewer slabs where a stack would exceed 32-bit indexing)
    from xpression.inference.sweep import default_overlap

    overlap = default_overlap(pred, "dense") if args.overlap is None else args.overlap
    slabs = dense_slabs_per_forward(pred, grid, tile_shape, "dense", overlap, args.batch_size)
    report["slabs_per_forward"] = slabs

    def emit() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))

    if args.throughput:
        if cuda:  # the bare trunk both ways, then the end to end with the chosen setting
            for bench in (False, True):
                torch.backends.cudnn.benchmark = bench
                report[f"bare_cudnn_benchmark_{'on' if bench else 'off'}"] = bare_trunk(pred, plan, tile_shape, grid, slabs,
                                                                                        args.bare_seconds)
            torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
            report["bare"] = report[f"bare_cudnn_benchmark_{'on' if args.cudnn_benchmark else 'off'}"]
            report["fold_choices"] = fold_choices()  # which 3D convolutions ran folded into 2D, and their times
            FOLD_MODE["mode"] = "off"  # the same trunk with cuDNN's 3D kernels only, for the ratio
            report["bare_depth_fold_off"] = bare_trunk(pred, plan, tile_shape, grid, slabs, args.bare_seconds)
            FOLD_MODE["mode"] = "auto"
        else:
            report["bare"] = bare_trunk(pred, plan, tile_shape, grid, slabs, args.bare_seconds)
        emit()
        e2e = throughput(vol, pred, norm, mask, grid, args)
        report["e2e"] = e2e
        report["read_only"] = read_only(vol, pred, norm, mask, grid, tuple(e2e["tile_shape"]), args)
        report["read_parts"] = read_parts(vol, pred, norm, mask, grid, tuple(e2e["tile_shape"]), args)
        run = e2e["timed"]
        bare = report["bare"]["mvox_s"]
        report["ratio_e2e_bare"] = run["mvox_s"] / bare
        report["ratio_steady_bare"] = run["mvox_s_steady"] / bare
        report["lung_minutes"] = LUNG_VOXELS / (run["mvox_s_steady"] * 1e6) / 60 if run["mvox_s_steady"] == run["mvox_s_steady"] else LUNG_VOXELS / (run["mvox_s"] * 1e6) / 60
        emit()
        print(f"\n{'end to end (infer_volume, 2nd run)':44s} {run['seconds_wall']:8.2f} s  {run['mvox_s']:8.1f} MVoxel/s whole run, "
              f"{run['mvox_s_steady']:.1f} after the first tile; {run['points_s']:.0f} grid points/s; {run['tiles']} tiles")
        if "peak_gpu_gib" in run:
            print(f"{'peak GPU memory':44s} {run['peak_gpu_gib']:8.2f} GiB")
        ro = report["read_only"]
        print(f"{'reading alone (' + str(ro['readers']) + ' threads)':44s} {ro['seconds']:8.2f} s  {ro['mvox_s']:8.1f} MVoxel/s"
              f"{' (normalised on the host)' if ro['normalised_on_host'] else ''}")
        rp = report["read_parts"]
        if rp:
            print(f"reading, step by step ({rp['blocks']} blocks, {rp['block_mvox']:.0f} MVoxel with halos, {rp['chunks']} chunks, "
                  f"{rp['mbytes']:.0f} MB of files, {rp['threads']} threads):")
            for label, key in (("chunk files' bytes (disk or page cache)", "files"), ("decoding them from memory", "decode")):
                print(f"  {label:42s} {rp[key + '_mb_s']:8.0f} MB/s  {rp[key + '_mvox_s']:8.1f} MVoxel/s")
            for label, key in (("whole blocks, pageable memory", "pageable"), ("whole blocks, pinned memory", "pinned")):
                if rp[key + "_mvox_s"] is not None:
                    print(f"  {label:42s} {'':13s} {rp[key + '_mvox_s']:8.1f} MVoxel/s")
        first = e2e["warm-up"]
        print(f"{'first run (autotuning, cold caches)':44s} {first['seconds_wall']:8.2f} s  {first['mvox_s']:8.1f} MVoxel/s")
        for c in report.get("fold_choices", []):
            print(f"{'conv ' + 'x'.join(map(str, c['weight'])) + ' on ' + 'x'.join(map(str, c['input'])):44s} "
                  + ", ".join(f"{w} {t:.2f} ms" for w, t in c["ms"].items()) + f" -> {c['chosen']}")
        for key in [k for k in report if k.startswith(("bare_cudnn", "bare_depth"))] or ["bare"]:
            b = report[key]
            print(f"{key.replace('_', ' '):44s} {b['seconds_per_forward'] * 1e3:8.1f} ms per forward of {b['slabs']} x {tuple(b['slab_shape'])}: "
                  f"{b['mvox_s']:8.1f} MVoxel/s")
        print(f"end to end / bare trunk: {report['ratio_e2e_bare']:.2f} (whole run), {report['ratio_steady_bare']:.2f} (steady state); "
              f"a whole lung (2,000 x 9,000 x 9,000 voxels) at the steady rate: {report['lung_minutes']:.1f} min", flush=True)
        if args.profile:
            try:
                profile_trunk(pred, plan, tile_shape, args.batch_size, args.profile)
                print(f"kernel profile of one bare-trunk forward: {args.profile}")
            except Exception as exc:  # the profiler is optional; keep the figures
                print(f"profile failed: {type(exc).__name__}: {exc}")

    if args.patch:
        def run(mode, tiles, where):
            pts = vox = 0
            vals = {}
            t0 = time.perf_counter()
            for r in sweep_tiles(vol, pred, grid, tile_shape, mode, args.overlap, args.batch_size, where, norm,
                                 tiles=tiles, readers=args.readers):
                pts += r.n_points
                vox += r.voxels
                vals[r.tile.index] = r.values
            return time.perf_counter() - t0, pts, vox, vals

        middle = tissue[len(tissue) // 2 :] + tissue[: len(tissue) // 2]
        sample = grid_subset(grid, tiling, middle, mask, args.patch_points)
        sub = [i for i in middle if sample[tiling.tile(i).slices].any()]
        run("dense", sub[:1], sample)  # warm-up
        if cuda:  # kernels for the patch batch shape chosen (autotuned) here
            run("patch", sub[:1], sample)
        td_sub, pd_sub, _, vd = run("dense", sub, sample)
        tp, pp, _, vpatch = run("patch", sub, sample)
        diff = max(float(np.nanmax(np.abs(vd[i] - vpatch[i]))) for i in sub)
        if args.throughput:  # the whole volume was swept end to end above; its network time per point
            td, pd_, vd_all = report["e2e"]["timed"]["seconds_tiles"], report["e2e"]["timed"]["points"], int(np.prod(vol.shape))
        else:
            td, pd_, vd_all, _ = run("dense", tissue, mask)
        patch_rate = pp / tp  # grid points per second
        dense_rate = pd_ / td
        t_patch_full = pd_ / patch_rate
        vox_per_point = vd_all / pd_
        rows = [
            ("patch (measured on %d points)" % pp, tp, patch_rate, patch_rate * vox_per_point),
            ("dense (same points, their slabs only)", td_sub, pd_sub / td_sub, pd_sub / td_sub * vox_per_point),
            ("dense (whole volume, %d tiles, %d points)" % (len(tissue), pd_), td, dense_rate, vd_all / td),
            ("patch (whole volume, extrapolated)", t_patch_full, patch_rate, vd_all / t_patch_full),
        ]
        print(f"\n{'run':48s} {'seconds':>10s} {'points/s':>12s} {'voxels/s':>14s}")
        for name, sec, pps, vps in rows:
            print(f"{name:48s} {sec:10.2f} {pps:12.1f} {vps:14.3e}")
        print(f"dense / patch speed-up: {dense_rate / patch_rate:.1f}x; max |dense - patch| on the patch-mode points: {diff:.2e}"
              f"{'' if pred.dense_equivalent else ' (not dense-equivalent)'}")
        ceiling = flop_ceiling(pred.net, pred.patch_shape, plan, tile_shape)
        print(f"FLOP ceiling for these tiles (patch FLOPs / dense FLOPs per grid point): {ceiling:.1f}x; "
              f"overlap bound (patch voxels / voxels per grid point): {overlap_bound(pred.patch_shape, grid):.1f}x", flush=True)
        report.update(dense_patch_speedup=dense_rate / patch_rate, max_abs_dense_minus_patch=diff, flop_ceiling=ceiling,
                      patch_points=pp, patch_points_s=patch_rate)
        emit()

    if args.rss:
        res = []
        for f in (0.5, 1.0):
            cmd = [sys.executable, __file__, "--rss-child", str(f), "--mask", MASK, "--threads", str(args.threads),
                   "--model", args.model, "--batch-size", str(args.batch_size), "--device", args.device,
                   *(["--cohort", str(args.cohort)] if args.cohort else ["--volume", str(args.volume)]),
                   *(["--widths", *map(str, args.widths)] if args.widths else []),
                   *(["--overlap", str(args.overlap)] if args.overlap is not None else []),
                   "--spacing-um", *map(str, args.spacing_um), "--tile-vox", *map(str, tile_vox)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            res.append(json.loads(out))
        print(f"\n{'crop (voxels)':28s} {'voxels':>12s} {'peak RSS MiB':>14s} {'seconds':>9s}")
        for r in res:
            print(f"{str(tuple(r['shape'])):28s} {r['voxels']:12d} {r['rss_mib']:14.1f} {r['seconds']:9.1f}")
        print(f"8x more voxels -> peak RSS x{res[1]['rss_mib'] / res[0]['rss_mib']:.2f}")
        report["rss_mib"] = [r["rss_mib"] for r in res]
        emit()


if __name__ == "__main__":
    main()

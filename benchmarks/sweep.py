"""Patch vs dense sweep on the same model and output grid, and peak memory for two volume sizes.

    python benchmarks/sweep.py [--model cnn3d|published|published-same] [--cohort COHORT.yaml]
                               [--out DIR] [--size-um Z Y X] [--threads N]

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

Without ``--cohort`` a one-volume cohort with the ``large`` phantom preset's parameters is
generated in ``--out`` (``--size-um`` crops it: the full 6.4 mm cube takes long to generate and
patch mode over it would take hours on a CPU; the published networks get 1.6 um voxels).
Dense mode runs over every tissue tile; patch mode over the first ``--patch-points`` tissue
points of the middle tiles, and its time for the whole volume is extrapolated from its
measured rate per grid point (printed as such). Two ceilings are printed next to the measured
speed-up: the FLOP ceiling (FLOPs of one patch forward over dense FLOPs per grid point for
these tiles) and the overlap bound (input voxels of a patch over input voxels per grid point:
what a sweep that computes each first-layer output once could at most save).
Peak RSS is measured in fresh processes sweeping (dense, streaming to a map store) a crop of
the volume and a crop 8x larger (2x per axis).
"""

from __future__ import annotations

import argparse
import copy
import json
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
        cfg = yaml.safe_load((REPO / "conf" / "model" / "cnn3d.yaml").read_text())["backbone"]
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


def setup(cohort: Path):
    import torch

    from xpression.data.intensity import IntensityNormalizer
    from xpression.data.manifest import load_manifest
    from xpression.data.mask import tissue_mask
    from xpression.data.volume import open_volume
    from xpression.inference.predictor import Predictor

    entry = load_manifest(cohort).volumes[0]
    vol = open_volume(entry.image, entry.voxel_size_um)
    torch.manual_seed(0)
    pred = Predictor(build_model(vol.voxel_size_um[2]), device="cpu", precision="fp32")
    norm = IntensityNormalizer.from_volume(vol)
    if MASK == "truth":
        from xpression.phantom import Phantom

        phantom = Phantom.from_spec(load_manifest(cohort).truth.spec)
        return vol, pred, norm, lambda p: phantom.organ_sd(entry.id, p) <= 0
    return vol, pred, norm, tissue_mask(vol)


def rss_child(args) -> None:
    """Sweep a crop densely into a map store; print peak RSS (MiB) as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from xpression.inference.volume_sweep import infer_volume

    vol, pred, norm, mask = setup(Path(args.cohort))
    f = args.rss_child
    shape = [max(1, int(s * f)) for s in vol.shape]
    start = [(n - s) // 2 for n, s in zip(vol.shape, shape)]
    crop = Crop(vol, start, shape)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = infer_volume(crop, pred, Path(tmp) / "m.ome.zarr", spacing_um=args.spacing_um, mode="dense",
                         tile_vox=args.tile_vox, overlap=args.overlap, batch_size=args.batch_size, mask=mask,
                         normalize=norm, progress=False)
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
    ap.add_argument("--cohort", type=Path, help="existing cohort.yaml (first volume is used)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to generate the cohort (default data/bench_large, data/bench_large_1.6um for published*)")
    ap.add_argument("--size-um", type=float, nargs=3, default=None,
                    help="cohort size (default 640 3200 3200; 96 1638.4 1638.4 for published*)")
    ap.add_argument("--spacing-um", type=float, nargs=3, default=[33.6, 25.6, 25.6])
    ap.add_argument("--tile-vox", type=int, nargs=3, default=None,
                    help="tile extent in voxels (default 32 256 256; 32 512 512 for published*)")
    ap.add_argument("--overlap", type=float, default=None,
                    help="dense context margin per side, fraction of the tile (default: the sweep's)")
    ap.add_argument("--patch-points", type=int, default=None,
                    help="grid points timed in patch mode (default 8192; 48 for published*)")
    ap.add_argument("--batch-size", type=int, default=None, help="patches per forward (default 256; 8 for published*)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mask", choices=["truth", "otsu"], default="truth",
                    help="tissue: the phantom's organ (truth) or xpression.data.mask.tissue_mask (otsu)")
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="conv widths, e.g. 32 64 128 for the published network's (default: conf/model/cnn3d.yaml)")
    ap.add_argument("--rss-child", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global MASK, MODEL, WIDTHS
    MASK, MODEL, WIDTHS = args.mask, args.model, args.widths
    published = args.model != "cnn3d"
    if args.widths and published:
        ap.error("--widths changes cnn3d only")
    args.size_um = args.size_um or ([96.0, 1638.4, 1638.4] if published else [640.0, 3200.0, 3200.0])
    args.tile_vox = args.tile_vox or ([32, 512, 512] if published else [32, 256, 256])
    args.patch_points = args.patch_points or (48 if published else 8192)
    args.batch_size = args.batch_size or (8 if published else 256)
    if args.cohort is None:
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
    from xpression.inference.volume_sweep import plan_grid

    vol, pred, norm, mask = setup(args.cohort)
    grid, notes = plan_grid(vol, pred, args.spacing_um, "dense")
    tile_shape = choose_tile_shape(grid, args.tile_vox, vol.chunks)
    tiling = Tiling(grid.shape, tile_shape)
    tissue = tissue_tiles(tiling, grid, mask)
    print(f"volume {vol.path.name}: {vol.shape} voxels of {vol.voxel_size_um} um; model patch {pred.patch_shape}, "
          f"output stride {pred.output_stride}, {sum(p.numel() for p in pred.net.parameters())} parameters")
    print(f"grid {grid.shape} points, spacing {grid.spacing_um} um ({'; '.join(notes) or 'exact'}); "
          f"tiles {tile_shape} points, {len(tissue)} of {len(tiling)} touch tissue; {args.threads} threads")

    def run(mode, tiles, where):
        pts = vox = 0
        vals = {}
        t0 = time.perf_counter()
        for r in sweep_tiles(vol, pred, grid, tile_shape, mode, args.overlap, args.batch_size, where, norm, tiles=tiles):
            pts += r.n_points
            vox += r.voxels
            vals[r.tile.index] = r.values
        return time.perf_counter() - t0, pts, vox, vals

    middle = tissue[len(tissue) // 2 :] + tissue[: len(tissue) // 2]
    sample = grid_subset(grid, tiling, middle, mask, args.patch_points)
    sub = [i for i in middle if sample[tiling.tile(i).slices].any()]
    run("dense", sub[:1], sample)  # warm-up
    td_sub, pd_sub, _, vd = run("dense", sub, sample)
    tp, pp, _, vpatch = run("patch", sub, sample)
    diff = max(float(np.nanmax(np.abs(vd[i] - vpatch[i]))) for i in sub)
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
    plan = plan_sweep(pred, grid, "dense", args.overlap, tile_shape)
    ceiling = flop_ceiling(pred.net, pred.patch_shape, plan, tile_shape)
    print(f"FLOP ceiling for these tiles (patch FLOPs / dense FLOPs per grid point): {ceiling:.1f}x; "
          f"overlap bound (patch voxels / voxels per grid point): {overlap_bound(pred.patch_shape, grid):.1f}x")

    res = []
    for f in (0.5, 1.0):
        cmd = [sys.executable, __file__, "--cohort", str(args.cohort), "--rss-child", str(f), "--mask", args.mask, "--threads", str(args.threads),
               "--model", args.model, "--batch-size", str(args.batch_size),
               *(["--widths", *map(str, args.widths)] if args.widths else []),
               *(["--overlap", str(args.overlap)] if args.overlap is not None else []),
               "--spacing-um", *map(str, args.spacing_um), "--tile-vox", *map(str, args.tile_vox)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        res.append(json.loads(out))
    print(f"\n{'crop (voxels)':28s} {'voxels':>12s} {'peak RSS MiB':>14s} {'seconds':>9s}")
    for r in res:
        print(f"{str(tuple(r['shape'])):28s} {r['voxels']:12d} {r['rss_mib']:14.1f} {r['seconds']:9.1f}")
    print(f"8x more voxels -> peak RSS x{res[1]['rss_mib'] / res[0]['rss_mib']:.2f}")


if __name__ == "__main__":
    main()

"""Patch vs dense sweep on the same model and output grid, and peak memory for two volume sizes.

    python benchmarks/sweep.py [--cohort COHORT.yaml | --out DIR] [--size-um Z Y X] [--threads N]

Without ``--cohort`` a one-volume cohort with the ``large`` phantom preset's parameters is
generated in ``--out`` (``--size-um`` crops it: the full 6.4 mm cube takes long to generate and
patch mode over it would take hours on a CPU). The network is the repo's paper-like CNN for the
phantom's 6.4 um voxels (``conf/model/cnn3d.yaml``: 16/32/64 valid convolutions, Dense 64, a
34 x 205 x 205 um patch = 5 x 33 x 33 voxels), on the paper's grid density. Dense mode runs over
every tissue tile; patch mode over the first ``--patch-tiles`` of them, and its time for the
whole volume is extrapolated from its measured rate per grid point (printed as such).
Peak RSS is measured in fresh processes sweeping (dense, streaming to a map store) a crop of
the volume and a crop 8x larger (2x per axis).
"""

from __future__ import annotations

import argparse
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


def build_model(voxel_um: float, targets: int = 6):
    import yaml

    from xpression.data.geometry import PatchGeometry
    from xpression.models.net import build_net
    from xpression.models.targets import as_target_spec

    cfg = yaml.safe_load((REPO / "conf" / "model" / "cnn3d.yaml").read_text())["backbone"]
    if WIDTHS:
        cfg["widths"] = list(WIDTHS)
    patch = PatchGeometry().shape_vox((voxel_um,) * 3)
    spec = as_target_spec({"names": [f"p{i}" for i in range(targets)], "kind": "composition"})
    return build_net(cfg, spec, patch).eval()


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
                         tile_vox=args.tile_vox, mask=mask, normalize=norm, progress=False)
        sec = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"shape": shape, "voxels": int(np.prod(shape)), "rss_mib": rss, "seconds": sec, "tiles": r.tiles_computed}))


def flop_ceiling(net, patch_shape, stride, n_out: int = 32) -> float:
    """Arithmetic ceiling of the dense speed-up: FLOPs of one patch forward over FLOPs per
    output point of one dense forward over a block of ``n_out`` x ``n_out`` in-plane outputs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    d, h, w = patch_shape
    with torch.inference_mode():
        with FlopCounterMode(display=False) as count:
            net(torch.zeros(1, 1, d, h, w))
        per_patch = count.get_total_flops()
        block = torch.zeros(1, 1, d, h + stride[1] * (n_out - 1), w + stride[2] * (n_out - 1))
        with FlopCounterMode(display=False) as count:
            out = net.dense_forward(block)
        per_point = count.get_total_flops() / (out.shape[-1] * out.shape[-2] * out.shape[-3])
    return per_patch / per_point


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", type=Path, help="existing cohort.yaml (first volume is used)")
    ap.add_argument("--out", type=Path, default=REPO / "data" / "bench_large", help="where to generate the cohort")
    ap.add_argument("--size-um", type=float, nargs=3, default=[640.0, 3200.0, 3200.0])
    ap.add_argument("--spacing-um", type=float, nargs=3, default=[33.6, 25.6, 25.6])
    ap.add_argument("--tile-vox", type=int, nargs=3, default=[32, 256, 256])
    ap.add_argument("--patch-tiles", type=int, default=2, help="tiles timed in patch mode")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mask", choices=["truth", "otsu"], default="truth",
                    help="tissue: the phantom's organ (truth) or xpression.data.mask.tissue_mask (otsu)")
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="conv widths, e.g. 32 64 128 for the published network's (default: conf/model/cnn3d.yaml)")
    ap.add_argument("--rss-child", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global MASK
    MASK = args.mask
    if args.cohort is None:
        args.cohort = args.out / "cohort.yaml"
        if not args.cohort.exists():
            print(f"generating the large-preset phantom cropped to {args.size_um} um in {args.out} ...", flush=True)
            subprocess.run([sys.executable, "-m", "xpression.phantom", "--out", str(args.out), "--preset", "large",
                            "--volumes", "1", "--size-um", *map(str, args.size_um), "--quiet"], check=True)
    global WIDTHS
    WIDTHS = args.widths
    if args.rss_child is not None:
        return rss_child(args)

    import torch

    torch.set_num_threads(args.threads)
    from xpression.inference.grid import Tiling, choose_tile_shape
    from xpression.inference.sweep import sweep_tiles, tissue_tiles
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

    def run(mode, tiles):
        pts = vox = 0
        vals = {}
        t0 = time.perf_counter()
        for r in sweep_tiles(vol, pred, grid, tile_shape, mode, None, args.batch_size, mask, norm, tiles=tiles):
            pts += r.n_points
            vox += r.voxels
            vals[r.tile.index] = r.values
        return time.perf_counter() - t0, pts, vox, vals

    sub = tissue[len(tissue) // 2 : len(tissue) // 2 + args.patch_tiles]
    run("dense", sub[:1])  # warm-up
    td_sub, pd_sub, _, vd = run("dense", sub)
    tp, pp, vp, vpatch = run("patch", sub)
    diff = max(float(np.nanmax(np.abs(vd[i] - vpatch[i]))) for i in sub)
    td, pd_, vd_all, _ = run("dense", tissue)
    patch_rate = pp / tp  # grid points per second
    dense_rate = pd_ / td
    t_patch_full = pd_ / patch_rate
    rows = [
        ("patch (measured on %d tiles, %d points)" % (len(sub), pp), tp, pp / tp, vp / tp),
        ("dense (same tiles)", td_sub, pd_sub / td_sub, vp / td_sub),
        ("dense (whole volume, %d tiles, %d points)" % (len(tissue), pd_), td, dense_rate, vd_all / td),
        ("patch (whole volume, extrapolated)", t_patch_full, patch_rate, vd_all / t_patch_full),
    ]
    print(f"\n{'run':48s} {'seconds':>10s} {'points/s':>12s} {'voxels/s':>14s}")
    for name, sec, pps, vps in rows:
        print(f"{name:48s} {sec:10.2f} {pps:12.1f} {vps:14.3e}")
    print(f"dense / patch speed-up: {dense_rate / patch_rate:.1f}x (same tiles: {(pd_sub / td_sub) / patch_rate:.1f}x); "
          f"max |dense - patch| on those tiles: {diff:.2e}")
    ceiling = flop_ceiling(pred.net, pred.patch_shape, pred.output_stride)
    print(f"FLOP ceiling of the speed-up for this network and grid (patch FLOPs / dense FLOPs per point): {ceiling:.1f}x")

    res = []
    for f in (0.5, 1.0):
        cmd = [sys.executable, __file__, "--cohort", str(args.cohort), "--rss-child", str(f), "--mask", args.mask, "--threads", str(args.threads),
               *(["--widths", *map(str, args.widths)] if args.widths else []),
               "--spacing-um", *map(str, args.spacing_um), "--tile-vox", *map(str, args.tile_vox)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        res.append(json.loads(out))
    print(f"\n{'crop (voxels)':28s} {'voxels':>12s} {'peak RSS MiB':>14s} {'seconds':>9s}")
    for r in res:
        print(f"{str(tuple(r['shape'])):28s} {r['voxels']:12d} {r['rss_mib']:14.1f} {r['seconds']:9.1f}")
    print(f"8x more voxels -> peak RSS x{res[1]['rss_mib'] / res[0]['rss_mib']:.2f}")


if __name__ == "__main__":
    main()

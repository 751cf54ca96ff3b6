"""Multi-scale sweep speed: dense against patch mode on the same tiles, in one run.

    python benchmarks/multiscale_sweep.py [--run RUN] [--cohort COHORT.yaml] [--volume-id ID]
                                          [--tiles N] [--threads N] [--device cpu|cuda]

The network: ``--run`` (a train.py run of a multi-scale model) or, by default, the multi-scale
network with random weights (``model=multiscale_cnn3d``: cnn3d on the 34 x 205 x 205 um
patch, a second cnn3d on the context view 3x the patch, every 3rd voxel of the low-pass filtered
volume), at the cohort's voxel size. The grid is the study's (33.6 x 25.6 x 25.6 um); the first
``--tiles`` tissue tiles (default tiles of the sweep) are swept in both modes with the same
inputs, and the table gives grid points per second, the ratio, and the largest difference
between the two maps (float32).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def default_model(voxel_um: tuple, targets: int = 6):
    """The multi-scale network's preset (``model=multiscale_cnn3d``, random weights) and its input spec."""
    from xpression.config import compose
    from xpression.data.geometry import PatchGeometry
    from xpression.data.input_spec import InputSpec, IntensitySpec
    from xpression.data.registration import SPOT_RADIUS_UM
    from xpression.models.net import build_net
    from xpression.models.targets import TargetSpec
    from xpression.resolvers import register_resolvers

    register_resolvers()
    cfg = compose("train", ["model=multiscale_cnn3d", "data.manifest=unused"])
    patch_um = np.asarray(cfg.patch.size_um, float)
    shape = PatchGeometry(tuple(patch_um)).shape_vox(voxel_um)
    names = [f"t{i}" for i in range(targets)]
    spec = InputSpec.build(patch_um, voxel_um, shape, SPOT_RADIUS_UM, IntensitySpec(), "uint8",
                           {"names": names, "kind": "composition"}, context_um=list(cfg.patch.context_um))
    from omegaconf import OmegaConf

    net = build_net(OmegaConf.to_container(cfg.model.backbone, resolve=True), TargetSpec(names, "composition"), shape)
    return net.eval(), spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="a train.py run folder of a multi-scale model")
    ap.add_argument("--cohort", type=Path, default=ROOT / "data" / "phantom_default" / "cohort.yaml")
    ap.add_argument("--volume-id", default=None, help="default: the cohort's first volume")
    ap.add_argument("--tiles", type=int, default=4, help="tissue tiles swept in each mode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if not args.cohort.is_file():
        ap.error(f"--cohort: no such file: {args.cohort} (make cohort writes the default one)")
    torch.set_num_threads(args.threads)

    from xpression.data.manifest import load_manifest
    from xpression.data.mask import tissue_mask
    from xpression.data.volume import open_volume
    from xpression.inference.predictor import Predictor
    from xpression.inference.sweep import ContextSource, sweep_tiles, tissue_tiles
    from xpression.inference.grid import Tiling, choose_tile_shape
    from xpression.inference.volume_sweep import DEFAULT_TILE_VOX, plan_grid

    cohort = load_manifest(args.cohort)
    entry = cohort.volume(args.volume_id) if args.volume_id else cohort.volumes[0]
    raw = open_volume(entry.image, entry.voxel_size_um)
    if args.run is not None:
        from xpression.inference.runs import load_model, resolve_run

        info = resolve_run(args.run, "best")
        net, spec, label = load_model(info), info.spec, str(args.run)
    else:
        net, spec = default_model(tuple(raw.voxel_size_um))
        label = "model=multiscale_cnn3d (random weights)"
    if spec.context is None:
        raise SystemExit(f"{label} is not a multi-scale model (its input spec has no context view)")
    pred = Predictor(net, device=args.device, precision="fp32", context_stride=spec.context.stride)
    volume, normalize = spec.prepare(raw)
    context = ContextSource(*spec.prepare_context(raw), spec.context)
    grid, _ = plan_grid(volume, pred, (33.6, 25.6, 25.6), "dense")
    tile_shape = choose_tile_shape(grid, DEFAULT_TILE_VOX, None)
    tiling = Tiling(grid.shape, tile_shape)
    mask = tissue_mask(raw)
    tiles = tissue_tiles(tiling, grid, mask)[: args.tiles]
    if not tiles:
        raise SystemExit(f"volume {entry.id} has no tissue tile")
    maps, rows = {}, []
    for mode in ("dense", "patch"):
        out = np.full((pred.num_targets,) + tuple(grid.shape), np.nan, np.float32)
        t0 = time.perf_counter()
        points = 0
        for res in sweep_tiles(volume, pred, grid, tile_shape, mode, mask=mask, normalize=normalize, tiles=tiles,
                               context=context, batch_size=64):
            out[(slice(None),) + res.tile.slices] = res.values
            points += res.n_points
        seconds = time.perf_counter() - t0
        maps[mode] = out
        rows.append((mode, points, seconds, points / seconds))
    diff = float(np.nanmax(np.abs(maps["dense"] - maps["patch"])))
    same_mask = bool(np.array_equal(np.isfinite(maps["dense"]), np.isfinite(maps["patch"])))
    print(f"multi-scale sweep, {label}; volume {entry.id} {tuple(raw.shape)} voxels of {list(raw.voxel_size_um)} um; "
          f"patch {list(pred.patch_shape)} voxels, context stride {list(spec.context.stride)}; grid step "
          f"{list(grid.step_vox)} voxels; {len(tiles)} tissue tiles of {list(tile_shape)} grid points; "
          f"{args.threads} threads, {args.device}")
    print("| mode | grid points | seconds | points/s | vs patch |")
    print("|---|---|---|---|---|")
    patch_rate = rows[1][3]
    for mode, points, seconds, rate in rows:
        print(f"| {mode} | {points} | {seconds:.2f} | {rate:.0f} | {rate / patch_rate:.1f}x |")
    print(f"max |dense - patch| = {diff:.2e} (float32); same points answered: {same_mask}")


if __name__ == "__main__":
    main()

"""Patches/s delivered by the DataModule next to the training-step rate of a small 3D CNN.

    python benchmarks/loader.py [--manifest PATH] [--batch-size 16] [--num-workers 0] [--threads 1]
                                [--voxel-size-um 1.6]

Without ``--manifest``: ``data/phantom_default/cohort.yaml`` if present, else the tiny phantom
generated into a temporary folder. Default geometry (34 x 205 x 205 um at the volume's voxel
size), stratified sampler, default augmentations. The loader should be >= 5x the model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from xpression.data.datamodule import XPressionDataModule
from xpression.data.sampling import StratifiedSampler
from xpression.data.splits import SpatialBlocksSplit

ROOT = Path(__file__).resolve().parents[1]


def _manifest(arg: str | None, tmp: str) -> Path:
    if arg:
        return Path(arg)
    default = ROOT / "data" / "phantom_default" / "cohort.yaml"
    if default.is_file():
        return default
    subprocess.run([sys.executable, "-m", "xpression.phantom", "--out", tmp, "--preset", "tiny"], check=True, capture_output=True)
    return Path(tmp) / "cohort.yaml"


def _model(dm: XPressionDataModule) -> tuple[nn.Module, str]:
    """The project's cnn3d config if the models package is there, else a tiny inline 3D CNN."""
    try:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge({"loss": None}, {"m": OmegaConf.load(ROOT / "conf" / "model" / "cnn3d.yaml")})
        module = instantiate(cfg.m)(target_spec=dm.target_spec, patch_shape=dm.patch_shape_vox, spot_radius_vox=27.5 / dm.voxel_size_um[2])
        return module, "conf/model/cnn3d"
    except Exception:  # models package absent or its API changed: keep the benchmark usable
        t = dm.target_spec.n_targets
        net = nn.Sequential(
            nn.Conv3d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(64, t),
        )
        return net, "inline 3-layer CNN"


def _loader_rate(dm: XPressionDataModule, seconds: float) -> tuple[float, int]:
    n, start = 0, time.perf_counter()
    epoch = 0
    while time.perf_counter() - start < seconds:
        dm.set_epoch(epoch)
        for batch in dm.train_dataloader():
            batch = dm.apply_augment(batch)
            n += batch["image"].shape[0]
        epoch += 1
    return n / (time.perf_counter() - start), n


def _model_rate(model: nn.Module, batch: dict, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        out = model(batch["image"])
        out = out["pred"] if isinstance(out, dict) and "pred" in out else out
        loss = F.kl_div(F.log_softmax(out, dim=1), batch["target"], reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch["image"].shape[0] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared machines: 1)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--voxel-size-um", type=float, default=None, help="model voxel size (default: the volume's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _manifest(args.manifest, tmp)
        dm = XPressionDataModule(
            manifest, sampler=StratifiedSampler(voxel_size_um=args.voxel_size_um), split=SpatialBlocksSplit(),
            batch_size=args.batch_size, num_workers=args.num_workers, seed=0,
        )
        t0 = time.perf_counter()
        spec, shape = dm.target_spec, dm.patch_shape_vox
        t1 = time.perf_counter()
        dm.setup("fit")
        t2 = time.perf_counter()
        loader, n = _loader_rate(dm, args.seconds)
        model, model_name = _model(dm)
        batch = next(iter(dm.train_dataloader()))
        model_rate = _model_rate(model, batch, args.steps)
    spots = dm.spots
    print(f"cohort {manifest} | {spots['section_id'].nunique()} sections, {len(spots)} spots "
          f"({int((spots['split'] == 'train').sum())} train) | patch {shape} vox at {dm.voxel_size_um} um | "
          f"batch {args.batch_size}, workers {args.num_workers}, torch threads {args.threads}")
    print(f"sections + targets + split: {t1 - t0:.2f} s; slab read + cache: {t2 - t1:.2f} s")
    rows = [
        ("DataModule train loader (+ augment)", loader, f"{n} patches"),
        (f"training step, {model_name}", model_rate, f"{args.steps} steps"),
    ]
    print(f"{'what':<42}{'patches/s':>12}  note")
    for what, rate, note in rows:
        print(f"{what:<42}{rate:>12.0f}  {note}")
    print(f"{'loader / model':<42}{loader / model_rate:>11.1f}x  (target >= 5x)")


if __name__ == "__main__":
    main()

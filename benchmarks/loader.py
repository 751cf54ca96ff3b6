"""Patches/s delivered by the DataModule (per worker count) next to the training-step rate of a small 3D CNN.

    python benchmarks/loader.py [--manifest PATH] [--batch-size 16] [--num-workers 0 [4 8 ...]]
                                [--threads 1] [--voxel-size-um 1.6] [--device cpu|cuda] [--json PATH]

Without ``--manifest``: ``data/phantom_default/cohort.yaml`` if present, else the tiny phantom
generated into a temporary folder. Default geometry (34 x 205 x 205 um at the volume's voxel
size), stratified sampler, default augmentations. The loader is timed as training consumes it:
batches moved to ``--device`` (pinned memory on a GPU), made float32 and augmented there, after
the first batch (worker start-up) and over ``--seconds`` per worker count; one loader with
persistent workers serves every epoch, as in a Trainer. On a GPU (pinned memory, persistent
workers) each loader's workers write their batches into shared slots allocated once
(``datamodule.BatchPool``) and the pin-memory thread copies them out; on the CPU (no pinning)
each worker batch is a fresh shared-memory segment.
The loader should be >= 5x the model.
"""

from __future__ import annotations

import argparse
import json
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
sys.path.insert(0, str(ROOT))

from benchmarks._timing import timed_calls  # noqa: E402


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
        from xpression.config import compose

        cfg = compose("train", ["model=cnn3d", "loss=auto"])  # the preset on conf/model/_module.yaml
        module = instantiate(cfg.model, loss=None)(target_spec=dm.target_spec, patch_shape=dm.patch_shape_vox, spot_radius_vox=27.5 / dm.voxel_size_um[2])
        return module, "conf/model/cnn3d"
    except Exception:  # models package absent or its API changed: keep the benchmark usable
        t = dm.target_spec.n_targets
        net = nn.Sequential(
            nn.Conv3d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(64, t),
        )
        return net, "inline 3-layer CNN"


def _loader_rate(dm: XPressionDataModule, seconds: float, device: torch.device) -> tuple[float, int, dict]:
    """Patches/s as training consumes the loader, and where a batch's time goes (ms per batch,
    after the first): the main thread waiting for the next batch, the main thread moving it to
    ``device`` and augmenting it (launch time on a GPU: the work itself runs asynchronously), and,
    with pooled batches, the pin-memory thread's copy of a slot into pinned memory."""
    from xpression.data.datamodule import BatchPool

    epoch, n, batches = 0, 0, 0
    wait = busy = 0.0
    copies: list[float] = []
    take = BatchPool.take
    BatchPool.take = timed_calls(take, copies.append)
    start = None
    try:
        loader = dm.train_dataloader()  # once, as a Trainer does: persistent workers serve every epoch
        while start is None or time.perf_counter() - start < seconds:
            dm.set_epoch(epoch)
            it = iter(loader)
            while True:
                t0 = time.perf_counter()
                batch = next(it, None)
                t1 = time.perf_counter()
                if batch is None:
                    break
                batch = dm.apply_augment(dm.device_batch(batch, device))
                t2 = time.perf_counter()
                if start is None:  # the first batch pays for starting the workers
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    copies.clear()
                    continue
                n += batch["image"].shape[0]
                batches += 1
                wait, busy = wait + t1 - t0, busy + t2 - t1
                if time.perf_counter() - start > seconds:
                    break
            epoch += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = n / (time.perf_counter() - start)
    finally:
        BatchPool.take = take
    per = 1e3 / max(batches, 1)
    parts = {"wait_ms": wait * per, "to_device_augment_ms": busy * per,
             "pin_copy_ms": 1e3 * sum(copies) / len(copies) if copies else None}
    return rate, n, parts


def _model_rate(model: nn.Module, batch: dict, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.to(batch["image"].device).train()

    def step() -> None:
        out = model(batch["image"])
        out = out["pred"] if isinstance(out, dict) and "pred" in out else out
        loss = F.kl_div(F.log_softmax(out, dim=1), batch["target"], reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    if batch["image"].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if batch["image"].is_cuda:
        torch.cuda.synchronize()
    return steps * batch["image"].shape[0] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, nargs="+", default=[0], help="one or more worker counts")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared machines: 1)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--voxel-size-um", type=float, default=None, help="model voxel size (default: the volume's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", action=argparse.BooleanOptionalAction, default=True, help="also time a training step")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.manifest is not None and not Path(args.manifest).is_file():
        ap.error(f"--manifest: no such file: {args.manifest}")
    if args.batch_size < 1 or min(args.num_workers) < 0:
        ap.error(f"--batch-size must be >= 1 and --num-workers >= 0, got {args.batch_size} and {args.num_workers}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _manifest(args.manifest, tmp)
        dm = XPressionDataModule(
            manifest, sampler=StratifiedSampler(voxel_size_um=args.voxel_size_um), split=SpatialBlocksSplit(),
            batch_size=args.batch_size, num_workers=args.num_workers[0], pin_memory=device.type == "cuda", seed=0,
        )
        t0 = time.perf_counter()
        spec, shape = dm.target_spec, dm.patch_shape_vox
        t1 = time.perf_counter()
        dm.setup("fit")
        t2 = time.perf_counter()
        rates = {}
        for w in args.num_workers:
            dm.num_workers, dm.persistent_workers = w, w > 0
            rates[w] = _loader_rate(dm, args.seconds, device)
        model_rate = None
        if args.model:
            model, model_name = _model(dm)
            batch = dm.device_batch(next(iter(dm.train_dataloader())), device)
            model_rate = _model_rate(model, batch, args.steps)
    spots = dm.spots
    print(f"cohort {manifest} | {spots['section_id'].nunique()} sections, {len(spots)} spots "
          f"({int((spots['split'] == 'train').sum())} train) | patch {shape} vox at {dm.voxel_size_um} um | "
          f"batch {args.batch_size}, torch threads {args.threads}, {device}")
    print(f"sections + targets + split: {t1 - t0:.2f} s; slab read + cache: {t2 - t1:.2f} s")
    rows = [(f"DataModule train loader, {w} workers (+ augment)", r,
             f"{n} patches; ms per batch: waiting {p['wait_ms']:.2f}, to {device.type} + augment {p['to_device_augment_ms']:.2f}"
             + (f", pin copy (pin-memory thread) {p['pin_copy_ms']:.2f}" if p["pin_copy_ms"] is not None else ""))
            for w, (r, n, p) in rates.items()]
    if model_rate is not None:
        rows.append((f"training step, {model_name}", model_rate, f"{args.steps} steps"))
    print(f"{'what':<48}{'patches/s':>12}  note")
    for what, rate, note in rows:
        print(f"{what:<48}{rate:>12.0f}  {note}")
    first = rates[args.num_workers[0]][0]
    for w, (r, _, _) in list(rates.items())[1:]:
        print(f"{f'{w} workers / {args.num_workers[0]} workers':<48}{r / first:>11.1f}x")
    if model_rate is not None:
        best = max(r for r, _, _ in rates.values())
        print(f"{'loader (best) / model':<48}{best / model_rate:>11.1f}x  (target >= 5x)")
    if args.json:
        args.json.write_text(json.dumps({"patch_shape_vox": list(shape), "batch_size": args.batch_size, "device": str(device),
                                         "loader_patches_s": {str(w): r for w, (r, _, _) in rates.items()},
                                         "loader_ms_per_batch": {str(w): p for w, (_, _, p) in rates.items()},
                                         "model_patches_s": model_rate}, indent=2))


if __name__ == "__main__":
    main()

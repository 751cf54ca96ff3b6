"""Training speed: the Lightning loop against a bare training step, and the work after the fit.

    python benchmarks/train_speed.py --manifest COHORT.yaml [--model cnn3d_paper|timm_resnet18|cnn3d]
                                     [--device cpu|cuda] [--voxel-size-um 1.6] [--batch-size 32]
                                     [--workers 4] [--epochs 3] [--steps 20] [--json PATH]

One process, one data module (all sections of the cohort; by default the published sampling,
i.e. rare dominant programs drawn up to 5x, and the published 80/14/6 random split; default
augmentation) and the model config ``conf/model/<model>.yaml`` with random weights:

1. Bare step: one real batch already on the device, forward + loss + backward + gradient
   clipping + AdamW, as the Trainer configures them (CUDA: bf16 autocast), timed over
   ``--steps`` steps after a warm-up. Patches per second.
2. Lightning loop: ``Trainer.fit`` for ``--epochs`` epochs (CUDA: ``bf16-mixed``; no progress
   bar or logger; the run's checkpoint callbacks and checkpoint plugin, writing to a temporary
   folder, unless ``--no-checkpoints``), loader workers as given. The ``Throughput`` callback's patches/s
   (loading, transfer, augmentation and steps; the median over the epochs after the first) and
   the wall time of whole epochs (validation included).
3. ``--breakdown`` (default on): one more epoch with the device synchronised between phases,
   ms per step in the loader and copy to the device, in the float conversion and augmentation,
   and in the step itself, beside the bare step's ms.
4. After the fit, on the training device: predictions for every spot (``predict_spots``) and
   the off-plane probe (``conf/off_plane/probe.yaml``, cohorts with a truth spec), timed.

The ratio Lightning / bare and the share of a 10-epoch run spent outside training steps
(10 epochs at the measured epoch time plus the post-fit work, against 10 epochs of training
patches at the bare rate) are printed last, the share once more with the start-up (imports,
reading the cohort, caching the slabs) counted, as ``train.py`` runs it before its first step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_module(name: str, dm):
    """``conf/model/<name>.yaml`` instantiated for the data module's targets and patch."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from xpression.config import compose

    cfg = OmegaConf.create({"m": compose("train", [f"model={name}"]).model})  # the preset on conf/model/_module.yaml
    cfg.m.loss = None
    return instantiate(cfg.m)(target_spec=dm.target_spec, patch_shape=dm.patch_shape_vox,
                              spot_radius_vox=27.5 / dm.voxel_size_um[2])


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step_rate(module, batch: dict, device, steps: int, clip: float = 1.0) -> float:
    """Patches/s of forward + loss + backward + clipping + AdamW on one device-resident batch."""
    import torch

    module.to(device).train()
    params = [p for p in module.net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(module.hparams.lr))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with amp:
            raw = module.net.forward_raw(batch["image"])
            loss = module.loss_fn(raw, batch["target"].to(raw.dtype))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch["image"].shape[0] / (time.perf_counter() - t0)


class _EpochClock:
    """Wall time of each whole training epoch: from its start to the next epoch's start (the last:
    to the end of training), so its validation, its checkpoint saves (Lightning runs the
    checkpoint callbacks after every other callback) and every other epoch-end hook are in it."""

    def __init__(self):
        import pytorch_lightning as pl

        starts: list[float] = []

        class Clock(pl.Callback):
            def on_train_epoch_start(cb, trainer, pl_module):  # noqa: N805
                now = time.perf_counter()
                if starts:
                    self.seconds.append(now - starts[-1])
                starts.append(now)

            def on_train_end(cb, trainer, pl_module):  # noqa: N805
                if starts:
                    self.seconds.append(time.perf_counter() - starts[-1])

        self.seconds: list[float] = []
        self.callback = Clock()


def _trainer(device, epochs: int, callbacks: list, limit_train: int | None, limit_val: int | None,
             checkpoints: Path | None = None, plugins: bool = True):
    """The Trainer both loops run in: as ``trainer=gpu`` (bf16) or ``cpu`` configures it, without
    logger, progress bar or sanity check; with ``checkpoints`` (a folder), the run's two checkpoint
    callbacks (``conf/callbacks``: the best, and the last every epoch) write there through the
    trainer config's checkpoint plugins (``plugins=False``: Lightning's default, on the training
    thread), as in ``train.py``; else none."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from xpression.config import compose

    cuda = device.type == "cuda"
    extra: dict = {"enable_checkpointing": False}
    if checkpoints is not None:
        cfg = compose("train", [f"trainer={'gpu' if cuda else 'cpu'}"])
        callbacks = callbacks + [instantiate(cfg.callbacks[key], dirpath=str(checkpoints))
                                 for key in ("model_checkpoint", "last_checkpoint")]
        extra = {"enable_checkpointing": True,
                 "plugins": [instantiate(p) for p in cfg.trainer.get("plugins") or []] if plugins else None}
    return pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
                      max_epochs=epochs, gradient_clip_val=1.0, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                      limit_train_batches=limit_train, limit_val_batches=limit_val, **extra)


def lightning_rate(module, dm, device, epochs: int, limit_batches: int | None = None, checkpoints: bool = True,
                   plugins: bool = True) -> dict:
    """The Lightning loop's rates and epoch times; with ``checkpoints``, the run's checkpoint
    callbacks write every epoch (into a temporary folder) and the time the training thread spends
    in them is reported (with the default background writes: the copy of the state)."""
    import tempfile

    from benchmarks._timing import timed_calls
    from xpression.callbacks import Throughput
    from xpression.training import EpochSeed

    tp, clock = Throughput(), _EpochClock()
    with tempfile.TemporaryDirectory(prefix="train_speed_ckpt_") as folder:
        trainer = _trainer(device, epochs, [EpochSeed(0), tp, clock.callback], limit_batches, limit_batches,
                           Path(folder) if checkpoints else None, plugins)
        saves: list[float] = []
        trainer.save_checkpoint = timed_calls(trainer.save_checkpoint, saves.append)  # what ModelCheckpoint calls
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        fit_seconds = time.perf_counter() - t0
        written = sorted(p.name for p in Path(folder).iterdir())
    later = tp.rates[1:] or tp.rates
    return {"patches_s": float(np.median(later)), "patches_s_per_epoch": tp.rates, "epoch_seconds": clock.seconds,
            "fit_seconds": fit_seconds, "checkpoint_saves": len(saves), "checkpoint_seconds": float(sum(saves)),
            "checkpoint_plugins": [type(p).__name__ for p in (trainer.strategy.checkpoint_io,)] if checkpoints else [],
            "checkpoint_files": written,
            "train_patches_per_epoch": int(len(dm.train_sampler())) if limit_batches is None else limit_batches * dm.batch_size}


def step_breakdown(module, dm, device, limit_batches: int | None = None) -> dict:
    """One more epoch with the device synchronised at each phase boundary (slower than the
    throughput epochs, which overlap them): ms per training step spent in the loader and the copy
    to the device, in the float conversion and augmentation (``on_after_batch_transfer``), and in
    the step itself (forward, loss, backward, clipping, optimiser, Lightning's hooks around them)."""
    import pytorch_lightning as pl

    marks: dict[str, list[float]] = {"fetch": [], "augment": [], "step": []}
    clock = {"end": None, "after": None}
    inner = dm.on_after_batch_transfer

    def after_transfer(batch, dataloader_idx):
        _sync(device)
        t0 = time.perf_counter()
        out = inner(batch, dataloader_idx)
        _sync(device)
        if dm.trainer is not None and dm.trainer.training:
            clock["after"] = time.perf_counter()
            marks["augment"].append(clock["after"] - t0)
            if clock["end"] is not None:
                marks["fetch"].append(t0 - clock["end"])
        return out

    class Phases(pl.Callback):
        def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):  # noqa: N805
            _sync(device)
            clock["end"] = time.perf_counter()
            if clock["after"] is not None:
                marks["step"].append(clock["end"] - clock["after"])

        def on_train_epoch_end(cb, trainer, pl_module):  # noqa: N805
            clock["end"] = None  # validation runs between epochs: not a fetch

    dm.on_after_batch_transfer = after_transfer
    try:
        _trainer(device, 1, [Phases()], limit_batches, 0).fit(module, datamodule=dm)
    finally:
        del dm.on_after_batch_transfer
    return {f"{k}_ms": 1e3 * float(np.median(v[1:] or v)) if v else None for k, v in marks.items()}


def post_fit(module, dm, device) -> dict:
    """Seconds for the post-fit predictions and what ``train`` scores after the fit (baselines,
    the ridge on the run's patch, the off-plane probe) on ``device``."""
    from omegaconf import OmegaConf

    from benchmarks._timing import timed_methods
    from xpression.callbacks import predict_spots
    from xpression.evaluation.run_scores import evaluate_run
    from xpression.inference.predictor import Predictor
    from xpression.models.closed_form import ClosedFormModel

    t0 = time.perf_counter()
    table = predict_spots(module, dm, device)
    out = {"predict_spots_seconds": time.perf_counter() - t0, "spots": len(table)}
    probe = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "off_plane" / "probe.yaml"))
    # Probe planes where this run's own patch fits (the benchmark's deepest patch may not fit a
    # small timing cohort): the point is the probe's cost, not a score comparable across runs.
    probe["max_patch_um"] = [float(v) for v in dm.sampler.geometry.extent_um(dm.voxel_size_um)]
    # the scoring's two largest parts on their own: the ridge baseline's fit pass over every spot
    # (CPU) and the model's forward passes over the probe's patches (the run's device)
    parts = {"ridge_fit_seconds": (ClosedFormModel, "fit_predict"), "probe_model_seconds": (Predictor, "predict_patches")}
    with timed_methods(parts, out):
        t0 = time.perf_counter()
        metrics, _ = evaluate_run(module, dm, table, off_plane=probe)
        out["off_plane_seconds"] = time.perf_counter() - t0
    out["off_plane_points"] = sum((metrics.get("off_plane") or {}).get("n_points", {}).values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--model", default="cnn3d_paper", help="a conf/model config (cnn3d_paper, timm_resnet18, cnn3d, ...)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--voxel-size-um", type=float, default=None, help="model voxel size (default: the volume's)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--limit-batches", type=int, default=None, help="training and validation batches per epoch (smoke runs)")
    ap.add_argument("--sampler", choices=["stratified", "spot"], default="stratified")
    ap.add_argument("--split", choices=["stratified_random", "spatial_blocks"], default="stratified_random")
    ap.add_argument("--post-fit", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--checkpoints", action=argparse.BooleanOptionalAction, default=True,
                    help="the run's checkpoint callbacks write every epoch of the Lightning loop (as in train.py)")
    ap.add_argument("--checkpoint-plugins", action=argparse.BooleanOptionalAction, default=True,
                    help="the trainer config's checkpoint plugins (background writes); --no-checkpoint-plugins: "
                         "Lightning's default writes on the training thread")
    ap.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                    help="one more epoch, synchronised, timing the phases of a step")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not Path(args.manifest).is_file():
        ap.error(f"--manifest: no such file: {args.manifest}")

    t_start = time.perf_counter()
    import torch

    from xpression.data.datamodule import XPressionDataModule
    from xpression.data.sampling import SpotSampler, StratifiedSampler
    from xpression.data.splits import SpatialBlocksSplit, StratifiedRandomSplit

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    sampler = (StratifiedSampler if args.sampler == "stratified" else SpotSampler)(voxel_size_um=args.voxel_size_um)
    split = StratifiedRandomSplit() if args.split == "stratified_random" else SpatialBlocksSplit()
    if cuda:
        torch.zeros(1, device=device)  # the CUDA context, part of the imports' share below
    t_imports = time.perf_counter() - t_start
    dm = XPressionDataModule(args.manifest, sampler=sampler, split=split,
                             batch_size=args.batch_size, num_workers=args.workers, pin_memory=cuda,
                             persistent_workers=args.workers > 0, seed=0)
    dm.setup("fit")
    report: dict = {"device": torch.cuda.get_device_name(device) if cuda else "CPU", "model": args.model,
                    "patch_shape_vox": list(dm.patch_shape_vox), "voxel_size_um": list(dm.voxel_size_um),
                    "batch_size": args.batch_size, "workers": args.workers, "spots": len(dm.spots),
                    "torch_threads": torch.get_num_threads(),
                    "setup_seconds": time.perf_counter() - t_start, "imports_seconds": t_imports}

    def emit() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))

    print(f"{args.model} on {report['device']}: patch {dm.patch_shape_vox} voxels of {dm.voxel_size_um} um, "
          f"{len(dm.spots)} spots, batch {args.batch_size}, {args.workers} loader workers, "
          f"{torch.get_num_threads()} torch threads; "
          f"start-up {report['setup_seconds']:.1f} s (imports and device {t_imports:.1f} s, then the cohort and "
          f"slab cache)", flush=True)
    batch = dm.device_batch(next(iter(dm.train_dataloader())), device)
    report["bare_patches_s"] = bare_step_rate(build_module(args.model, dm), batch, device, args.steps)
    print(f"{'bare training step':40s} {report['bare_patches_s']:10.0f} patches/s", flush=True)
    emit()

    module = build_module(args.model, dm)
    lit = lightning_rate(module, dm, device, args.epochs, args.limit_batches, args.checkpoints, args.checkpoint_plugins)
    report["lightning"] = lit
    report["ratio_lightning_bare"] = lit["patches_s"] / report["bare_patches_s"]
    print(f"{'Lightning loop (Throughput callback)':40s} {lit['patches_s']:10.0f} patches/s "
          f"(epochs: {', '.join(f'{r:.0f}' for r in lit['patches_s_per_epoch'])}); "
          f"whole epochs {', '.join(f'{s:.2f}' for s in lit['epoch_seconds'])} s", flush=True)
    if args.checkpoints:
        print(f"{'checkpoints on the training thread':40s} {lit['checkpoint_seconds']:10.2f} s for {lit['checkpoint_saves']} "
              f"saves ({lit['checkpoint_plugins'][0]}; {', '.join(lit['checkpoint_files'])}), in the epochs above", flush=True)
    emit()

    if args.breakdown:
        report["step_breakdown"] = parts = step_breakdown(build_module(args.model, dm), dm, device, args.limit_batches)
        bare_ms = 1e3 * args.batch_size / report["bare_patches_s"]
        shown = ", ".join(f"{label} {'-' if parts[key] is None else format(parts[key], '.2f')}" for label, key in
                          (("loader + copy to the device", "fetch_ms"), ("float + augment", "augment_ms"), ("step", "step_ms")))
        print(f"{'a step, phases synchronised, median ms':40s} {shown}; bare step {bare_ms:.2f}", flush=True)
        emit()

    if args.post_fit:
        post = post_fit(module, dm, device)
        report["post_fit"] = post
        epoch_s = float(np.median(lit["epoch_seconds"][1:] or lit["epoch_seconds"]))
        steps_s = 10 * lit["train_patches_per_epoch"] / report["bare_patches_s"]
        run_s = 10 * epoch_s + post["predict_spots_seconds"] + post["off_plane_seconds"]
        report["outside_steps_10_epochs"] = 1.0 - steps_s / run_s
        # train.py also starts up (imports, the cohort, the slab cache) before its first step
        report["outside_steps_10_epochs_with_startup"] = 1.0 - steps_s / (run_s + report["setup_seconds"])
        print(f"{'post-fit predictions (all spots)':40s} {post['predict_spots_seconds']:10.2f} s for {post['spots']} spots")
        print(f"{'scoring: ridge fit pass + off-plane probe':40s} {post['off_plane_seconds']:10.2f} s for "
              f"{post['off_plane_points']} points: ridge fit pass {post['ridge_fit_seconds']:.2f} s, the model on "
              f"the probe's patches {post['probe_model_seconds']:.2f} s, the rest (reads, ridge, baselines, "
              f"truth) {post['off_plane_seconds'] - post['ridge_fit_seconds'] - post['probe_model_seconds']:.2f} s")
        print(f"a 10-epoch run: {run_s:.1f} s, of which {steps_s:.1f} s training steps at the bare rate: "
              f"{report['outside_steps_10_epochs']:.0%} outside the steps "
              f"({report['outside_steps_10_epochs_with_startup']:.0%} with the start-up)", flush=True)
    print(f"Lightning / bare step: {report['ratio_lightning_bare']:.2f}")
    emit()


if __name__ == "__main__":
    main()

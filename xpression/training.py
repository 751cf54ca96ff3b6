"""One training run, from a composed Hydra config to a run folder with honest held-out numbers.

`train.py` is a thin `@hydra.main` wrapper around `train`. The order matters: everything that
can be checked without reading voxels (names, the loss against the target kind, the patch
against the backbone, a checkpoint against the target set) is checked before any CT is read.

A run folder holds: `config.yaml` (the resolved config; Hydra's own in `.hydra/`), `checkpoints/` (best and last), `metrics.json`,
`predictions.csv` (every spot, its split, truth and prediction), `probe_points.csv` (with an
off-plane probe: every probe point, its truth, the model's and the baselines' answers) and `figures/`; a resumed run
adds `config.resumed-<n>.yaml` (`xpression.resume`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from xpression.callbacks import PostFit, SpotPredictions, fit_without_lightning
from xpression.config import CONF_DIR, check_train_config, sync_patch
from xpression.data.splits import check_split_counts
from xpression.resume import RecordRunConfig, continue_metrics_history, start_run, write_run_config

__all__ = ["EpochSeed", "build_datamodule", "fit_summary", "save_ood_fit", "train"]

log = logging.getLogger(__name__)


class EpochSeed(pl.Callback):
    """Seed every source of randomness from (seed, epoch), so a run resumed from a checkpoint
    replays exactly what an uninterrupted run would have done.

    Sampler draws and augmentations use their own generators, reseeded at the epoch start.
    The global generator (dropout) is reseeded just before the epoch's first training step:
    Lightning may create the data iterator, which draws from it, before or after the epoch-start
    hooks depending on whether the run was resumed.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def _epoch_seed(self, epoch: int) -> int:
        return self.seed * 1_000_003 + epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            epoch_seed = self._epoch_seed(trainer.current_epoch)
            torch.manual_seed(epoch_seed)
            np.random.seed(epoch_seed % 2**32)


def model_summary_flag(trainer_cfg: Any, callbacks: list) -> dict:
    """``{"enable_model_summary": False}`` when the callbacks hold no model summary and the trainer
    config does not set the flag: ``~callbacks.model_summary`` then means no summary, not
    Lightning's own default one."""
    from pytorch_lightning.callbacks import ModelSummary

    if trainer_cfg.get("enable_model_summary") is not None or any(isinstance(c, ModelSummary) for c in callbacks):
        return {}
    return {"enable_model_summary": False}


def check_wandb_login(loggers: Any) -> None:
    """Raise :class:`ConfigError` when a wandb logger is to log online (``WANDB_OFFLINE=false``)
    without a login (``WANDB_API_KEY`` or ``wandb login``'s netrc entry): wandb would otherwise
    ask for one at the terminal, or fail with a traceback in a batch job."""
    import netrc
    from urllib.parse import urlparse

    from xpression.config import ConfigError

    for name, node in (loggers or {}).items():
        if not str(node.get("_target_", "")).endswith("WandbLogger") or node.get("offline", True):
            continue
        if os.environ.get("WANDB_API_KEY"):
            return
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
        try:
            if netrc.netrc().authenticators(host):
                return
        except (OSError, netrc.NetrcParseError):
            pass
        raise ConfigError([f"logger.{name}: WANDB_OFFLINE=false logs online, which needs a wandb login: run "
                           "`wandb login` or set WANDB_API_KEY (or leave WANDB_OFFLINE unset to log offline)"], "logger")


def build_datamodule(cfg: DictConfig) -> Any:
    """The data module of a composed training config. ``data.seed`` (the split, the sampler's
    draws, the augmentations) follows ``seed`` unless set, so members of an ensemble can share one
    split and differ in their initial weights only (``seed=0,1,2 data.seed=0``)."""
    seed = {} if "seed" in cfg.data else {"seed": cfg.seed}
    return instantiate(cfg.data, target=cfg.target, sampler=cfg.sampler, split=cfg.split, **seed, _recursive_=False)


def train(cfg: DictConfig) -> float | None:
    """Fit, run the post-fit evaluation (``conf/evaluation/``: every spot predicted with the best
    weights, scored, figures; Lightning callbacks on the trainer's device), write the run folder.

    Returns:
        The value of `cfg.optimized_metric` (for hyper-parameter sweepers), or None.
    """
    cfg, start = start_run(cfg)  # resume=RUN: the run's own config; a checkpoint must match its config
    sync_patch(cfg)
    _add_default_evaluation(cfg)
    check_train_config(cfg)
    check_wandb_login(cfg.get("logger"))
    out_dir = start.out_dir
    config = resolved_config(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build_datamodule(cfg)
    voxel_um = datamodule.voxel_size_um
    # Backbone, loss-vs-kind and patch-size checks that need no target values run first ...
    model_factory = instantiate(cfg.model)
    spec = datamodule.target_spec  # reads the ST sections (no CT voxels)
    check_split_counts(datamodule.spots["split"], datamodule.split)
    # ... then the model proper, whose construction also checks init_from against the targets. The
    # input spec (patch, voxel size, normalisation, quantisation, targets) goes into its checkpoints.
    input_spec = datamodule.input_spec()
    model = model_factory(target_spec=spec, patch_shape=datamodule.patch_shape_vox,
                          spot_radius_vox=input_spec.spot_radius_vox, input_spec=input_spec)
    post_fit = _instantiate_all(cfg.get("evaluation"))
    for step in post_fit:  # e.g. a patch larger than the probe set allows fails now, not after training
        if isinstance(step, PostFit):
            step.check(datamodule)

    callbacks = [EpochSeed(cfg.seed), RecordRunConfig(config), *_instantiate_all(cfg.get("callbacks")), *post_fit]
    loggers = _instantiate_all(cfg.get("logger"))
    continue_metrics_history(loggers, start)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      **model_summary_flag(cfg.trainer, callbacks))

    # Written once every check has passed: the resolved config (paths expanded) lets infer.py
    # rebuild the run without Hydra's runtime; a folder with one holds a run (xpression.resume).
    write_run_config(start, config)
    if isinstance(model, pl.LightningModule):
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        except SystemExit as stop:  # Lightning's own exit on Ctrl-C (1) or SIGTERM (0: a success to a scheduler)
            raise SystemExit(_interrupted(trainer, out_dir, stop)) from None
    else:  # a closed-form baseline (model=ridge): fitted once on the training spots, no epochs
        fit_without_lightning(trainer, model, datamodule)
        if trainer.is_global_zero:
            model.save_checkpoint(out_dir / "checkpoints" / "last.ckpt", config)
            save_ood_fit(model, datamodule, out_dir)
    if not trainer.is_global_zero:
        return None

    last = out_dir / "checkpoints" / "last.ckpt"
    if isinstance(model, pl.LightningModule) and not last.exists():
        trainer.save_checkpoint(last)  # presets without the checkpoint callbacks: keep the final weights for infer.py
        trainer.strategy.checkpoint_io.teardown()  # a background write (AsyncCheckpointIO) finishes here
    # [ood hook] infer.py ood=true reads it (xpression.inference.ood). Multi-process runs leave it
    # to infer.py, which fits it from the run's training spots when the file is missing.
    if isinstance(model, pl.LightningModule) and trainer.world_size == 1:
        best = next((c.model for c in trainer.callbacks if isinstance(c, SpotPredictions)), None) or model
        save_ood_fit(best, datamodule, out_dir, trainer.strategy.root_device)
    metrics_path = out_dir / "metrics.json"  # written by rank 0's post-fit steps (in a worker under ddp_spawn)
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    log.info("%s", fit_summary(trainer, metrics, fitted=isinstance(model, pl.LightningModule)))
    log.info("run folder: %s", out_dir)
    return _optimized_value(cfg, metrics)


def _interrupted(trainer: pl.Trainer, out_dir: Path, stop: SystemExit) -> int | str | None:
    """The exit status of a fit Lightning ended with ``SystemExit``, after one line saying how to
    continue it: 143 (128 + SIGTERM, as a shell reports a process it terminated) for a SIGTERM,
    which Lightning would end with status 0, a success to a batch scheduler; else Lightning's own."""
    sigterm = bool(getattr(trainer, "received_sigterm", False))
    if sigterm or trainer.interrupted:
        done = int(trainer.current_epoch)
        log.error("training %s after %d complete epoch%s: continue it with `python train.py resume=%s` (its "
                  "checkpoints/last.ckpt)", "stopped by SIGTERM" if sigterm else "interrupted", done, "s" * (done != 1),
                  out_dir)
    return 128 + 15 if sigterm else stop.code


def fit_summary(trainer: pl.Trainer, metrics: Mapping[str, Any], fitted: bool = True) -> str:
    """One line on how the fit ended: epochs, the best epoch and its monitored value (or that the
    final weights were used), why it stopped, training seconds."""
    if not fitted:
        return "closed-form fit (no epochs)" + (f"; {float(metrics['train_seconds']):.0f} s" if "train_seconds" in metrics else "")
    epochs = int(trainer.current_epoch)
    parts = [f"trained {epochs} epoch{'s' * (epochs != 1)}"]
    checkpoint = trainer.checkpoint_callback
    monitor = getattr(checkpoint, "monitor", None)
    score = getattr(checkpoint, "best_model_score", None)
    if monitor and score is not None:
        best_epoch = _checkpoint_epoch(getattr(checkpoint, "best_model_path", ""))
        parts.append(f"best {monitor} {float(score):.4f}" + (f" at epoch {best_epoch}" if best_epoch else ""))
    else:
        parts.append("final weights (no best checkpoint)")
    parts.append(f"stopped: {_stop_reason(trainer)}")
    if "train_seconds" in metrics:
        parts.append(f"{float(metrics['train_seconds']):.0f} s")
    return "; ".join(parts)


def save_ood_fit(model: Any, datamodule: Any, out_dir: Path, device: str | torch.device = "cpu") -> Path | None:
    """``out_dir/ood_fit.npz``: the out-of-distribution fit on the training spots' features of
    ``model``'s evaluation network (the weights' digest recorded: infer.py fits again for others).
    A closed-form model's fit comes from the training features it kept (no second pass)."""
    from xpression.inference.ood import OOD_FILE, fit_ood, fit_training_spots, weights_digest

    if getattr(model, "training_features", None) is not None:
        return fit_ood(model.standardised(model.training_features), weights_digest(model)).save(out_dir / OOD_FILE)
    net = getattr(model, "eval_net", model)
    if not hasattr(net, "forward_features"):
        return None
    return fit_training_spots(net, datamodule, device).save(out_dir / OOD_FILE)


def _checkpoint_epoch(path: str) -> int | None:
    """The number of epochs completed when a checkpoint was written (epochs counted from 1)."""
    if not path or not Path(path).exists():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # our own Lightning checkpoint
    return int(checkpoint["epoch"]) + 1 if "epoch" in checkpoint else None


def _stop_reason(trainer: pl.Trainer) -> str:
    if trainer.interrupted:
        return "interrupted"
    early = trainer.early_stopping_callback
    if early is not None and getattr(early, "stopped_epoch", 0) > 0:
        return f"early stopping ({early.monitor} did not improve for {early.patience} epochs)"
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return f"trainer.max_steps={trainer.max_steps} reached"
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch:
        return f"trainer.max_epochs={trainer.max_epochs} reached"
    return "trainer.max_time reached"


def _add_default_evaluation(cfg: DictConfig) -> None:
    """A run folder written before the post-fit evaluation was a config group (resume=RUN) gets
    the default group, so it is scored as it was then."""
    if "evaluation" not in cfg:
        with open_dict(cfg):
            cfg.evaluation = OmegaConf.load(CONF_DIR / "evaluation" / "default.yaml")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def _optimized_value(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    key = cfg.get("optimized_metric")
    if not key:
        return None
    split, _, name = str(key).partition("/")
    value = (metrics.get("splits") or {}).get(split, {}).get(name)
    return None if value is None else float(value)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as plain data, interpolations resolved, without Hydra's own node."""
    keys = [key for key in cfg if key != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)  # type: ignore[return-value]

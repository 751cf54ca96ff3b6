"""One training run, from a composed Hydra config to a run folder with honest held-out numbers.

`train.py` is a thin `@hydra.main` wrapper around `train`. The order matters: everything that
can be checked without reading voxels (names, the loss against the target kind, the patch
against the backbone, a checkpoint against the target set) is checked before any CT is read.

A run folder holds: `config.yaml` (the resolved config; Hydra's own in `.hydra/`), `checkpoints/` (best and last), `metrics.json`,
`predictions.csv` (every spot, its split, truth and prediction) and `figures/`; a resumed run
adds `config.resumed-<n>.yaml` (`xpression.resume`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from xpression.config import check_train_config
from xpression.data.splits import check_split_counts
from xpression.evaluation.figures import plot_section_maps, plot_training_curves
from xpression.evaluation.scores import evaluate_spots, scores_table
from xpression.resume import RecordRunConfig, continue_metrics_history, start_run, write_run_config

__all__ = ["EpochSeed", "evaluate_spots", "train"]

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


def train(cfg: DictConfig) -> float | None:
    """Fit, evaluate every split with the best weights, write the run folder.

    Returns:
        The value of `cfg.optimized_metric` (for hyper-parameter sweepers), or None.
    """
    cfg, start = start_run(cfg)  # resume=RUN: the run's own config; a checkpoint must match its config
    check_train_config(cfg)
    out_dir = start.out_dir
    config = resolved_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, target=cfg.target, sampler=cfg.sampler, split=cfg.split, seed=cfg.seed, _recursive_=False)
    voxel_um = datamodule.voxel_size_um
    spot_radius_vox = 27.5 / float(voxel_um[2])
    # Backbone, loss-vs-kind and patch-size checks that need no target values run first ...
    model_factory = instantiate(cfg.model)
    spec = datamodule.target_spec  # reads the ST sections (no CT voxels)
    check_split_counts(datamodule.spots["split"], datamodule.split)
    # ... then the model proper, whose construction also checks init_from against the targets.
    model = model_factory(target_spec=spec, patch_shape=datamodule.patch_shape_vox, spot_radius_vox=spot_radius_vox)
    if cfg.get("off_plane") is not None:  # a patch larger than the probe set allows fails now, not after training
        from xpression.evaluation.generalisation import OffPlaneProbe

        OffPlaneProbe.of(OmegaConf.to_container(cfg.off_plane, resolve=True)).check_patch(datamodule.patch_shape_vox, voxel_um)

    callbacks = [EpochSeed(cfg.seed), RecordRunConfig(config), *_instantiate_all(cfg.get("callbacks"))]
    loggers = _instantiate_all(cfg.get("logger"))
    continue_metrics_history(loggers, start)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    # Written once every check has passed: the resolved config (paths expanded) lets infer.py
    # rebuild the run without Hydra's runtime; a folder with one holds a run (xpression.resume).
    write_run_config(start, config)
    started = time.perf_counter()
    if isinstance(model, pl.LightningModule):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    else:  # a closed-form baseline (model=ridge): fitted once on the training spots, no epochs
        model.fit(datamodule)
    train_seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return None

    last = out_dir / "checkpoints" / "last.ckpt"
    if isinstance(model, pl.LightningModule) and not last.exists():
        trainer.save_checkpoint(last)  # presets without the checkpoint callbacks: keep the final weights for infer.py
    best = _best_checkpoint(trainer)
    if best is not None:
        model = type(model).load_from_checkpoint(best, map_location="cpu", weights_only=False)
    # post-fit predictions and the off-plane probe run on the training device
    device = trainer.strategy.root_device if isinstance(model, pl.LightningModule) else torch.device("cpu")
    predictions = predict_spots(model, datamodule, device)
    if isinstance(model, pl.LightningModule):  # [ood hook] infer.py ood=true reads it (xpression.inference.ood)
        save_ood_fit(model, datamodule, out_dir, device)
    metrics, predictions = _evaluate(cfg, model, datamodule, predictions)
    metrics.update(
        target_names=list(spec.names),
        target_kind=spec.kind,
        target_colors=list(spec.colors) if spec.colors is not None else None,
        target_reference=spec.reference,  # fitted programs -> the known programs they were matched to
        target_reference_r=spec.reference_r,
        best_checkpoint=str(best) if best else None,
        epochs=int(trainer.current_epoch),
        train_seconds=round(train_seconds, 2),
        parameters=int(sum(p.numel() for p in getattr(model, "net", model).parameters())),  # not the EMA copy
        patch_shape_vox=list(datamodule.patch_shape_vox),
        voxel_size_um=list(voxel_um),
    )
    predictions.to_csv(out_dir / "predictions.csv", index=False)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    if cfg.get("figures", True):
        _write_figures(predictions, spec.names, out_dir, loggers, spec.colors)
    Console(width=None if sys.stdout.isatty() else 160).print(
        scores_table(metrics["scores"], "held-out accuracy per volume (best checkpoint; baselines beside the model)"))
    log.info("run folder: %s", out_dir)
    return _optimized_value(cfg, metrics)


def predict_spots(model: pl.LightningModule, datamodule: pl.LightningDataModule, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Predict every spot of the data module (all splits) with `model` in eval mode, on `device`
    (float32).

    Returns:
        The spot table with `true/<target>` and `pred/<target>` columns added.
    """
    from xpression.data.datamodule import image_to_float

    datamodule.setup("predict")
    spots = datamodule.spots
    names = list(datamodule.target_spec.names)
    preds = np.full((len(spots), len(names)), np.nan, dtype=np.float32)
    truth = np.full_like(preds, np.nan)
    model = model.to(device).eval()
    with torch.inference_mode():
        for batch in datamodule.predict_dataloader():
            index = batch["index"].numpy()
            preds[index] = model(image_to_float(batch["image"].to(device, non_blocking=True))).float().cpu().numpy()
            truth[index] = batch["target"].numpy()
    table = spots.reset_index(drop=True).copy()
    for j, name in enumerate(names):
        table[f"true/{name}"] = truth[:, j]
        table[f"pred/{name}"] = preds[:, j]
    return table


def save_ood_fit(model: pl.LightningModule, datamodule: Any, out_dir: Path,
                 device: str | torch.device = "cpu") -> Path | None:
    """``out_dir/ood_fit.npz``: the out-of-distribution fit on the training spots' features of
    ``model``'s evaluation network (the weights' digest recorded: infer.py fits again for others)."""
    from xpression.inference.ood import OOD_FILE, fit_training_spots

    net = getattr(model, "eval_net", model)
    if not hasattr(net, "forward_features"):
        return None
    return fit_training_spots(net, datamodule, device).save(out_dir / OOD_FILE)


def _evaluate(cfg: DictConfig, model: Any, datamodule: Any, predictions: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
    """Per-volume scores of the model and its baselines (``xpression.evaluation.run_scores``)."""
    from xpression.evaluation.baselines import KNN_K
    from xpression.evaluation.run_scores import evaluate_run

    probe = OmegaConf.to_container(cfg.off_plane, resolve=True) if cfg.get("off_plane") is not None else None
    baselines = cfg.get("baselines") or {}
    return evaluate_run(model, datamodule, predictions, off_plane=probe, ridge=bool(baselines.get("ridge", True)),
                        k=int(baselines.get("knn_k", KNN_K)))


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def _best_checkpoint(trainer: pl.Trainer) -> Path | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return Path(path) if path and Path(path).exists() else None


def _write_figures(predictions: pd.DataFrame, names: list[str], out_dir: Path, loggers: list[Any],
                   colors: list[str] | None = None) -> None:
    figures = out_dir / "figures"
    plot_section_maps(predictions, list(names), figures, colors=colors)
    for logger in loggers:
        if isinstance(logger, pl.loggers.CSVLogger):
            csv = Path(logger.log_dir) / "metrics.csv"
            if csv.exists():
                plot_training_curves(csv, figures / "training_curves.png")


def _optimized_value(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    key = cfg.get("optimized_metric")
    if not key:
        return None
    split, _, name = str(key).partition("/")
    value = metrics["splits"].get(split, {}).get(name)
    return None if value is None else float(value)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as plain data, interpolations resolved, without Hydra's own node."""
    keys = [key for key in cfg if key != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)  # type: ignore[return-value]

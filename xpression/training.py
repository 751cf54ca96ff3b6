"""One training run, from a composed Hydra config to a run folder with honest held-out numbers.

`train.py` is a thin `@hydra.main` wrapper around `train`. The order matters: everything that
can be checked without reading voxels (names, the loss against the target kind, the patch
against the backbone, a checkpoint against the target set) is checked before any CT is read.

A run folder holds: `config.yaml` (the resolved config; Hydra's own in `.hydra/`), `checkpoints/` (best and last), `metrics.json`,
`predictions.csv` (every spot, its split, truth and prediction) and `figures/`.
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
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from xpression.evaluation.figures import plot_section_maps, plot_training_curves
from xpression.evaluation.metrics import regression_metrics

__all__ = ["EpochSeed", "evaluate_spots", "train"]

log = logging.getLogger(__name__)

_TABLE_METRICS = ("pearson_mean", "spearman_mean", "r2_mean", "mse_mean", "jsd_mean", "dominant_acc")


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
    out_dir = Path(cfg.paths.output_dir) if "paths" in cfg else Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The resolved config (paths expanded) lets infer.py rebuild the run without Hydra's runtime.
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved_config(cfg)))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, target=cfg.target, sampler=cfg.sampler, split=cfg.split, seed=cfg.seed, _recursive_=False)
    voxel_um = datamodule.voxel_size_um
    spot_radius_vox = 27.5 / float(voxel_um[2])
    # Backbone, loss-vs-kind and patch-size checks that need no target values run first ...
    model_factory = instantiate(cfg.model)
    spec = datamodule.target_spec  # reads the ST sections (no CT voxels)
    # ... then the model proper, whose construction also checks init_from against the targets.
    model = model_factory(target_spec=spec, patch_shape=datamodule.patch_shape_vox, spot_radius_vox=spot_radius_vox)

    callbacks = [EpochSeed(cfg.seed), *_instantiate_all(cfg.get("callbacks"))]
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

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
    metrics = evaluate_spots(predictions, spec.names, spec.kind)
    metrics.update(
        target_names=list(spec.names),
        target_kind=spec.kind,
        best_checkpoint=str(best) if best else None,
        epochs=int(trainer.current_epoch),
        train_seconds=round(train_seconds, 2),
        parameters=int(sum(p.numel() for p in getattr(model, "net", model).parameters())),  # not the EMA copy
        patch_shape_vox=list(datamodule.patch_shape_vox),
        voxel_size_um=list(voxel_um),
    )
    if cfg.get("off_plane") is not None:
        from xpression.evaluation.generalisation import evaluate_off_plane

        metrics["off_plane"] = evaluate_off_plane(model, datamodule, OmegaConf.to_container(cfg.off_plane, resolve=True))
    predictions.to_csv(out_dir / "predictions.csv", index=False)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    if cfg.get("figures", True):
        _write_figures(predictions, spec.names, out_dir, loggers)
    Console(width=None if sys.stdout.isatty() else 160).print(metrics_table(metrics))
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


def evaluate_spots(predictions: pd.DataFrame, names: list[str], kind: str) -> dict[str, Any]:
    """Metrics per split, plus what predicting the training mean would score on each split.

    The top-level `pearson_mean` is the test split's (held-out spots), falling back to val.
    """
    true_cols, pred_cols = [f"true/{n}" for n in names], [f"pred/{n}" for n in names]
    splits = predictions["split"].to_numpy()
    train_mean = predictions.loc[splits == "train", true_cols].to_numpy().mean(axis=0)
    result: dict[str, Any] = {"splits": {}, "baseline_train_mean": {}}
    for split in ("train", "val", "test"):
        rows = splits == split
        if not rows.any():
            continue
        y = predictions.loc[rows, true_cols].to_numpy()
        p = predictions.loc[rows, pred_cols].to_numpy()
        result["splits"][split] = {"n_spots": int(rows.sum()), **regression_metrics(p, y, names, kind=kind)}
        baseline = np.broadcast_to(train_mean, y.shape)
        result["baseline_train_mean"][split] = {"n_spots": int(rows.sum()), **regression_metrics(baseline, y, names, kind=kind, undefined=0.0)}
    held_out = "test" if "test" in result["splits"] else "val"
    result["held_out_split"] = held_out
    result["pearson_mean"] = result["splits"].get(held_out, {}).get("pearson_mean", float("nan"))
    return result


def metrics_table(metrics: dict[str, Any]) -> Table:
    """A small table: one column per split, one row per headline metric, with the mean baseline."""
    table = Table(title="held-out accuracy (best checkpoint)", title_justify="left")
    splits = list(metrics["splits"])
    table.add_column("metric")
    for split in splits:
        table.add_column(f"{split} (n={metrics['splits'][split]['n_spots']})", justify="right")
    held_out = metrics["held_out_split"]
    table.add_column(f"train-mean baseline, {held_out}", justify="right")
    for key in _TABLE_METRICS:
        if key not in metrics["splits"][splits[0]]:
            continue
        row = [f"{metrics['splits'][s][key]:.3f}" for s in splits]
        row.append(f"{metrics['baseline_train_mean'][held_out][key]:.3f}")
        table.add_row(key, *row)
    return table


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def _best_checkpoint(trainer: pl.Trainer) -> Path | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return Path(path) if path and Path(path).exists() else None


def _write_figures(predictions: pd.DataFrame, names: list[str], out_dir: Path, loggers: list[Any]) -> None:
    figures = out_dir / "figures"
    plot_section_maps(predictions, list(names), figures)
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

"""Lightning callbacks of the training loop that are not about the model itself, and the
training side of the post-fit evaluation: ``SpotPredictions`` (every spot predicted with the best
weights, the run record written) and the ``PostFit`` steps the evaluation layer adds
(``xpression.evaluation.callbacks``), all attached by config (``conf/evaluation/``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichModelSummary, RichProgressBar

__all__ = ["Throughput", "ModelSummary", "ProgressBar", "PostFit", "SpotPredictions", "best_checkpoint", "fit_without_lightning", "predict_spots"]


class Throughput(pl.Callback):
    """Logs ``train/patches_per_s`` every epoch: the epoch's training patches over the time from
    the epoch's start to the end of its last training step (data loading, transfer and
    augmentation included; validation and checkpointing not). On a GPU the device is
    synchronised once per epoch, after the last step, so the figure counts finished work.
    ``rates`` keeps the figure of every epoch."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self._t0 = 0.0
        self._patches = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0, self._patches = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        self._patches += int(image.shape[0])
        if batch_idx + 1 == trainer.num_training_batches and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t1 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._patches:
            return
        rate = self._patches / max(self._t1 - self._t0, 1e-9)
        self.rates.append(rate)
        pl_module.log("train/patches_per_s", rate, on_step=False, on_epoch=True)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar with the training loss read every ``loss_every_n_steps``
    steps (and at each epoch's first and last step) rather than after every step: reading a
    value from the GPU waits for the step to finish, and the host then cannot prepare the next
    step meanwhile. By default on the steps the loggers write (``trainer.log_every_n_steps``),
    which read the values anyway. The loss shown is that of the step it was read at
    (``train/loss``)."""

    def __init__(self, loss_every_n_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if loss_every_n_steps is not None and int(loss_every_n_steps) < 1:
            raise ValueError(f"loss_every_n_steps must be >= 1 (or null: the trainer's log_every_n_steps), got {loss_every_n_steps}")
        self.loss_every_n_steps = None if loss_every_n_steps is None else int(loss_every_n_steps)
        self._loss: float | None = None
        self._read_loss = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss = None
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = self.loss_every_n_steps or max(int(trainer.log_every_n_steps), 1)
        self._read_loss = self._loss is None or (batch_idx + 1) % every == 0 or batch_idx + 1 == trainer.num_training_batches
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._read_loss = False

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if self._read_loss:
            loss = trainer.callback_metrics.get("train/loss_step")
            self._loss = float(loss) if loss is not None else None
        if self._loss is not None and trainer.training:
            metrics["train/loss"] = f"{self._loss:.4g}"
        return metrics


class ModelSummary(RichModelSummary):
    """Lightning's rich layer table without the FLOPs column and total when they are unknown (a
    module without an ``example_input_array`` counts none, and a "Total FLOPs: 0" misleads)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int, **kwargs: Any) -> None:
        if total_flops:
            RichModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                       total_training_modes, total_flops, **kwargs)
            return
        from rich import get_console
        from rich.table import Table
        from pytorch_lightning.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name or " ", justify="right" if name in ("Params", "In sizes", "Out sizes") else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(f"[bold]Trainable params[/]: {get_human_readable_count(trainable_parameters).strip()}, "
                      f"[bold]non-trainable[/]: {get_human_readable_count(frozen).strip()}, "
                      f"[bold]size[/]: {get_formatted_model_size(model_size)} MB")


# -- after fit ------------------------------------------------------------------------------------


def predict_spots(model: Any, datamodule: Any, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Predict every spot of the data module (all splits) with ``model`` in eval mode, on
    ``device`` (float32).

    Returns:
        The spot table with ``true/<target>`` and ``pred/<target>`` columns added.
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


class PostFit(pl.Callback):
    """A step of the post-fit evaluation (``conf/evaluation/``): it runs once training has ended
    (``on_fit_end``), on global rank 0 and the trainer's device, in the order of the config.

    ``check`` runs before training (``train`` calls it once the data module knows its patch), so
    settings that cannot work fail before any epoch."""

    def check(self, datamodule: Any) -> None:
        """Raise a clear error when this step cannot run on ``datamodule``'s patch and cohort."""


class SpotPredictions(PostFit):
    """Predicts every spot with the best weights after fit, then writes the run record.

    ``on_fit_end``: the weights of the best checkpoint (when a checkpoint callback monitored a
    metric; else the final weights) predict every spot of every split on the trainer's device
    (``predictions``). Later post-fit steps add to ``metrics`` and ``predictions``; at
    ``teardown`` (after all of them) ``out_dir`` gets ``predictions.csv``, ``metrics.json`` and,
    when the run was scored on the off-plane probe, ``probe_points.csv`` (every probe point, its
    truth, the model's and the baselines' answers):
    the steps' metrics, then the run's targets, checkpoint, epochs, training seconds (setup to
    the end of the last epoch), parameter count, patch shape (voxels) and voxel size (um).
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.model: Any = None
        self.datamodule: Any = None
        self.predictions: pd.DataFrame | None = None
        self.probe_points: pd.DataFrame | None = None  # the off-plane probe's points, if scored
        self.metrics: dict[str, Any] = {}
        self.best_checkpoint: Path | None = None
        self.weights = "final weights"  # or "best checkpoint (<monitored metric>)"
        self.fit_seconds = 0.0
        self._started = time.perf_counter()

    @staticmethod
    def of(trainer: pl.Trainer) -> "SpotPredictions":
        """The trainer's ``SpotPredictions``: the post-fit state the other steps read and add to."""
        for callback in trainer.callbacks:
            if isinstance(callback, SpotPredictions):
                return callback
        raise RuntimeError("the post-fit evaluation needs xpression.callbacks.SpotPredictions before its other "
                           "steps (conf/evaluation/default.yaml)")

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._started = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.fit_seconds = time.perf_counter() - self._started

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        self.datamodule = self.datamodule or trainer.datamodule
        model = pl_module
        self.best_checkpoint = best_checkpoint(trainer)
        if self.best_checkpoint is not None and isinstance(pl_module, pl.LightningModule):
            model = type(pl_module).load_from_checkpoint(self.best_checkpoint, map_location="cpu", weights_only=False)
            monitor = getattr(trainer.checkpoint_callback, "monitor", None)
            self.weights = f"best checkpoint ({monitor})" if monitor else "final weights"
        device = trainer.strategy.root_device if isinstance(model, pl.LightningModule) else torch.device("cpu")
        self.model = model
        self.predictions = predict_spots(model, self.datamodule, device)

    def teardown(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self.predictions is None:
            return
        dm, spec = self.datamodule, self.datamodule.target_spec
        self.metrics.update(
            target_names=list(spec.names),
            target_kind=spec.kind,
            target_colors=list(spec.colors) if spec.colors is not None else None,
            target_reference=spec.reference,  # fitted programs -> the known programs they were matched to
            target_reference_r=spec.reference_r,
            best_checkpoint=str(self.best_checkpoint) if self.best_checkpoint else None,
            epochs=int(trainer.current_epoch),
            train_seconds=round(self.fit_seconds, 2),
            parameters=int(sum(p.numel() for p in getattr(self.model, "net", self.model).parameters())),  # not the EMA copy
            patch_shape_vox=list(dm.patch_shape_vox),
            voxel_size_um=list(dm.voxel_size_um),
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.predictions.to_csv(self.out_dir / "predictions.csv", index=False)
        if self.probe_points is not None and len(self.probe_points):
            self.probe_points.to_csv(self.out_dir / "probe_points.csv", index=False)
        (self.out_dir / "metrics.json").write_text(json.dumps(self.metrics, indent=2, allow_nan=True))


def best_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The checkpoint the trainer's (first) checkpoint callback kept as best, if it exists."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return Path(path) if path and Path(path).exists() else None


def fit_without_lightning(trainer: pl.Trainer, model: Any, datamodule: Any) -> None:
    """Fit a closed-form model (``model.fit(datamodule)``, e.g. the ridge baseline) with the
    post-fit steps of ``trainer`` run around it as Lightning runs them around ``trainer.fit``."""
    steps = [c for c in trainer.callbacks if isinstance(c, PostFit)]
    for step in steps:
        step.setup(trainer, model, "fit")
    for step in steps:
        if isinstance(step, SpotPredictions):
            step.datamodule = datamodule
    model.fit(datamodule)
    for hook in ("on_train_end", "on_fit_end"):
        for step in steps:
            getattr(step, hook)(trainer, model)
    for step in steps:
        step.teardown(trainer, model, "fit")

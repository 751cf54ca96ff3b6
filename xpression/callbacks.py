"""Lightning callbacks of the training loop that are not about the model itself."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ["Throughput"]


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

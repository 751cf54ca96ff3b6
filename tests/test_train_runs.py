"""Training behaviour that needs several epochs: resume, overfit, and beating the mean."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch

from tests.test_train import _cfg
from xpression.training import train

FAST = [
    "callbacks=default",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "~callbacks.early_stopping",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "figures=false",
]


def _train(tmp_path: Path, manifest: Path, *overrides: str) -> dict:
    torch.set_num_threads(1)
    train(_cfg(tmp_path, manifest, [*FAST, *overrides]))
    return json.loads((tmp_path / "metrics.json").read_text())


class Crash(pl.Callback):
    """Kills a run at the start of epoch `epoch`, as a cluster pre-emption would."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise SystemExit("simulated crash")


def test_resumed_run_ends_like_an_uninterrupted_one(tiny_cohort, tmp_path):
    """Killed at the start of epoch 2, restarted in the same folder from last.ckpt: same end as one go."""
    whole = _train(tmp_path / "whole", tiny_cohort, "trainer.max_epochs=3")
    with pytest.raises(SystemExit, match="simulated crash"):
        _train(tmp_path / "run", tiny_cohort, "trainer.max_epochs=3",
               "+callbacks.crash._target_=tests.test_train_runs.Crash", "+callbacks.crash.epoch=2")
    assert not (tmp_path / "run" / "metrics.json").exists()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    resumed = _train(tmp_path / "run", tiny_cohort, "trainer.max_epochs=3", f"ckpt_path={last}")
    assert resumed["epochs"] == whole["epochs"] == 3
    for split in whole["splits"]:
        for key, value in whole["splits"][split].items():
            # n/a (NaN) where a program hardly varies in a volume's held-out spots: NaN in both runs
            assert resumed["splits"][split][key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), (split, key)


def test_overfit_preset_drives_training_loss_near_zero(tiny_cohort, tmp_path):
    torch.set_num_threads(1)
    train(_cfg(tmp_path, tiny_cohort, ["debug=overfit", "trainer.max_epochs=120"]))
    log = pd.read_csv(next(tmp_path.glob("csv/**/metrics.csv")))
    losses = log["train/loss_epoch"].dropna().to_numpy()
    assert losses[0] > 0.05
    assert losses[-5:].mean() < 0.1 * losses[0]


def test_default_model_beats_the_training_mean_on_held_out_spots(default_cohort, tmp_path):
    """The `make run` configuration, on a shorter budget, on spatially held-out spots."""
    metrics = _train(
        tmp_path, default_cohort, "data=phantom_default", f"data.manifest={default_cohort}",
        "trainer.max_epochs=12", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1.0",
    )
    held_out = metrics["held_out_split"]
    assert held_out == "test" and metrics["splits"]["test"]["n_spots"] > 30
    model, baseline = metrics["splits"][held_out], metrics["baseline_train_mean"][held_out]
    assert model["mse_mean"] < 0.8 * baseline["mse_mean"]
    assert model["pearson_mean"] > 0.3

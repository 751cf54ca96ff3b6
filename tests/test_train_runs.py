"""Training behaviour that needs several epochs: overfit, and beating the mean (resume: test_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
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


def test_overfit_preset_drives_training_loss_near_zero(tiny_cohort, tmp_path):
    torch.set_num_threads(1)
    train(_cfg(tmp_path, tiny_cohort, ["debug=overfit", "trainer.max_epochs=120"]))
    log = pd.read_csv(next(tmp_path.glob("csv/**/metrics.csv")))
    losses = log["train/loss_epoch"].dropna().to_numpy()
    assert losses[0] > 0.05
    assert losses[-5:].mean() < 0.1 * losses[0]


def test_the_small_cnn_beats_the_training_mean_on_held_out_spots(default_cohort, tmp_path):
    """The tests' network (cnn3d) on `make run`'s cohort, on a short budget, on spatially held-out spots."""
    metrics = _train(
        tmp_path, default_cohort, "data=phantom_default", f"data.manifest={default_cohort}",
        "trainer.max_epochs=12", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1.0",
    )
    held_out = metrics["held_out_split"]
    assert held_out == "test" and metrics["splits"]["test"]["n_spots"] > 30
    model, baseline = metrics["splits"][held_out], metrics["baseline_train_mean"][held_out]
    assert model["mse_mean"] < 0.8 * baseline["mse_mean"]
    assert model["pearson_mean"] > 0.3


def test_the_default_forest_beats_the_no_ct_baselines_on_held_out_spots(default_cohort, tmp_path):
    """`make run`'s model (train.py's default, model=forest) on its cohort's spatially held-out
    test spots: above 2D extrusion and kNN (r) and the training mean (squared error)."""
    metrics = _train(tmp_path, default_cohort, "model=forest", "data=phantom_default", f"data.manifest={default_cohort}")
    assert metrics["epochs"] == 0 and metrics["held_out_split"] == "test"
    rows = {(r["where"], r["predictor"]): r for r in metrics["scores"] if r["volume_id"] == "infected_0"}
    model = rows[("test spots", "model")]
    assert model["n"] > 30 and model["pearson_mean"] > 0.45
    for baseline in ("extrusion", "knn"):
        assert model["pearson_mean"] > rows[("test spots", baseline)]["pearson_mean"] + 0.2, baseline
    assert model["mse_mean"] < 0.8 * metrics["baseline_train_mean"]["test"]["mse_mean"]

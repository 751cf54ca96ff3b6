"""`train.py`: the composed configs train end to end and write an honest run folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from xpression.training import train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, manifest: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=["debug=smoke", f"data.manifest={manifest}", *overrides],
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path)
    return cfg


def _run(tmp_path: Path, manifest: Path, *overrides: str) -> dict:
    torch.set_num_threads(1)
    train(_cfg(tmp_path, manifest, list(overrides)))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["splits"]) >= {"train"}
    return metrics


def test_cli_smoke_writes_run_folder(tiny_cohort, tmp_path):
    """The command from the README, as a user types it."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "debug=smoke", f"data.manifest={tiny_cohort}", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = metrics["target_names"]
    assert len(names) >= 5 and metrics["target_kind"] == "composition"
    for split, values in metrics["splits"].items():
        assert values["n_spots"] > 0
        assert all(f"pearson/{n}" in values for n in names)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    import pandas as pd

    predictions = pd.read_csv(run_dir / "predictions.csv")
    scored = predictions[predictions["split"] != "excluded"]
    counts = scored["split"].value_counts().to_dict()
    assert counts == {split: values["n_spots"] for split, values in metrics["splits"].items()}
    assert predictions[[f"pred/{n}" for n in names]].notna().all().all()
    assert list((run_dir / "figures").glob("section_*.png"))
    assert "held-out accuracy" in proc.stdout


@pytest.mark.parametrize("model", ["cnn3d", "timm_resnet18", "timm_convnext_atto", "timm_vit_tiny", "unet"])
def test_each_backbone_trains(tiny_cohort, tmp_path, model):
    metrics = _run(tmp_path, tiny_cohort, f"model={model}", "figures=false")
    assert metrics["parameters"] > 0


@pytest.mark.parametrize("model,overrides", [
    pytest.param("resnet3d_valid", [], id="resnet3d_valid"),
    pytest.param("r2plus1d_18", ["model.backbone.widths=[8,8,16,16]"], id="r2plus1d_18"),  # narrow
    pytest.param("vit3d_tiny", ["model.backbone.embed_dim=48", "model.backbone.depth=2"], id="vit3d_tiny"),
])
def test_each_3d_backbone_trains(tiny_cohort, tmp_path, model, overrides):
    metrics = _run(tmp_path, tiny_cohort, f"model={model}", *overrides, "figures=false")
    assert metrics["parameters"] > 0
    for values in metrics["splits"].values():
        assert values["n_spots"] > 0 and 0.0 <= values["mse_mean"] < 1.0


@pytest.mark.parametrize("loss", ["kl", "mse", "huber", "pearson", "mix"])
def test_each_loss_trains(tiny_cohort, tmp_path, loss):
    metrics = _run(tmp_path, tiny_cohort, f"loss={loss}", "figures=false")
    for values in metrics["splits"].values():
        assert 0.0 <= values["mse_mean"] < 1.0


def test_poisson_loss_on_counts(tiny_cohort, tmp_path):
    metrics = _run(tmp_path, tiny_cohort, "loss=poisson", "target=genes", "target.n_top=8", "target.counts=true", "figures=false")
    assert metrics["target_kind"] == "counts" and len(metrics["target_names"]) == 8
    assert metrics["splits"]["train"]["mse_mean"] > 0


def test_ddp_sim_two_processes(tiny_cohort, tmp_path):
    metrics = _run(tmp_path, tiny_cohort, "trainer=ddp_sim", "figures=false")
    assert metrics["splits"]["train"]["n_spots"] > 0


def test_unknown_names_fail_before_training(tiny_cohort, tmp_path):
    from xpression.models import XPressionModule  # noqa: F401

    with pytest.raises(Exception, match="cnn3d"):
        _run(tmp_path, tiny_cohort, "model.backbone.name=nonexistent")
    assert not (tmp_path / "metrics.json").exists()


def test_kl_on_log_expression_is_refused(tiny_cohort, tmp_path):
    with pytest.raises(Exception, match="(?i)kl.*(composition|log_expression)|(composition|log_expression).*kl"):
        _run(tmp_path, tiny_cohort, "loss=kl", "target=genes")


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_other_loggers_work_offline(tiny_cohort, tmp_path, logger, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(tmp_path, tiny_cohort, f"logger={logger}", "figures=false")
    folder = "tensorboard" if logger == "tensorboard" else "wandb"
    written = [p for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert written, f"{logger} wrote nothing under {tmp_path / folder}"

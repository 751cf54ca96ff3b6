"""`train.py`: the composed configs train end to end and write an honest run folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from xpression.training import train

ROOT = Path(__file__).resolve().parents[1]


def _small_cnn(overrides: list[str]) -> list[str]:
    """The tests' network: the small single-view 3D CNN (dense sweeps, 64 features) unless an
    override names another; train.py's default is the forest (fitted, no epochs)."""
    return overrides if any(o.startswith(("model=", "experiment=")) for o in overrides) else ["model=cnn3d", *overrides]


def _cfg(tmp_path: Path, manifest: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=["debug=smoke", f"data.manifest={manifest}", *_small_cnn(overrides)],
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


def _check_composition_scores(run_dir: Path, metrics: dict) -> None:
    """Predictions are compositions (each row in [0, 1], summing to 1) and every split's
    mse_mean is, per volume, the mean over targets of the squared errors in predictions.csv,
    averaged over the volumes (never pooled across animals)."""
    import pandas as pd

    table = pd.read_csv(run_dir / "predictions.csv")
    names = metrics["target_names"]
    pred, true = table[[f"pred/{n}" for n in names]].to_numpy(), table[[f"true/{n}" for n in names]].to_numpy()
    assert (pred >= 0).all() and (pred <= 1).all()
    np.testing.assert_allclose(pred.sum(1), 1.0, atol=1e-4)
    for split, values in metrics["splits"].items():
        rows = (table["split"] == split).to_numpy()
        assert values["n_spots"] == rows.sum() > 0
        volumes = [(table["volume_id"] == vid).to_numpy() for vid in table.loc[rows, "volume_id"].unique()]
        per_volume = [((pred[rows & v] - true[rows & v]) ** 2).mean(0).mean() for v in volumes]
        assert values["n_volumes"] == len(per_volume)
        expected = float(np.mean(per_volume))
        assert values["mse_mean"] == pytest.approx(expected, rel=1e-4, abs=1e-7)


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
    pytest.param("multiscale_cnn3d", ["patch.context_um=[100,600,600]"], id="multiscale_cnn3d"),
])
def test_each_3d_backbone_trains(tiny_cohort, tmp_path, model, overrides):
    metrics = _run(tmp_path, tiny_cohort, f"model={model}", *overrides, "figures=false")
    assert metrics["parameters"] > 0
    _check_composition_scores(tmp_path, metrics)


@pytest.mark.parametrize("loss", ["kl", "mse", "huber", "pearson", "mix"])
def test_each_loss_trains(tiny_cohort, tmp_path, loss):
    metrics = _run(tmp_path, tiny_cohort, f"loss={loss}", "figures=false")
    _check_composition_scores(tmp_path, metrics)


def test_poisson_loss_on_counts(tiny_cohort, tmp_path):
    metrics = _run(tmp_path, tiny_cohort, "loss=poisson", "target=genes", "target.n_top=8", "target.counts=true", "figures=false")
    assert metrics["target_kind"] == "counts" and len(metrics["target_names"]) == 8
    assert metrics["splits"]["train"]["mse_mean"] > 0


def test_ddp_sim_two_processes(tiny_cohort, tmp_path):
    """Each rank validates half the spots; the epoch metrics gather both halves. The validation
    metric logged at the end of the (only) epoch is then the one of every validation spot with
    the final weights, as the post-fit evaluation computes it on rank 0 (up to the one spot the
    distributed sampler repeats to give both ranks 15 of the 29)."""
    import pandas as pd

    metrics = _run(tmp_path, tiny_cohort, "trainer=ddp_sim", "figures=false")
    _check_composition_scores(tmp_path, metrics)
    history = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    logged = history["val/pearson_mean"].dropna().iloc[-1]
    full = metrics["splits"]["val"]["pearson_mean"]
    print(f"logged {logged:.4f} post-fit {full:.4f}")
    assert logged == pytest.approx(full, abs=0.02)


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


def test_wandb_online_without_a_login_is_one_line_before_anything_is_read(tiny_cohort, tmp_path, monkeypatch):
    """WANDB_OFFLINE=false without a login would make wandb prompt at the terminal (or fail in a
    batch job): refused first; a key, a netrc entry (what `wandb login` writes) or offline pass."""
    from xpression.config import ConfigError, compose
    from xpression.training import check_wandb_login

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("WANDB_OFFLINE", "false")
    loggers = compose("train", ["logger=wandb"]).logger
    with pytest.raises(ConfigError, match=r"logger.wandb: WANDB_OFFLINE=false logs online, which needs a wandb login"):
        check_wandb_login(loggers)
    with pytest.raises(ConfigError, match="needs a wandb login"):  # train.py stops there, before the cohort is read
        _run(tmp_path / "run", tmp_path / "no" / "cohort.yaml", "logger=wandb")
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (home / ".netrc").chmod(0o600)
    check_wandb_login(loggers)
    (home / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    check_wandb_login(loggers)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_OFFLINE", "true")
    check_wandb_login(compose("train", ["logger=wandb"]).logger)

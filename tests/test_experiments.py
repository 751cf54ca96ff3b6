"""Every experiment config starts: a 2-job multirun of each with `debug=smoke` on the tiny cohort;
the Optuna sweep runs 2 trials and the submitit local launcher a 2-job multirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))

# Overrides that cut each experiment's sweep to 2 cheap jobs (its own axes, one seed).
TWO_JOBS = {
    "backbones": ['hydra.sweeper.params.model="cnn3d,timm_convnext_atto"', "hydra.sweeper.params.seed=0"],
    # a dotted sweep key is set through the dict (merged into the experiment's params)
    "context": ['hydra.sweeper.params={patch.size_um:"[6.4,205,205],[34,100,100]",seed:0}',
                "split.buffer_um=100"],
    "losses": ['hydra.sweeper.params.loss="kl,pearson"', "hydra.sweeper.params.seed=0"],
    "samplers": ["hydra.sweeper.params.sampler=jitter", "hydra.sweeper.params.seed=0"],
    "splits": ["hydra.sweeper.params.seed=0"],
    "labels": ["hydra.sweeper.params.seed=0"],
    "paper": ['hydra.sweeper.params.seed="0,1"', "data.batch_size=4"],
    "ridge": ['hydra.sweeper.params.seed="0,1"'],
}
FAST = ["debug=smoke", "figures=false", "off_plane.n_points=20", "data.sections=[mock_0_s0]"]


def _multirun(tmp_path: Path, *overrides: str) -> list[Path]:
    sweep = tmp_path / "multirun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, "train.py", "-m", f"hydra.sweep.dir={sweep}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return sorted(p.parent for p in sweep.rglob("metrics.json"))


def test_every_experiment_has_two_job_overrides():
    assert set(EXPERIMENTS) == set(TWO_JOBS), "add the new experiment to TWO_JOBS"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_starts(name, tiny_cohort, tmp_path):
    runs = _multirun(tmp_path, f"experiment={name}", f"data.manifest={tiny_cohort}", *FAST, *TWO_JOBS[name])
    assert len(runs) == 2
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert "off_plane" in metrics and metrics["off_plane"]["n_points"]
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        assert f"experiment={name}" in overrides


def test_optuna_two_trials(tiny_cohort, tmp_path):
    runs = _multirun(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                     f"data.manifest={tiny_cohort}", "debug=smoke", "figures=false")
    assert len(runs) == 2
    best = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert {"model.lr", "model.weight_decay", "model.backbone.widths", "patch.size_um"} <= set(best["best_params"])


def test_submitit_local_launcher(tiny_cohort, tmp_path):
    runs = _multirun(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                     f"data.manifest={tiny_cohort}", "debug=smoke", "figures=false", "seed=0,1")
    assert len(runs) == 2


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_optuna_forest_context_choices_hold_every_scale():
    """Every context view the forest study may draw serves every scale of model=forest on the
    benchmark's patch (57.6 x 205 x 205 um, 6.4 um voxels): no trial fails on a scale no view holds."""
    import re

    from omegaconf import OmegaConf

    from xpression.data.context import ContextView
    from xpression.models.filterbank import FilterBank

    study = OmegaConf.load(ROOT / "conf" / "hparams_search" / "optuna_forest.yaml")
    choices = re.findall(r'"(\[[^"]+\])"', study.hydra.sweeper.params["patch.context_um"])
    assert len(choices) >= 3
    sigmas = OmegaConf.load(ROOT / "conf" / "model" / "forest.yaml").sigmas_um
    voxel, patch_um = (6.4, 6.4, 6.4), (57.6, 205, 205)
    shape = (9, 33, 33)  # odd voxel counts nearest to the patch (the sampler's rule)
    for choice in choices:
        view = ContextView.of(yaml.safe_load(choice), patch_um, shape, voxel)
        bank = FilterBank(shape, [voxel, view.step_um], sigmas)  # raises ConfigError on a scale no view serves
        assert any(n.startswith("mean@204.8um") for n in bank.names), choice

"""Continuing an interrupted run: the same end as one go, its own config, nothing overwritten,
one continuous metrics history; checkpoints of another config refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import yaml
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tests.test_train_runs import FAST, _train
from xpression.resume import ResumeError, start_run

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = "trainer.max_epochs=3"


class Crash(pl.Callback):
    """Kills a run at the start of epoch `epoch`, as a cluster pre-emption would (not once the
    run continues from a checkpoint, so the resumed run keeps the same config)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch and trainer.ckpt_path is None:
            raise SystemExit("simulated crash")


CRASH = ["+callbacks.crash._target_=tests.test_resume.Crash", "+callbacks.crash.epoch=2"]


@pytest.fixture(scope="module")
def whole(tiny_cohort, tmp_path_factory) -> Path:
    """3 epochs in one go, the checkpoints written on the training thread (Lightning's default)."""
    run = tmp_path_factory.mktemp("whole")
    _train(run, tiny_cohort, EPOCHS, "trainer.plugins=[]")
    return run


@pytest.fixture(scope="module")
def crashed(tiny_cohort, tmp_path_factory) -> Path:
    """The same run killed at the start of epoch 2 (epochs 0 and 1 done, last.ckpt after epoch 1)."""
    run = tmp_path_factory.mktemp("crashed")
    with pytest.raises(SystemExit, match="simulated crash"):
        _train(run, tiny_cohort, EPOCHS, *CRASH)
    assert not (run / "metrics.json").exists() and (run / "checkpoints" / "last.ckpt").is_file()
    return run


def _copy(run: Path, where: Path) -> Path:
    """A copy of a run folder elsewhere (its config still names the original folder)."""
    shutil.copytree(run, where)
    return where


def _compose(*overrides: str):
    """A config as train.py composes it from the command line (Hydra's runtime set)."""
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=list(overrides))
    HydraConfig().set_config(cfg)
    return cfg


def _assert_same_metrics(resumed: dict, whole: dict) -> None:
    assert resumed["epochs"] == whole["epochs"] == 3
    for split in whole["splits"]:
        for key, value in whole["splits"][split].items():
            assert resumed["splits"][split][key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), (split, key)


def _assert_same_history(resumed_csv: Path, whole_csv: Path) -> None:
    a, b = pd.read_csv(resumed_csv), pd.read_csv(whole_csv)
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    assert sorted(a["epoch"].dropna().unique()) == [0.0, 1.0, 2.0]
    # patches/s is wall-clock time, the one column a replay cannot reproduce; it must be there in both
    timed = [c for c in a.columns if c.endswith("patches_per_s")]
    assert timed and a[timed].notna().sum().sum() == b[timed].notna().sum().sum() > 0
    a, b = a.drop(columns=timed), b.drop(columns=timed)
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_resumed_run_ends_like_an_uninterrupted_one(tiny_cohort, whole, crashed, tmp_path):
    """Restarted in its folder from last.ckpt (`ckpt_path=`): same end and same CSV as one go."""
    run = _copy(crashed, tmp_path / "run")
    config_before = (run / "config.yaml").read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _train(run, tiny_cohort, EPOCHS, *CRASH, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    # The copy's checkpoint callbacks follow it: Lightning restores their best score and paths.
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    assert Path(resumed["best_checkpoint"]) == run / "checkpoints" / "best.ckpt"
    _assert_same_metrics(resumed, json.loads((whole / "metrics.json").read_text()))
    _assert_same_history(run / "csv" / "metrics.csv", whole / "csv" / "metrics.csv")
    assert (run / "config.yaml").read_bytes() == config_before
    restart = (run / "config.resumed-1.yaml").read_text()
    assert restart.startswith("# restart 1 at ") and f"from {run / 'checkpoints' / 'last.ckpt'} (epoch 1, step 6)" in restart
    # The log as it was at the crash is kept.
    assert (run / "csv" / "metrics.before-resume-1.csv").read_bytes() == (crashed / "csv" / "metrics.csv").read_bytes()


def test_checkpoints_written_in_the_background_resume_exactly(tiny_cohort, whole, tmp_path):
    """The trainers write checkpoints on a background thread from a copy taken at the epoch's
    end: a run killed at the start of epoch 2 leaves a complete last.ckpt of epoch 1, and resumed
    from it the run ends as the uninterrupted one (written on the training thread) ends."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="simulated crash"):
        _train(run, tiny_cohort, EPOCHS, *CRASH)
    assert "pytorch_lightning.plugins.io.AsyncCheckpointIO" in (run / "config.yaml").read_text()
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1 and last["global_step"] == 6
    resumed = _train(run, tiny_cohort, EPOCHS, *CRASH, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    _assert_same_metrics(resumed, json.loads((whole / "metrics.json").read_text()))
    _assert_same_history(run / "csv" / "metrics.csv", whole / "csv" / "metrics.csv")
    ours, theirs = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
                    for r in (run, whole))
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-7) for k in ours)


def test_cli_resume_restores_the_run_and_keeps_its_history(whole, crashed, tmp_path):
    """`train.py resume=RUN` with nothing else: the run's own (tiny-cohort) config, not the
    default one; the folder was moved, its paths follow it; `figures` may change on resume."""
    run = _copy(crashed, tmp_path / "moved")
    config_before = (run / "config.yaml").read_bytes()
    # one thread, as the in-process runs it is compared with (sums over threads round differently)
    proc = subprocess.run([sys.executable, "train.py", f"resume={run}", "figures=true"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_metrics(json.loads((run / "metrics.json").read_text()), json.loads((whole / "metrics.json").read_text()))
    _assert_same_history(run / "csv" / "metrics.csv", whole / "csv" / "metrics.csv")
    assert (run / "figures" / "training_curves.png").is_file()
    assert (run / "config.yaml").read_bytes() == config_before and not (run / ".hydra").exists()
    restart = yaml.safe_load((run / "config.resumed-1.yaml").read_text())
    assert restart["resume"] == str(run) and restart["paths"]["output_dir"] == str(run) and restart["figures"] is True
    assert restart["callbacks"]["last_checkpoint"]["dirpath"] == str(run / "checkpoints")
    assert restart["data"] == yaml.safe_load(config_before)["data"]  # the tiny cohort, one of its sections
    assert (run / "train.log").is_file() and "Restoring states from the checkpoint" in (run / "train.log").read_text()
    # A second restart (training further: the run has finished) starts from the first one's config
    # and is numbered after it.
    cfg, start = start_run(_compose(f"resume={run}", "trainer.max_epochs=4"))
    assert start.restart == 2 and (start.epoch, cfg.figures) == (2, True)
    # Checkpoints went to the moved folder; the original run is untouched.
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2
    assert torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1


def test_resume_allows_only_the_listed_overrides(crashed):
    cfg, start = start_run(_compose(f"resume={crashed}", "trainer.max_epochs=5", "data.num_workers=0"))
    saved = yaml.safe_load((crashed / "config.yaml").read_text())
    assert cfg.trainer.max_epochs == 5 and cfg.data.num_workers == 0
    assert cfg.data.manifest == saved["data"]["manifest"] and cfg.data.sections == saved["data"]["sections"]
    assert start.checkpoint == crashed / "checkpoints" / "last.ckpt" and (start.epoch, start.global_step) == (1, 6)
    assert start.restart == 1 and start.changed == ()
    with pytest.raises(ResumeError, match=r"seed=3, data.batch_size=4 would change the run's config; a resumed run may "
                                          r"only change trainer.max_epochs, .* \(pass allow_config_change=true"):
        start_run(_compose(f"resume={crashed}", "seed=3", "data.batch_size=4"))
    with pytest.raises(ResumeError, match=r"keeps the run's config groups; `model=unet` would change what it learns"):
        start_run(_compose(f"resume={crashed}", "model=unet"))
    with pytest.raises(ResumeError, match="either resume=RUN .* or ckpt_path="):
        start_run(_compose(f"resume={crashed}", f"ckpt_path={crashed / 'checkpoints' / 'last.ckpt'}"))
    cfg, start = start_run(_compose(f"resume={crashed}", "seed=3", "allow_config_change=true"))
    assert cfg.seed == 3 and start.changed == ("seed",)
    assert not list(crashed.glob("config.resumed-*"))  # checks write nothing


def test_a_checkpoint_of_another_config_is_refused(crashed, tmp_path):
    # The README's former recipe: the default config (with the run's network) composed again, pointed at the run's checkpoint.
    last = crashed / "checkpoints" / "last.ckpt"
    cfg = _compose(f"ckpt_path={last}", "model=cnn3d", f"paths.data_dir={tmp_path / 'data'}")
    with open_dict(cfg):
        cfg.paths.output_dir = str(crashed)
    with pytest.raises(ResumeError, match=r"was written with another config: data.sections = None in the "
                                          r"checkpoint, \['infected_0_s0'\] now; .*train.py resume=RUN"):
        start_run(cfg)
    assert not (tmp_path / "data").exists()  # refused before the default cohort would be generated
    # A run folder whose config.yaml was edited no longer matches its checkpoints.
    run = _copy(crashed, tmp_path / "edited")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"]["batch_size"] = 4
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ResumeError, match=r"data.batch_size = 16 in the checkpoint, 4 now"):
        start_run(_compose(f"resume={run}"))
    # A fresh run may not train into a folder that holds one.
    fresh = _compose("debug=smoke")
    with open_dict(fresh):
        fresh.paths.output_dir = str(crashed)
    with pytest.raises(ResumeError, match=r"already holds a training run \(config.yaml\); continue it with `train.py resume="):
        start_run(fresh)
    # nor into a folder holding what a run writes, without its config.yaml (e.g. a user's copy of
    # another run's results): predictions.csv and metrics.json would be replaced
    results = tmp_path / "my_results"
    results.mkdir()
    (results / "predictions.csv").write_text("mine")
    (results / "metrics.json").write_text("{}")
    (results / "notes.txt").write_text("mine too")
    with open_dict(fresh):
        fresh.paths.output_dir = str(results)
    with pytest.raises(ResumeError, match=r"my_results already holds metrics.json, predictions.csv, which a training run "
                                          r"writes; train into a new folder \(nothing there is overwritten\)"):
        start_run(fresh)
    assert (results / "predictions.csv").read_text() == "mine"
    (results / "predictions.csv").unlink()
    (results / "metrics.json").unlink()
    assert start_run(fresh)[1].out_dir == results  # the user's own files alone are no run's outputs
    with pytest.raises(ResumeError, match="not a training run folder"):
        start_run(_compose(f"resume={run / 'csv'}"))
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ResumeError, match="no checkpoints/last.ckpt to continue from"):
        start_run(_compose(f"resume={run}"))


def test_a_checkpoint_recorded_before_a_key_existed_reads_it_as_its_old_value(tiny_cohort):
    """data.train_fraction came later: a checkpoint whose config lacks it trained on every
    training spot, so it matches 1.0 and differs from 0.5."""
    from omegaconf import OmegaConf

    from xpression.resume import ADDED_LATER, _differences

    cfg = _compose("debug=smoke", f"data.manifest={tiny_cohort}")
    recorded = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in cfg if k != "hydra"}  # as a checkpoint records it
    del recorded["data"]["train_fraction"]
    assert ADDED_LATER["data.train_fraction"](recorded) == 1.0 and cfg.data.train_fraction == 1.0
    assert _differences(recorded, cfg) == []
    cfg.data.train_fraction = 0.5
    assert _differences(recorded, cfg) == ["data.train_fraction"]


def test_a_checkpoint_recorded_before_context_edges_reads_fill_where_it_had_a_view(tiny_cohort):
    """sampler.context_edges came later: a multi-scale run recorded without it read fill past the
    faces (mirror now differs); a run without a view never read one (any value matches)."""
    from omegaconf import OmegaConf

    from xpression.resume import _differences

    def recorded_without_edges(cfg):
        rec = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
               for k in cfg if k != "hydra"}
        del rec["sampler"]["context_edges"], rec["data"]["sampler"]["context_edges"]
        return rec

    single = _compose("debug=smoke", "model=cnn3d", f"data.manifest={tiny_cohort}")
    assert single.sampler.context_um is None and single.sampler.context_edges == "mirror"
    assert _differences(recorded_without_edges(single), single) == []
    multi = _compose("debug=smoke", "model=multiscale_cnn3d", f"data.manifest={tiny_cohort}")
    assert multi.sampler.context_um is not None
    recorded = recorded_without_edges(multi)
    assert _differences(recorded, multi) == ["sampler.context_edges", "data.sampler.context_edges"]
    multi.patch.context_edges = "fill"
    assert _differences(recorded, multi) == []


@pytest.mark.parametrize("sent, status, said", [("SIGTERM", 143, "stopped by SIGTERM"), ("SIGINT", 1, "interrupted")])
def test_a_stopped_run_fails_and_says_how_to_continue(tiny_cohort, tmp_path, sent, status, said):
    """A scheduler's SIGTERM mid-run: Lightning ends the fit with status 0, which a batch scheduler
    records as a success; train.py exits 143 (128 + SIGTERM) with one line naming `resume=`. Ctrl-C
    (SIGINT) keeps Lightning's status 1 and gets the same line."""
    import signal
    import time

    run = tmp_path / "run"
    args = [sys.executable, "train.py", "data=phantom_tiny", f"data.manifest={tiny_cohort}", "model=cnn3d",
            "trainer.max_epochs=200", "~callbacks.early_stopping", "+trainer.limit_train_batches=3",
            "+trainer.limit_val_batches=2", "figures=false", "data.num_workers=0", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(getattr(signal, sent))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == status, err[-3000:]
    line = next(ln for ln in (out + err).splitlines() if f"training {said} after" in ln)
    assert f"continue it with `python train.py resume={run}`" in line
    assert f"training {said} after" in (run / "train.log").read_text()
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()


def test_resuming_a_finished_run_is_refused_unless_it_may_train_further(whole, tmp_path):
    """resume= of a run that reached trainer.max_epochs and was scored only scored it again under a
    new config.resumed-<n>.yaml; it now says how to train further, which still works."""
    run = _copy(whole, tmp_path / "finished")
    with pytest.raises(ResumeError, match=r"the run finished its 3 epochs \(trainer.max_epochs=3\) and was scored; to "
                                          r"train it further, raise trainer.max_epochs \(e.g. trainer.max_epochs=13\)"):
        start_run(_compose(f"resume={run}"))
    assert not list(run.glob("config.resumed-*.yaml"))
    cfg, start = start_run(_compose(f"resume={run}", "trainer.max_epochs=5"))
    assert cfg.trainer.max_epochs == 5 and start.epoch == 2

"""infer.py end to end on a small phantom, and its up-front errors."""

from __future__ import annotations


import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from tests._inference_models import infer_config, make_run, two_volume_cohort
from xpression.evaluation.maps import evaluate_inference
from xpression.inference.grid import GridError
from xpression.inference.pipeline import infer
from xpression.inference.predictor import InferenceError
from xpression.inference.writers import read_maps

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return two_volume_cohort(tmp_path_factory.mktemp("phantom") / "c")


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "r", cohort)


config = infer_config


def test_cohort_sweep_end_to_end(run, tmp_path):
    out = tmp_path / "o"
    cfg = config(run=str(run), output=str(out))
    summary = infer(cfg)
    assert set(summary["volumes"]) == {"mock_0", "infected_0"}
    maps, meta = read_maps(out / "mock_0" / "maps.ome.zarr")
    assert meta["complete"] and meta["grid"]["step_vox"] == [5, 4, 4] and meta["identity"]["checkpoint_sha256"]
    assert meta["run_config"]["data"]["manifest"] and "z: spacing 33.6 um -> 32 um" in meta["notes"][0]
    values = maps[:].astype(np.float32)
    assert np.isnan(values).any() and np.isfinite(values).any()
    for name in ("orthoviews.png", "proportions_by_depth.png"):
        assert (out / "mock_0" / "figures" / name).exists()
    assert (out / "mock_0" / "ct_preview.ome.zarr").exists()
    # both volumes are training volumes (sections: all): each scan's noise is its own training value
    scans = summary["scan_check"]
    assert set(scans["training"]) == {"mock_0", "infected_0"} and 0 < scans["training"]["mock_0"] < 0.5
    assert scans["volumes"]["mock_0"] == {"noise": scans["training"]["mock_0"], "ratio": 1.0, "flagged": False}
    assert pd.read_csv(out / "scan_check.csv").shape == (2, 4)
    assert not (out / "evaluation.csv").exists()  # scoring against the truth is the evaluation layer's
    evaluate_inference(cfg, summary)
    scores = pd.read_csv(out / "evaluation.csv")
    assert {"section plane", "plane"} <= set(scores["where"]) and set(scores["volume_id"]) == {"mock_0", "infected_0"}
    assert set(scores["predictor"]) == {"model"}  # the fake run has no predictions.csv: no baselines
    assert (out / "accuracy_vs_distance.png").exists() and (out / "mock_0" / "figures" / "truth_vs_prediction.png").exists()
    assert json.loads((out / "summary.json").read_text())["evaluation"]["rows"]
    # The reference mode on the same grid agrees (cnn3d with valid padding is dense-equivalent).
    out_p = tmp_path / "p"
    infer(config(run=str(run), output=str(out_p), mode="patch", volumes=["mock_0"], figures=False, evaluate=False,
                 ct_preview=False, bigtiff=False))
    patch, _ = read_maps(out_p / "mock_0" / "maps.ome.zarr")
    np.testing.assert_allclose(patch[:].astype(np.float32), values, atol=2e-3, equal_nan=True)


def test_scan_check_flags_a_noisier_scan(cohort, tmp_path, caplog):
    from types import SimpleNamespace

    from xpression.data.manifest import load_manifest
    from xpression.data.volume import open_volume
    from xpression.inference.pipeline import scan_check

    vol = load_manifest(cohort).volumes[0]
    ct = np.asarray(open_volume(vol.image, vol.voxel_size_um)[:, :, :], np.float64)
    loud = ct + np.random.default_rng(0).normal(0.0, 0.1 * float(np.ptp(ct)), ct.shape)
    jobs = [SimpleNamespace(volume_id="same", raw=ct), SimpleNamespace(volume_id="loud", raw=loud)]
    info = SimpleNamespace(manifest=cohort, trained_sections=[vol.sections[0].id])
    with caplog.at_level("WARNING"):
        checked = scan_check(config(run="x", output=str(tmp_path / "o")), info, jobs)
    assert set(checked["training"]) == {vol.id}
    assert checked["volumes"]["same"]["ratio"] == pytest.approx(1.0, abs=0.02) and not checked["volumes"]["same"]["flagged"]
    assert checked["volumes"]["loud"]["ratio"] > 1.5 and checked["volumes"]["loud"]["flagged"]
    assert "loud: scan noise" in caplog.text and "same:" not in caplog.text
    assert scan_check(config(run="x", output=str(tmp_path / "p"), scan_check=False), info, jobs) is None


def test_clear_errors_before_compute(run, cohort, tmp_path):
    # A checkpoint written before checkpoints carried their input spec needs its run folder: an
    # interrupted one (config but no metrics.json) still gets its voxel size from the config.
    old = make_run(tmp_path / "old", cohort, legacy=True)
    bare = tmp_path / "bare" / "checkpoints"
    bare.mkdir(parents=True)
    (bare / "best.ckpt").write_bytes((old / "checkpoints" / "best.ckpt").read_bytes())
    with pytest.raises(InferenceError, match=r"records no input spec .* lacks the run config \(config.yaml\), the model voxel size"):
        infer(config(run=str(bare / "best.ckpt"), output=str(tmp_path / "x")))
    vol = tmp_path / "v.npy"
    np.save(vol, np.zeros((20, 80, 80), np.uint8))
    with pytest.raises(InferenceError, match="resample=true"):
        infer(config(run=str(run), volume=str(vol), voxel_size_um=[3.2, 3.2, 3.2], output=str(tmp_path / "x")))
    with pytest.raises(GridError, match="finer than the model"):
        infer(config(run=str(run), output=str(tmp_path / "x"), spacing_um=[32, 12.8, 12.8]))
    other = make_run(tmp_path / "other", cohort, seed=1)
    out = tmp_path / "o"
    infer(config(run=str(run), output=str(out), volumes=["mock_0"], figures=False, evaluate=False, ct_preview=False))
    with pytest.raises(InferenceError, match=r"summary.json records maps of a different run \(.*run0/r\); choose another "):
        infer(config(run=str(other), output=str(out), volumes=["mock_0"]))
    kept = tmp_path / "kept"  # without the folder's summary and scores, the maps' own record refuses them too
    kept.mkdir()
    for name in ("summary.json", "scan_check.csv"):
        (out / name).rename(kept / name)
    with pytest.raises(InferenceError, match="maps.ome.zarr holds maps of a different run"):
        infer(config(run=str(other), output=str(out), volumes=["mock_0"]))
    for name in ("summary.json", "scan_check.csv"):
        (kept / name).rename(out / name)
    # the same run sweeping another volume into the folder keeps the first one listed
    summary = infer(config(run=str(run), output=str(out), volumes=["infected_0"], figures=False, evaluate=False,
                           ct_preview=False))
    assert list(summary["volumes"]) == ["mock_0", "infected_0"]
    assert json.loads((out / "summary.json").read_text())["volumes"].keys() == {"mock_0", "infected_0"}
    (out / "summary.json").write_text("my notes")  # a file infer.py did not write is not replaced
    with pytest.raises(InferenceError, match=r"summary.json is not a summary infer.py wrote \(JSONDecodeError"):
        infer(config(run=str(run), output=str(out), volumes=["mock_0"]))
    assert (out / "summary.json").read_text() == "my notes"
    mine = tmp_path / "mine"  # a user's folder with a file named as infer.py's scores, and no summary
    mine.mkdir()
    (mine / "evaluation.csv").write_text("my table")
    with pytest.raises(InferenceError, match=r"mine holds evaluation.csv but no summary.json of infer.py; choose another"):
        infer(config(run=str(run), output=str(mine), volumes=["mock_0"]))
    assert (mine / "evaluation.csv").read_text() == "my table" and sorted(p.name for p in mine.iterdir()) == ["evaluation.csv"]


def test_unwritable_output_fails_before_the_model_loads(run, tmp_path, monkeypatch):
    import xpression.inference.pipeline as pipeline
    from xpression.config import ConfigError

    def load_predictor(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(pipeline, "load_predictor", load_predictor)
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder should go")
    with pytest.raises(ConfigError, match=r"output: .*results/maps cannot be created: .*results is a file"):
        infer(config(run=str(run), output=str(blocker / "maps")))
    with pytest.raises(ConfigError, match=r"batch_size: must be null or a positive integer, got 0"):
        infer(config(run=str(run), output=str(tmp_path / "ok"), batch_size=0))
    assert blocker.read_text() == "a file where the output folder should go" and not (tmp_path / "ok").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_a_device_this_machine_lacks_is_one_line(run, tmp_path):
    """device=cuda on a CPU-only machine was torch's "Found no NVIDIA driver" traceback."""
    for device, said in (("cuda", "device=cuda: this machine has no usable CUDA GPU; use device=cpu (or auto)"),
                         ("cuda:1", "device=cuda:1: this machine has no usable CUDA GPU"),
                         ("gpu", "device=gpu: not a device")):
        with pytest.raises(InferenceError, match=re.escape(said)):
            infer(config(run=str(run), output=str(tmp_path / "o"), device=device, volumes=["mock_0"]))
    assert not (tmp_path / "o").exists()

"""train.py -> checkpoint -> infer.py as a user runs them (subprocesses, tiny phantom, a few steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from xpression.data.manifest import load_manifest
from xpression.inference.writers import read_maps
from xpression.phantom.writers import write_tiff

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_then_infer_a_cohort_and_a_tiff(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    proc = _run("train.py", "debug=smoke", "model=multiscale_cnn3d", f"data.manifest={tiny_cohort}", f"hydra.run.dir={run}",
                "figures=false", "trainer.max_epochs=2")
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "checkpoints" / "last.ckpt").is_file() and metrics["epochs"] == 2
    # the one-line summary: no checkpoint callback in debug=smoke, so no "best" claimed
    assert "trained 2 epochs; final weights (no best checkpoint); stopped: trainer.max_epochs=2 reached" in proc.stdout
    assert "held-out accuracy per volume (final weights;" in proc.stdout

    entry = next(v for v in load_manifest(tiny_cohort).volumes if v.id == "infected_0")
    out = tmp_path / "maps"
    proc = _run("infer.py", f"run={run}", f"output={out}", "progress=false", "figures=false", "ct_preview=false",
                f"volume={entry.image}", "volume_id=infected_0")
    assert proc.stdout.splitlines()[-1].startswith(f"maps of 1 volume(s) in {out}")
    assert "infected_0" in (out / "infer.log").read_text()  # the log is kept beside the maps
    maps, meta = read_maps(out / "infected_0" / "maps.ome.zarr")
    assert meta["targets"] == metrics["target_names"] and meta["complete"]
    values = maps[:].astype(np.float32)
    inside = np.isfinite(values).all(0)
    assert inside.sum() > 100
    np.testing.assert_allclose(values[:, inside].sum(0), 1.0, atol=5e-3)  # float16 compositions

    # The same volume exported as the phantom's TIFF sweeps with no voxel size given, to the same maps.
    tif = tmp_path / "infected_0.tif"
    write_tiff(tif, zarr.open_group(str(entry.image), mode="r")["0"], list(entry.voxel_size_um or ()))
    out_tif = tmp_path / "maps_tif"
    _run("infer.py", f"run={run}", f"output={out_tif}", "progress=false", "figures=false", "ct_preview=false",
         f"volume={tif}", "volume_id=infected_0")
    from_tif, meta_tif = read_maps(out_tif / "infected_0" / "maps.ome.zarr")
    assert meta_tif["grid"] == meta["grid"]
    # The tissue mask's edge may differ by a few grid points between the two files (the OME-Zarr
    # has a pyramid, the TIFF none); inside both masks the maps agree.
    a, b = from_tif[:].astype(np.float32), values
    both = np.isfinite(a).all(0) & inside
    assert both.sum() >= 0.97 * max(inside.sum(), np.isfinite(a).all(0).sum())
    np.testing.assert_allclose(a[:, both], b[:, both], atol=2e-3)


def test_forest_trains_without_epochs_and_sweeps_its_context_view(tiny_cohort, tmp_path):
    """model=forest: fitted once by train.py (scored like a network), its checkpoint swept by
    infer.py in patch mode with the patch and its context view."""
    run = tmp_path / "forest"
    proc = _run("train.py", "model=forest", "model.n_trees=20", f"data.manifest={tiny_cohort}", f"hydra.run.dir={run}",
                "figures=false", "data.num_workers=0", "data.persistent_workers=false")
    assert "closed-form fit (no epochs)" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["pearson_mean"])
    assert {r["predictor"] for r in metrics["scores"]} >= {"model", "ridge", "extrusion"}
    entry = next(v for v in load_manifest(tiny_cohort).volumes if v.id == "mock_0")
    out = tmp_path / "maps"
    _run("infer.py", f"run={run}", f"output={out}", "progress=false", "figures=false", "ct_preview=false",
         f"volume={entry.image}", "volume_id=mock_0")
    maps, meta = read_maps(out / "mock_0" / "maps.ome.zarr")
    values = maps[:].astype(np.float32)
    inside = np.isfinite(values).all(0)
    assert inside.sum() > 100 and meta["complete"]
    np.testing.assert_allclose(values[:, inside].sum(0), 1.0, atol=5e-3)
    assert values[:, inside].std(axis=1).max() > 0.01  # a map, not a constant

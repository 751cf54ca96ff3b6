"""benchmarks/gpu_check.sh --cpu-smoke: every stage of the GPU check runs (tiny, on the CPU),
delivers its figures, and imports nothing the GPU machine will not have."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Packages left out of the wheels carried to the GPU machine (README "GPU check").
NOT_ON_GPU = ["pytest", "_pytest", "wandb", "optuna", "sqlalchemy", "alembic", "tensorboard", "submitit",
              "jupyter", "jupyter_core", "jupyter_client", "notebook", "ipykernel", "nbconvert", "nbformat"]

BLOCKER = f'''
import sys
class _NotOnGpu:
    names = set({NOT_ON_GPU!r})
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"{{name}} is not installed on the GPU machine", name=name)
        return None
sys.meta_path.insert(0, _NotOnGpu())
'''


def test_gpu_check_runs_every_stage_on_the_cpu(tiny_cohort, tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PY=sys.executable, PYTHONPATH=str(block), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke", "--cohort", str(tiny_cohort),
                           "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in res["stages"].items()} == {
        k: "ok" for k in ("volume", "sweep", "train_cnn3d", "train_timm_resnet18_smoke", "loader", "post_fit")}, (out / "gpu_check.txt").read_text()[-4000:]
    assert res["volume"]["shape"] == [40, 160, 160]
    sweep = res["sweep"]
    assert sweep["e2e"]["timed"]["tiles"] == sweep["tiles_tissue"] > 1
    assert sweep["e2e"]["timed"]["mvox_s"] > 0 and sweep["bare"]["mvox_s"] > 0 and sweep["ratio_e2e_bare"] > 0
    assert sweep["max_abs_dense_minus_patch"] < 1e-4 and sweep["dense_patch_speedup"] > 1
    parts = sweep["read_parts"]  # the reading step by step
    assert parts["chunks"] > 0 and parts["mbytes"] > 0.1
    assert all(parts[k] > 0 for k in ("files_mvox_s", "decode_mvox_s", "pageable_mvox_s")) and parts["pinned_mvox_s"] is None
    for name in ("train_cnn3d", "train_timm_resnet18_smoke"):
        assert res[name]["bare_patches_s"] > 0 and res[name]["lightning"]["patches_s"] > 0
    fit = res["train_cnn3d"]["post_fit"]
    assert fit["spots"] > 100 and fit["off_plane_points"] > 0
    # the scoring's parts: the ridge's fit pass and the model on the probe's patches both ran, inside the whole
    assert 0 < fit["ridge_fit_seconds"] and 0 < fit["probe_model_seconds"]
    assert fit["ridge_fit_seconds"] + fit["probe_model_seconds"] < fit["off_plane_seconds"]
    assert res["train_cnn3d"]["torch_threads"] == 2
    assert res["train_cnn3d"]["outside_steps_10_epochs_with_startup"] > res["train_cnn3d"]["outside_steps_10_epochs"]
    lit = res["train_cnn3d"]["lightning"]  # the run's checkpoints were written every epoch, as in train.py
    assert lit["checkpoint_files"] == ["best.ckpt", "last.ckpt"] and lit["checkpoint_saves"] >= len(lit["epoch_seconds"])
    assert lit["checkpoint_plugins"] == ["AsyncCheckpointIO"] and lit["checkpoint_seconds"] > 0  # conf/trainer's background writes
    for name in ("train_cnn3d", "train_timm_resnet18_smoke"):  # a step's phases, synchronised
        assert all(res[name]["step_breakdown"][k] > 0 for k in ("fetch_ms", "augment_ms", "step_ms"))
    assert set(res["loader"]["loader_patches_s"]) == set(res["loader"]["loader_ms_per_batch"]) == {"0", "1"}
    assert all(res["loader"]["loader_ms_per_batch"][w]["wait_ms"] > 0 for w in ("0", "1"))
    post = res["post_fit"]
    assert post["probe_points"] > 0 and post["seconds"]["scoring after the fit, all of it"] > post["seconds"]["probe: patch reads"] > 0
    assert len(list(out.iterdir())) <= 8  # what comes back from the GPU machine is capped
    assert (out / "sweep_profile.txt").read_text().count("\n") > 5
    last = proc.stdout.strip().splitlines()[-30:]
    assert any(line.startswith("loader patches/s by workers") for line in last)
    assert any(line.startswith("train_cnn3d: checkpoints, training thread s | saves") for line in last)
    assert any(line.startswith("train_cnn3d: post-fit s: spots | ridge fit | probe model | probe rest") and
               line.endswith("(2 torch threads)") for line in last)
    reading = [line.split("  ")[-1].split(" | ") for line in last if line.startswith("reading steps, MVoxel/s")]
    assert len(reading) == 1 and all(float(v) > 0 for v in reading[0][:3]) and reading[0][3].startswith("- (")
    assert any(line.startswith("stage sweep") and "ok" in line for line in last)


def test_the_table_renders_the_stored_h200_results():
    """The summary of a GPU run stored before this code's figures existed: older keys are read,
    and figures the run did not have show as '-'."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    res = json.loads((REPO / "benchmarks/results/gpu_h200_2026-11-28/after_gpu_check.json").read_text())
    rows = dict(line.split("  ", 1) for line in gpu_check.table(res).splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["whole lung 2000x9000x9000, extrapolated"] == "8.0 min"
    assert rows["conv ways, ms (3d/depth[/depth+x/depth+x8]) -> chosen"].startswith("32x1: 0.5/0.3 ms -> depth; 64x32: 0.2/0.3 ms -> 3d")
    assert rows["reading steps, MVoxel/s: files | decoding | pageable | pinned"].startswith("- | - | - | -")

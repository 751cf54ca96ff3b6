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
        k: "ok" for k in ("volume", "sweep", "train_cnn3d", "loader", "train_timm_resnet18_smoke")}, (out / "gpu_check.txt").read_text()[-4000:]
    assert res["volume"]["shape"] == [40, 160, 160]
    sweep = res["sweep"]
    assert sweep["e2e"]["timed"]["tiles"] == sweep["tiles_tissue"] > 1
    assert sweep["e2e"]["timed"]["mvox_s"] > 0 and sweep["bare"]["mvox_s"] > 0 and sweep["ratio_e2e_bare"] > 0
    assert sweep["max_abs_dense_minus_patch"] < 1e-4 and sweep["dense_patch_speedup"] > 1
    for name in ("train_cnn3d", "train_timm_resnet18_smoke"):
        assert res[name]["bare_patches_s"] > 0 and res[name]["lightning"]["patches_s"] > 0
    assert res["train_cnn3d"]["post_fit"]["spots"] > 100 and res["train_cnn3d"]["post_fit"]["off_plane_points"] > 0
    assert set(res["loader"]["loader_patches_s"]) == {"0", "1"}
    assert len(list(out.iterdir())) <= 8  # what comes back from the GPU machine is capped
    assert (out / "sweep_profile.txt").read_text().count("\n") > 5
    last = proc.stdout.strip().splitlines()[-20:]
    assert any(line.startswith("loader patches/s by workers") for line in last)
    assert any(line.startswith("stage sweep") and "ok" in line for line in last)

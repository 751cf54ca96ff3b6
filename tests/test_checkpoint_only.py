"""train -> checkpoint -> infer.py: a run folder reduced to its checkpoint file sweeps exactly as
the whole folder does (the checkpoint carries its input spec and run config)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from xpression.config import compose as compose_config
from xpression.data.input_spec import INPUT_SPEC_KEY, InputSpec
from xpression.inference.pipeline import infer
from xpression.inference.writers import read_maps
from xpression.runfolder import RUN_CONFIG_KEY
from xpression.training import train

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["volumes=[mock_0]", "spacing_um=[32,32,32]", "tile_vox=[16,64,64]", "figures=false", "ct_preview=false",
         "evaluate=false", "progress=false"]


def _train(run_dir: Path, manifest: Path, *overrides: str) -> Path:
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["debug=smoke", f"data.manifest={manifest}", "figures=false", *overrides])
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = str(run_dir)
    torch.set_num_threads(1)
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


def _infer_cfg(run: Path, out: Path, *overrides: str):
    cfg = compose_config("infer", ["run=unset"])  # conf/infer.yaml and its groups, outside a Hydra app
    OmegaConf.set_struct(cfg, False)
    del cfg["paths"]
    cfg.merge_with_dotlist([f"run={run}", f"output={out}", *SWEEP, *overrides])
    return cfg


def _checkpoint_alone(ckpt: Path, where: Path) -> Path:
    where.mkdir(parents=True)
    alone = where / "model.ckpt"
    shutil.copy(ckpt, alone)
    assert [p.name for p in where.iterdir()] == ["model.ckpt"]
    return alone


@pytest.mark.parametrize("model", ["cnn3d", "ridge"])
def test_a_checkpoint_alone_sweeps_like_its_run_folder(tiny_cohort, tmp_path, model):
    ckpt = _train(tmp_path / "run", tiny_cohort, f"model={model}", "data.sections=[mock_0_s0]")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    spec = InputSpec.from_dict(state[INPUT_SPEC_KEY])
    assert state[RUN_CONFIG_KEY]["data"]["manifest"] == str(tiny_cohort)
    assert spec.voxel_size_um == (6.4, 6.4, 6.4) and spec.quantisation == "uint8" and spec.spot_radius_um == 27.5
    assert spec.model["family"] == model and spec.intensity.method == "robust"
    names = list(spec.targets["names"])
    assert len(names) == 6

    mode = ["mode=patch"] if model == "ridge" else []  # the ridge baseline has no dense mode
    infer(_infer_cfg(tmp_path / "run", tmp_path / "full", *mode))
    full, full_meta = read_maps(tmp_path / "full" / "mock_0" / "maps.ome.zarr")

    alone = _checkpoint_alone(ckpt, tmp_path / "bare")
    out = tmp_path / "from_ckpt"
    proc = subprocess.run([sys.executable, "infer.py", f"run={alone}", f"output={out}", *SWEEP, *mode],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    maps, meta = read_maps(out / "mock_0" / "maps.ome.zarr")
    assert meta["targets"] == names == full_meta["targets"]
    values, reference = maps[:].astype(np.float32), full[:].astype(np.float32)
    assert values.shape[0] == 6 and np.isfinite(values).sum() > 100
    np.testing.assert_array_equal(values, reference)
    assert meta["normalizer"] == full_meta["normalizer"]


def test_an_interrupted_legacy_run_still_checks_the_voxel_size(tiny_cohort, tmp_path):
    """A checkpoint without an input spec (written before checkpoints carried one) in a run
    folder without metrics.json (interrupted) takes the voxel size from the run config, so a
    volume of another voxel size is still refused."""
    from tests._inference_models import make_run
    from xpression.inference.predictor import InferenceError

    run = make_run(tmp_path / "old", tiny_cohort, legacy=True)
    (run / "metrics.json").unlink()
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.sampler.voxel_size_um = [6.4, 6.4, 6.4]
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    vol = tmp_path / "v.npy"
    np.save(vol, np.zeros((20, 80, 80), np.uint8))
    with pytest.raises(InferenceError, match=r"voxels of \[3.2, 3.2, 3.2\] um but the model was trained at \[6.4, 6.4, 6.4\]"):
        infer(_infer_cfg(run, tmp_path / "x", f"volume={vol}", "voxel_size_um=[3.2,3.2,3.2]"))
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"data": {"manifest": str(tiny_cohort)}})))
    with pytest.raises(InferenceError, match=r"lacks the model voxel size"):
        infer(_infer_cfg(run, tmp_path / "x", f"volume={vol}"))

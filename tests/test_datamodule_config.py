"""Every config in conf/{data,target,sampler,split} instantiates (the sampler with conf/patch/)."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from xpression.data.datamodule import XPressionDataModule
from xpression.data.targets import TargetSpec

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("group", ["target", "sampler", "split"])
def test_group_configs_instantiate(group):
    files = sorted((CONF / group).glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        cfg = OmegaConf.merge({"seed": 0, "patch": OmegaConf.load(CONF / "patch" / "default.yaml")}, {"x": OmegaConf.load(f)})
        obj = instantiate(cfg.x)
        assert type(obj).__module__.startswith("xpression.data."), f


@pytest.mark.parametrize("name", ["phantom_tiny", "phantom_default", "phantom_benchmark"])
def test_data_config_builds_module(name, tiny_cohort):
    root = OmegaConf.create({
        "seed": 3,
        "paths": {"data_dir": "/nonexistent"},
        "patch": OmegaConf.load(CONF / "patch" / "default.yaml"),
        "target": OmegaConf.load(CONF / "target" / "obsm.yaml"),
        "sampler": OmegaConf.load(CONF / "sampler" / "stratified.yaml"),
        "split": OmegaConf.load(CONF / "split" / "spatial_blocks.yaml"),
        "data": OmegaConf.load(CONF / "data" / f"{name}.yaml"),
    })
    # `${phantom:DIR,PRESET}`: the cohort in DIR, generated on first use (not here: overridden below).
    manifest = OmegaConf.to_container(root.data, resolve=False)["manifest"]
    assert manifest.startswith("${phantom:") and f"/{name}," in manifest
    # As train.py does it: group configs passed in, not instantiated recursively.
    dm = instantiate(root.data, manifest=str(tiny_cohort), target=root.target, sampler=root.sampler, split=root.split, _recursive_=False)
    assert isinstance(dm, XPressionDataModule) and dm.seed == 3 and dm.sampler.cap == 4
    assert dm.patch_shape_vox == (5, 33, 33)
    assert dm.target_spec == TargetSpec(["alveolar", "airway", "vascular", "infected", "immune", "remodelling"], "composition")

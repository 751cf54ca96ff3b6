"""Self-supervised pretraining (`python -m xpression.pretrain`): tissue patches through the one
patch path, block masks, the reconstruction loss falling, and the encoder checkpoint loading into
the supervised module with `init_from` (or refusing another backbone in one line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from xpression.config import compose
from xpression.data.geometry import Plane
from xpression.data.input_spec import IntensitySpec
from xpression.data.manifest import load_manifest
from xpression.data.mask import tissue_mask
from xpression.data.patches import read_patches
from xpression.data.tissue_patches import tissue_patches
from xpression.data.volume import open_volume
from xpression.models import XPressionModule
from xpression.models.masked import InitFromError, MaskedReconstruction, block_mask
from xpression.models.targets import TargetSpec
from xpression.pretrain import pretrain
from xpression.pretrain.loop import mean_fill_loss

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PATCH = (9, 33, 33)  # the levers' 57.6 x 205 x 205 um patch at the phantom's 6.4 um voxels
SPEC = TargetSpec(names=["alveolar", "airway", "vascular"], kind="composition")


def _backbone(model: str) -> dict:
    """The backbone of a conf/model preset, as train.py and the pretraining compose it."""
    return OmegaConf.to_container(compose("train", [f"model={model}"]).model.backbone, resolve=True)  # type: ignore[return-value]


def _volume_and_mask(manifest: Path, vid: str = "infected_0"):
    entry = load_manifest(manifest).volume(vid)
    volume = open_volume(entry.image, entry.voxel_size_um)
    return volume, tissue_mask(volume)


def test_tissue_patches_are_patch_path_reads_inside_the_mask(tiny_cohort):
    volume, mask = _volume_and_mask(tiny_cohort)
    transform = IntensitySpec().transform_for(volume)
    patches, points = tissue_patches(volume, mask, 40, PATCH, volume.voxel_size_um, transform, "uint8",
                                     np.random.default_rng(0), n_planes=5)
    assert patches.shape == (40, *PATCH) and patches.dtype == np.uint8 and points.shape == (40, 3)
    assert mask.contains(points).all()
    assert len(np.unique(points[:, 0])) > 1  # several planes
    for i in (0, 17, 39):  # each is what the patch path reads at its point
        again = read_patches(volume, Plane.axial(points[i, 0]), points[i, None, [2, 1]], PATCH,
                             volume.voxel_size_um, transform, "uint8")[0]
        np.testing.assert_array_equal(patches[i], np.rint(again * 255).astype(np.uint8))
    assert patches.std() > 5  # real CT texture, not a constant


def test_block_mask_blanks_whole_blocks_at_the_ratio():
    g = torch.Generator().manual_seed(0)
    mask = block_mask(200, PATCH, (3, 8, 8), 0.5, g)
    assert mask.shape == (200, 1, *PATCH) and mask.dtype == torch.bool
    per_patch = mask.float().mean((1, 2, 3, 4))
    assert (per_patch > 0).all() and (per_patch < 1).all()
    assert 0.4 < float(per_patch.mean()) < 0.6
    # constant over each 3 x 8 x 8 block
    blocks = mask[:, 0, :9, :32, :32].reshape(200, 3, 3, 4, 8, 4, 8)
    assert (blocks.all((2, 4, 6)) | ~blocks.any((2, 4, 6))).all()


@pytest.mark.parametrize("model", ["cnn3d", "resnet3d_valid"])
def test_reconstruction_loss_falls_on_a_fixed_batch(tiny_cohort, model):
    volume, mask = _volume_and_mask(tiny_cohort)
    patches, _ = tissue_patches(volume, mask, 8, PATCH, volume.voxel_size_um, IntensitySpec().transform_for(volume),
                                "float16", np.random.default_rng(1), n_planes=4)
    x = torch.from_numpy(patches.astype(np.float32))[:, None]
    blanked = block_mask(len(x), PATCH, (3, 8, 8), 0.5, torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    net = MaskedReconstruction({**_backbone(model), **({"dropout": 0.0} if model == "cnn3d" else {})}, PATCH)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        loss = net.loss(x, blanked)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # it starts near filling each blanked voxel with its patch's visible mean, and falls well below
    # that as the encoder's features come to describe the blanked structure
    assert losses[0] == pytest.approx(mean_fill_loss(x, blanked), rel=0.05)
    assert losses[-1] < 0.6 * losses[0], losses[::10]


def _pretrain_cfg(manifest: Path, out_dir: Path, *overrides: str):
    cfg = compose("pretrain", [f"data.manifest={manifest}", "patch.size_um=[57.6,205,205]", "pretrain.steps=4",
                               "pretrain.patches_per_volume=24", "pretrain.planes_per_volume=3", "pretrain.batch_size=4",
                               "pretrain.eval_every=2", "pretrain.eval_patches=8", "pretrain.progress=false", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def test_pretrained_resnet3d_valid_encoder_loads_with_init_from(tiny_cohort, tmp_path):
    summary = pretrain(_pretrain_cfg(tiny_cohort, tmp_path, "model=resnet3d_valid"))
    assert summary["patch_shape"] == list(PATCH) and summary["history"]["steps"] == 4
    assert summary["data"]["volumes"] == ["mock_0", "infected_0", "vaccinated_0"]
    saved = torch.load(tmp_path / "encoder.ckpt", weights_only=False)["state_dict"]
    module = XPressionModule(_backbone("resnet3d_valid"), SPEC, PATCH, init_from=str(tmp_path / "encoder.ckpt"))
    own = module.net.backbone.state_dict()
    assert set(own) == {k[len("backbone."):] for k in saved}
    for k, v in own.items():
        assert torch.equal(v, saved[f"backbone.{k}"]), k
    assert module.hparams.init_from_source == str(tmp_path / "encoder.ckpt")


@pytest.mark.slow
def test_pretrain_cli_writes_an_encoder_that_init_from_loads(tiny_cohort, tmp_path):
    """The command a user types, a cnn3d encoder, then the supervised module starts from it;
    another backbone or patch is refused in one line, and a second run never overwrites it."""
    run_dir = tmp_path / "pre"
    args = [sys.executable, "-m", "xpression.pretrain", f"data.manifest={tiny_cohort}", "patch.size_um=[57.6,205,205]",
            "pretrain.steps=6", "pretrain.patches_per_volume=32", "pretrain.planes_per_volume=4", "pretrain.batch_size=8",
            "pretrain.eval_every=3", "pretrain.eval_patches=16", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "encoder.ckpt"
    history = (run_dir / "pretrain_history.csv").read_text().splitlines()
    assert history[0].startswith("step,train_loss,held_out_loss") and len(history) == 1 + 3  # steps 0, 3, 6
    summary = json.loads((run_dir / "pretrain.json").read_text())
    assert summary["history"]["first_loss"] > 0 and np.isfinite(summary["history"]["last_loss"])

    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    module = XPressionModule(_backbone("cnn3d"), SPEC, PATCH, init_from=str(ckpt))
    for k, v in module.net.backbone.state_dict().items():
        assert torch.equal(v, saved[f"backbone.{k}"]), k
    fresh = XPressionModule(_backbone("cnn3d"), SPEC, PATCH)
    assert not torch.equal(fresh.net.backbone.trunk[0].weight, module.net.backbone.trunk[0].weight)

    for backbone, patch in ((_backbone("resnet3d_valid"), PATCH), (_backbone("cnn3d"), (5, 33, 33))):
        with pytest.raises(InitFromError, match="does not fit this run's backbone") as err:
            XPressionModule(backbone, SPEC, patch, init_from=str(ckpt))
        assert "\n" not in str(err.value)

    before = ckpt.read_bytes()
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and ckpt.read_bytes() == before
    assert again.stderr.strip().splitlines()[-1].startswith("error: invalid config: pretrain.out:")


def test_every_bad_pretraining_setting_is_listed_before_anything_runs(tmp_path):
    """Each out-of-range value by its key (a zero-step run, a negative batch and an empty mask
    block used to run, or end in a traceback), before the cohort is opened or a file written."""
    from xpression.config import ConfigError

    cfg = compose("pretrain", [f"data.manifest={tmp_path / 'missing.yaml'}", "pretrain.steps=0", "pretrain.batch_size=-1",
                               "pretrain.mask_block_um=[0,51.2,51.2]", "pretrain.mask_ratio=1.0", "pretrain.max_minutes=0",
                               "pretrain.dropout=1.5", "patch.size_um=[57.6,0,205]"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        pretrain(cfg)
    assert set(err.value.problems) == {
        "pretrain.steps: must be a positive integer, got 0",
        "pretrain.batch_size: must be a positive integer, got -1",
        "pretrain.mask_block_um: must be 3 positive numbers [z, y, x] in um, got [0, 51.2, 51.2]",
        "pretrain.mask_ratio: must be a fraction in (0, 1), got 1.0",
        "pretrain.max_minutes: must be null or a positive number, got 0",
        "pretrain.dropout: must be null or a number in [0, 1), got 1.5",
        "patch.size_um: must be 3 positive numbers [depth, height, width] in um, got [57.6, 0, 205]",
    }
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model", ["forest", "ridge"])
def test_a_fitted_model_has_no_backbone_to_pretrain(tmp_path, model):
    """model=forest (train.py's default) was an omegaconf traceback."""
    from xpression.config import ConfigError

    cfg = compose("pretrain", [f"data.manifest={tmp_path / 'missing.yaml'}", f"model={model}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        pretrain(cfg)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("model: ") and err.value.problems[0].endswith(
        "has no network backbone to pretrain (a fitted model such as forest or ridge); choose a network, e.g. model=cnn3d")
    assert list(tmp_path.iterdir()) == []

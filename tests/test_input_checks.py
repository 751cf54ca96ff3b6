"""Bad inputs are refused up front with one message naming the file or key and the cause."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
import yaml

from tests.test_train import _cfg
from xpression.config import ConfigError, check_output_writable
from xpression.data.geometry import DataError, PatchGeometry
from xpression.data.manifest import ManifestError, load_manifest
from xpression.data.mask import tissue_mask
from xpression.data.sections import read_adata
from xpression.data.splits import check_split_counts
from xpression.data.targets import ObsmTarget
from xpression.data.volume import VolumeError, open_volume
from xpression.training import train

ROOT = Path(__file__).resolve().parents[1]


# -- files ------------------------------------------------------------------------------------

def test_float_ct_with_nan_is_refused_naming_the_file_and_count(tmp_path):
    rng = np.random.default_rng(0)
    ct = rng.normal(100.0, 5.0, (12, 64, 64)).astype(np.float32)
    ct[:, 16:48, 16:48] += rng.normal(0.0, 40.0, (12, 32, 32)).astype(np.float32)  # textured "tissue"
    ct[:, :4, :] = np.nan  # 4 rows of 64 per slice outside the reconstruction
    path = tmp_path / "ct_nan.npy"
    np.save(path, ct)
    volume = open_volume(path, 6.4)
    with pytest.raises(VolumeError, match=r"ct_nan\.npy: 256 NaN voxel\(s\) among the 4,096 read"):
        volume[3]
    with pytest.raises(VolumeError, match=r"ct_nan\.npy: .*NaN voxel"):
        tissue_mask(volume, cache=False)  # the mask's first read, not a threshold deep inside scikit-image
    ct[:, :4, :] = np.inf
    np.save(path, ct)
    with pytest.raises(VolumeError, match=r"3,072 infinite voxel"):
        open_volume(path, 6.4)[0:12, 0:8, :]
    finite = np.nan_to_num(ct, posinf=100.0)
    np.save(path, finite)
    np.testing.assert_array_equal(open_volume(path, 6.4)[:, :, :], finite)


def _adata(path: Path, spatial: np.ndarray, **obsm: np.ndarray) -> Path:
    n = len(spatial)
    adata = ad.AnnData(sp.csr_matrix(np.ones((n, 3), np.float32)))
    adata.obs_names = [f"AAAC-{i}" for i in range(n)]
    adata.var_names = ["g0", "g1", "g2"]
    adata.obsm["spatial"] = spatial
    for key, value in obsm.items():
        adata.obsm[key] = value
    adata.write_h5ad(path)
    return path


def test_spatial_with_one_column_is_refused(tmp_path):
    path = _adata(tmp_path / "one_column.h5ad", np.arange(40, dtype=float)[:, None])
    with pytest.raises(DataError, match=r"one_column\.h5ad: obsm\['spatial'\] has shape \(40, 1\); expected \(n_spots, 2\)"):
        read_adata(path)
    good = read_adata(_adata(tmp_path / "two_columns.h5ad", np.arange(80, dtype=float).reshape(40, 2)))
    assert good.n_obs == 40


def _targets(values: np.ndarray) -> dict:
    a = ad.AnnData(sp.csr_matrix(np.ones((len(values), 2), np.float32)))
    a.obs_names = [f"s{i}" for i in range(len(values))]
    a.obsm["scores"] = values
    return {"A1": a}


def test_compositions_that_do_not_sum_to_one_are_refused():
    rng = np.random.default_rng(1)
    comp = rng.dirichlet(np.ones(4), size=30)
    values, spec = ObsmTarget("scores", renormalize=False, kind="composition").compute(_targets(comp))
    np.testing.assert_allclose(values["A1"], comp, rtol=1e-6)
    assert spec.kind == "composition"
    scaled = comp.copy()
    scaled[:5] *= 2.0  # five spots sum to 2
    with pytest.raises(DataError, match=r"kind=composition with renormalize=false, but 5 of 30 spots' values do not sum to 1 "
                                        r"\(sums from 2 to 2\); set target\.renormalize=true"):
        ObsmTarget("scores", renormalize=False, kind="composition").compute(_targets(scaled))
    # The same values scaled by renormalize=true, or declared as log-expression, are used as they are.
    values, _ = ObsmTarget("scores", renormalize=True).compute(_targets(scaled))
    np.testing.assert_allclose(values["A1"], comp, rtol=1e-5)
    values, spec = ObsmTarget("scores", renormalize=False, kind="log_expression").compute(_targets(scaled))
    assert spec.kind == "log_expression" and values["A1"][0].sum() == pytest.approx(2.0, rel=1e-6)


def test_negative_scores_are_refused_not_clipped():
    rng = np.random.default_rng(2)
    signed = rng.normal(0.0, 1.0, size=(30, 3))  # e.g. z-scored module scores
    n_negative = int((signed < 0).any(axis=1).sum())
    with pytest.raises(DataError, match=rf"{n_negative} of 30 spots have negative values \(min {signed.min():.4g}\); "
                                        r"signed scores are not proportions"):
        ObsmTarget("scores", renormalize=True).compute(_targets(signed))
    with pytest.raises(DataError, match=r"kind=counts .*negative values"):
        ObsmTarget("scores", renormalize=False, kind="counts").compute(_targets(signed))
    # Round-off below 1e-6 of the largest value is clipped to 0, not refused.
    comp = rng.dirichlet(np.ones(3), size=30)
    comp[0, 0] = -1e-9
    values, _ = ObsmTarget("scores", renormalize=True).compute(_targets(comp))
    assert values["A1"][0, 0] == 0.0 and values["A1"].sum(axis=1) == pytest.approx(np.ones(30), abs=1e-6)


def test_manifest_accepts_every_tiff_suffix_the_reader_opens(tmp_path):
    stack = np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16)
    tifffile.imwrite(tmp_path / "ct.btf", stack, bigtiff=True)
    manifest = tmp_path / "cohort.yaml"
    manifest.write_text(yaml.safe_dump({"volumes": [{"id": "v", "image": "ct.btf", "voxel_size_um": [2.0, 2.0, 2.0]}]}))
    cohort = load_manifest(manifest)
    entry = cohort.volume("v")
    np.testing.assert_array_equal(open_volume(entry.image, entry.voxel_size_um)[:, :, :], stack)


def test_patch_geometry_refuses_non_positive_sizes():
    with pytest.raises(ValueError, match=r"patch size must be 3 positive numbers .* got \[-34.0, 205.0, 205.0\]"):
        PatchGeometry((-34.0, 205.0, 205.0))
    assert PatchGeometry((6.4, 205.0, 205.0)).shape_vox((6.4, 6.4, 6.4)) == (1, 33, 33)


# -- splits -----------------------------------------------------------------------------------

def test_split_counts_check():
    from xpression.data.splits import SpatialBlocksSplit, StratifiedRandomSplit

    labels = np.array(["train"] * 50 + ["excluded"] * 3)
    with pytest.raises(DataError, match=r"SpatialBlocksSplit split leaves no val and no test spots \(train 50, val 0, "
                                        r"test 0, excluded 3\); .*lower split\.block_um"):
        check_split_counts(labels, SpatialBlocksSplit(block_um=5000.0))
    labels = np.array(["train"] * 50 + ["val"] * 10)
    # A test fraction of 0 asks for no test split; otherwise an empty one is an error.
    assert check_split_counts(labels, StratifiedRandomSplit(fractions=(0.85, 0.15, 0.0)))["test"] == 0
    with pytest.raises(DataError, match="leaves no test spots"):
        check_split_counts(labels, StratifiedRandomSplit())


def test_few_training_spots_are_warned_about(caplog):
    """6 training spots (three forests on one small section, one split) trained without a word."""
    import logging

    from xpression.data.splits import SpatialBlocksSplit

    with caplog.at_level(logging.WARNING, logger="xpression.data.splits"):
        check_split_counts(np.array(["train"] * 6 + ["val"] * 40 + ["test"] * 30 + ["excluded"] * 100), SpatialBlocksSplit())
    assert [r.getMessage()[:80] for r in caplog.records] == [
        "the SpatialBlocksSplit split leaves 6 training spots (train 6, val 40, test 30, excluded 100): a"[:80]]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xpression.data.splits"):
        check_split_counts(np.array(["train"] * 30 + ["val"] * 10 + ["test"] * 10), SpatialBlocksSplit())
    assert not caplog.records


def test_a_split_without_validation_spots_fails_before_training(tiny_cohort, tmp_path):
    """One section in one 100 mm block: every spot trains. Refused before any epoch or file."""
    cfg = _cfg(tmp_path, tiny_cohort, ["split.block_um=100000", "data.sections=[infected_0_s0]", "figures=false"])
    with pytest.raises(DataError, match=r"leaves no val and no test spots \(train \d+, val 0, test 0"):
        train(cfg)
    assert list(tmp_path.iterdir()) == []  # no config, checkpoints, logs or metrics


# -- config values ----------------------------------------------------------------------------

def test_config_values_are_checked_before_any_file_is_read(tmp_path):
    """Every bad value is listed with its key; the manifest (which does not exist) is never opened."""
    cfg = _cfg(tmp_path, tmp_path / "missing" / "cohort.yaml", [
        "sampler.patch_size_um=[-34,205,205]", "data.batch_size=0", "model.lr=-1e-3", "trainer.max_epochs=0",
        "split.fractions=[0.7,0.3]", "data.max_drop_fraction=1.5", "data.train_fraction=0",
    ])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    problems = err.value.problems
    expected = {
        "sampler.patch_size_um: must be 3 positive numbers [depth, height, width] in um, got [-34, 205, 205]",
        "data.batch_size: must be a positive integer, got 0",
        "model.lr: must be a positive number, got -0.001",
        "trainer.max_epochs: must be a positive integer (or -1: no limit), got 0",
        "split.fractions: must be 3 numbers >= 0 (train, val, test), got [0.7, 0.3]",
        "data.max_drop_fraction: must be a number in [0, 1], got 1.5",
        "data.train_fraction: must be a number in (0, 1], got 0",
        "trainer.min_epochs (1) is larger than trainer.max_epochs (0)",
    }
    assert set(problems) == expected
    assert not (tmp_path / "config.yaml").exists()


def test_split_fractions_are_shares_that_sum_to_one(tmp_path):
    """[0.9, 0.9, 0.1] or [2, 1, 1] were taken as weights and normalised: one line now, before any
    file is read; shares that sum to 1 pass the check (the manifest is then read)."""
    missing = tmp_path / "missing" / "cohort.yaml"
    for bad, total in (("[0.9,0.9,0.1]", "1.9"), ("[2,1,1]", "4")):
        for split in ("spatial_blocks", "stratified_random"):
            with pytest.raises(ConfigError) as err:
                train(_cfg(tmp_path, missing, [f"split={split}", f"split.fractions={bad}"]))
            assert err.value.problems == [f"split.fractions: the train, val and test shares must sum to 1, got "
                                          f"{[float(x) if '.' in bad else int(x) for x in bad[1:-1].split(',')]!r} (sum {total})"]
    with pytest.raises(ManifestError):
        train(_cfg(tmp_path, missing, ["split.fractions=[0.6,0.2,0.2]"]))
    assert list(tmp_path.iterdir()) == []


def test_no_epoch_limit_needs_a_schedule_that_ends(tmp_path):
    """trainer.max_epochs=-1 (Lightning's "no limit") with the cosine schedule has no horizon: one
    line before any file is read; with a step limit, or without a schedule, it is accepted."""
    missing = tmp_path / "missing" / "cohort.yaml"
    with pytest.raises(ConfigError) as err:
        train(_cfg(tmp_path, missing, ["model=cnn3d", "trainer.max_epochs=-1"]))
    assert err.value.problems == [
        "trainer.max_epochs=-1 (no limit) leaves the cosine learning-rate schedule without an end: "
        "set model.scheduler=none, a trainer.max_epochs, or +trainer.max_steps=N"]
    assert list(tmp_path.iterdir()) == []
    for fix in (["model.scheduler=none"], ["+trainer.max_steps=100"]):
        with pytest.raises(ManifestError):  # past the config check: the manifest is read
            train(_cfg(tmp_path, missing, ["model=cnn3d", "trainer.max_epochs=-1", *fix]))


def test_forest_settings_are_checked_before_any_file_is_read(tmp_path):
    """model=forest's values are listed with their keys like every other; the manifest (which does
    not exist) is never opened."""
    cfg = _cfg(tmp_path, tmp_path / "missing" / "cohort.yaml", [
        "model=forest", "model.n_trees=0", "model.max_features=1.5", "model.sigmas_um=[6.4,-1]",
        "model.bright_threshold=2", "model.distance_below=[0.1,1.5]", "model.distance_cap_um=0",
        "model.share_above=[-0.1]"])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert set(err.value.problems) == {
        "model.n_trees: must be a positive integer, got 0",
        "model.max_features: must be a number in (0, 1], got 1.5",
        "model.sigmas_um: must be a list of positive scales in um, got [6.4, -1]",
        "model.bright_threshold: must be a number in [0, 1], got 2",
        "model.distance_below: must be a list of numbers in [0, 1], got [0.1, 1.5]",
        "model.distance_cap_um: must be a positive number, got 0",
        "model.share_above: must be a list of numbers in [0, 1], got [-0.1]",
    }
    assert not (tmp_path / "config.yaml").exists()


def test_a_bad_patch_is_reported_not_its_context_view_traceback(tmp_path):
    """The multi-scale preset computes patch.context_um from patch.size_um: a bad size is listed
    with the key the user set, the view that cannot be computed from it next, and no traceback;
    a bad data.seed (the split's) is listed like seed."""
    cfg = _cfg(tmp_path, tmp_path / "missing" / "cohort.yaml", ["model=multiscale_cnn3d", "patch.size_um=[34,abc,205]",
                                                                 "data.seed=-1"])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert set(err.value.problems) == {
        "data.seed: must be an integer >= 0, got -1",
        "patch.size_um: must be a list of numbers, got [34, 'abc', 205]",
        "patch.context_um: cannot be computed from the keys it follows (could not convert string to float: 'abc')"}
    assert not (tmp_path / "config.yaml").exists()

def test_your_own_cohort_names_its_manifest(tmp_path):
    """data=cohort (README "Your own data") keeps the default cohort's loader settings, trains on
    every section, and without data.manifest fails in one line before anything is read."""
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra

    from xpression.config import check_train_config

    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        default = compose(config_name="train")
        own = compose(config_name="train", overrides=["data=cohort"])
        with pytest.raises(ConfigError) as err:
            check_train_config(own)
        assert err.value.problems == ["data.manifest: must be the path of a cohort manifest, e.g. "
                                      "data.manifest=my/cohort.yaml, got None"]
        given = compose(config_name="train", overrides=["data=cohort", "data.manifest=my/cohort.yaml"])
        check_train_config(given)
    assert given.data.manifest == "my/cohort.yaml" and given.data.sections is None
    assert given.data.batch_size == default.data.batch_size and given.data.augment == default.data.augment


def test_every_shipped_config_passes_the_checks(tmp_path):
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra

    from xpression.config import check_infer_config, check_train_config

    options = {p.parent.name: p.stem for p in (ROOT / "conf").glob("*/*.yaml")}
    assert len(options) >= 10
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        for group in ("data", "debug", "model", "model/backbone", "patch", "sampler", "split", "target", "loss", "trainer",
                      "callbacks", "logger", "evaluation"):
            for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
                if not path.stem.startswith("_"):  # a base config, not an option
                    # a backbone swaps the single-view model's network (the default one is multi-scale)
                    pin = ["model=cnn3d"] if group == "model/backbone" else []
                    pin += ["data.manifest=my/cohort.yaml"] if (group, path.stem) == ("data", "cohort") else []
                    check_train_config(compose(config_name="train", overrides=[*pin, f"{group}={path.stem}"]))
        for path in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
            check_train_config(compose(config_name="train", overrides=[f"experiment={path.stem}"]))
        check_train_config(compose(config_name="train", overrides=["+off_plane=probe"]))
        for path in sorted((ROOT / "conf" / "infer").glob("*/*.yaml")):
            check_infer_config(compose(config_name="infer", overrides=["run=somewhere", f"infer/{path.parent.name}={path.stem}"]))


def test_schemas_reject_unknown_keys_and_wrong_types():
    """A misspelt key (in a file or a `+key=` override) and a value of the wrong type each fail
    with one line naming the key, before anything is read."""
    from xpression.config import check_infer_config, check_train_config, compose

    with pytest.raises(ConfigError) as err:
        check_train_config(compose("train", ["+figuers=false", "+patch.size=[34,205,205]", "figures=maybe",
                                             "+callbacks.early_stopping.patiense=2"]))
    problems = err.value.problems
    assert any(p.startswith("figuers: unknown key (known: ") and "figures" in p for p in problems)  # the known keys listed
    assert any(p.startswith("patch.size: unknown key (known: context_edges, context_um, size_um, voxel_size_um)") for p in problems)
    assert "figures: must be true or false, got 'maybe'" in problems
    assert any(p.startswith("callbacks.early_stopping.patiense: unknown key for pytorch_lightning.callbacks.EarlyStopping")
               for p in problems)
    assert len(problems) == 4 and all("\n" not in p for p in problems)
    with pytest.raises(ConfigError) as err:
        check_infer_config(compose("infer", ["run=r", "+spacing=[1,2,3]", "mask.feature=3", "batch_size=many"]))
    assert sorted(err.value.problems) == sorted([
        "batch_size: must be an integer or null, got 'many'", "mask.feature: must be a string, got 3",
        f"spacing: unknown key (known: {', '.join(sorted(k for k in __import__('xpression.config', fromlist=['x']).InferConfig.__dataclass_fields__ if k != 'hydra'))})",
    ])


def test_sampler_patch_spelling_sets_the_patch_group():
    """`sampler.patch_size_um=...` (the spelling before conf/patch/) still sets the patch: the
    sampler cuts it and the recorded patch group says the same."""
    from omegaconf import OmegaConf

    from xpression.config import compose, sync_patch

    cfg = compose("train", ["model=multiscale_cnn3d", "sampler.patch_size_um=[57.6,205,205]", "sampler.voxel_size_um=3.2"])
    sync_patch(cfg)
    # the multi-scale model's context view follows the patch: 3 times it along each axis
    assert OmegaConf.to_container(cfg.patch, resolve=True) == {"size_um": [57.6, 205, 205], "voxel_size_um": 3.2,
                                                              "context_um": [57.6 * 3, 615.0, 615.0], "context_edges": "mirror"}
    assert list(cfg.sampler.patch_size_um) == [57.6, 205, 205]
    cfg = compose("train", ["patch.size_um=[6.4,100,100]", "sampler=stratified"])
    sync_patch(cfg)
    assert list(cfg.sampler.patch_size_um) == [6.4, 100, 100] and cfg.sampler.voxel_size_um is None


def test_output_folder_checked(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"output: .*a_file/maps cannot be created: .*a_file is a file"):
        check_output_writable(blocker / "maps")
    with pytest.raises(ConfigError, match=r"output: .*a_file is a file, not a folder"):
        check_output_writable(blocker)
    check_output_writable(tmp_path / "new" / "maps")
    assert not (tmp_path / "new").exists()  # checked, not created


# -- the command line -------------------------------------------------------------------------

def test_cli_prints_the_cause_last_without_a_traceback(tiny_cohort, tmp_path):
    args = [sys.executable, "train.py", "debug=smoke", "model=multiscale_cnn3d", f"data.manifest={tiny_cohort}",
            f"hydra.run.dir={tmp_path / 'run'}", "data.batch_size=0", "model.lr=-0.01"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    last = proc.stderr.strip().splitlines()
    assert last[-3:] == ["error: invalid training config (2 problems):",
                         "  - data.batch_size: must be a positive integer, got 0",
                         "  - model.lr: must be a positive number, got -0.01"]
    # Hydra's switch for full stack traces still gives them.
    full = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError" in full.stderr

"""`experiment=paper` is the original recipe: augmentation only on the oversampled copies (each a
distinct non-identity symmetry), originals untouched, no intensity jitter, no clipping, /255
intensities, checkpoint and early stopping on the validation loss."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from xpression.data.augment import TRANSFORM_NAMES, transform_patch
from xpression.data.datamodule import image_to_float
from xpression.data.intensity import IntensityNormalizer
from xpression.data.sampling import PAPER_COPY_TRANSFORMS


@pytest.fixture(scope="module")
def paper_cfg(tiny_cohort):
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name="train", overrides=["experiment=paper", "data=phantom_tiny",
                                                      f"data.manifest={tiny_cohort}", "data.num_workers=0",
                                                      "data.persistent_workers=false", "data.pin_memory=false"])
    GlobalHydra.instance().clear()
    return cfg


def test_paper_config_is_the_published_recipe(paper_cfg):
    cfg = paper_cfg
    assert cfg.trainer.gradient_clip_val is None
    assert cfg.model.lr == 1e-4 and cfg.model.weight_decay == 0.0 and cfg.model.scheduler == "none"
    assert cfg.loss.name == "kl" and cfg.data.batch_size == 16
    assert list(cfg.split.fractions) == [0.8, 0.14, 0.06]
    assert cfg.callbacks.model_checkpoint.monitor == "val/loss" and cfg.callbacks.model_checkpoint.mode == "min"
    assert cfg.callbacks.early_stopping.monitor == "val/loss" and cfg.callbacks.early_stopping.patience == 5
    assert cfg.data.intensity == "divide255"
    aug = cfg.data.augment
    assert not aug.dihedral and not aug.z_flip and aug.intensity_scale == 0 and aug.intensity_shift == 0
    assert list(cfg.sampler.copy_transforms) == list(PAPER_COPY_TRANSFORMS) and cfg.sampler.cap == 4


def test_paper_copies_are_distinct_symmetries_and_originals_untouched(paper_cfg):
    cfg = paper_cfg
    dm = instantiate(cfg.data, target=cfg.target, sampler=cfg.sampler, split=cfg.split, seed=0, _recursive_=False)
    dm.setup("fit")
    assert all(n == IntensityNormalizer(0.0, 255.0) for n in dm.normalizers.values())
    sampler = dm.train_sampler()
    sampler.set_epoch(0)
    items = list(sampler)
    ds = dm._datasets["all"]
    by_row: dict[int, list[int]] = defaultdict(list)
    for row, du, dv, k in items:
        assert du == 0.0 and dv == 0.0
        by_row[row].append(k)
    copied = 0
    for row, ks in by_row.items():
        original, _ = ds.patch(row)
        assert ks.count(0) == 1  # the original, once
        copies = [TRANSFORM_NAMES[k] for k in ks if k]
        assert len(set(copies)) == len(copies) and set(copies) <= set(PAPER_COPY_TRANSFORMS)
        for name in copies:
            got, _ = ds.patch((row, 0.0, 0.0, TRANSFORM_NAMES.index(name)))
            np.testing.assert_array_equal(got, transform_patch(original, name))
            assert not np.array_equal(got, original)
        copied += len(copies)
    assert copied > 0 and len(items) == len(by_row) + copied
    # the batch a training step sees: originals exactly the cached patch, nothing random added
    batch = ds.__getitems__(items[:16])
    out = dm.apply_augment({k: v.clone() for k, v in batch.items()})
    assert torch.equal(out["image"], image_to_float(batch["image"]))
    for i, (row, _, _, k) in enumerate(items[:16]):
        expected = ds.patch(row)[0] if k == 0 else transform_patch(ds.patch(row)[0], TRANSFORM_NAMES[k])
        np.testing.assert_array_equal(batch["image"][i, 0].numpy(), expected)  # the cached uint8 levels
    # copies are fixed for the run, as if written to disk once: the next epoch reuses them
    sampler.set_epoch(1)
    again = defaultdict(list)
    for row, _, _, k in sampler:
        again[row].append(k)
    assert {r: sorted(v) for r, v in again.items()} == {r: sorted(v) for r, v in by_row.items()}

"""The features + ridge baseline and the off-plane probe evaluation on the tiny phantom."""

from __future__ import annotations

import numpy as np
import pytest

from xpression.models.ridge import RidgeBaseline, patch_features


@pytest.fixture(scope="module")
def datamodule(tiny_cohort):
    from xpression.data import XPressionDataModule

    dm = XPressionDataModule(tiny_cohort, sections=["mock_0_s0", "infected_0_s0"], seed=0)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def ridge(datamodule):
    spot_radius_vox = 27.5 / datamodule.voxel_size_um[2]
    return RidgeBaseline(datamodule.target_spec, datamodule.patch_shape_vox, spot_radius_vox).fit(datamodule)


def test_features_are_finite_for_2d_and_3d_patches():
    rng = np.random.default_rng(0)
    for depth in (1, 5):
        f = patch_features(rng.random((4, depth, 33, 33)), (6.4, 6.4, 6.4), (27.5, 50.0, 100.0), 0.3)
        assert f.shape[0] == 4 and np.isfinite(f).all()
    air = patch_features(np.zeros((1, 5, 33, 33)), (6.4, 6.4, 6.4), (27.5,), 0.3)
    assert air[0, 10] == 1.0 and air[0, 11] == 1.0  # all air in the 2D disc and the 3D cylinder


def test_ridge_beats_the_training_mean(ridge, datamodule):
    from xpression.training import evaluate_spots, predict_spots

    spec = datamodule.target_spec
    metrics = evaluate_spots(predict_spots(ridge, datamodule), spec.names, spec.kind)
    for split, values in metrics["splits"].items():
        assert np.isfinite(values["pearson_mean"]) and np.isfinite(values["mse_mean"])
    assert metrics["splits"]["train"]["mse_mean"] < metrics["baseline_train_mean"]["train"]["mse_mean"]
    assert metrics["splits"]["train"]["pearson_mean"] > 0.2
    assert sum(p.numel() for p in ridge.parameters()) > 0


def test_compositions_stay_compositions(ridge, datamodule):
    batch = datamodule.device_batch(next(iter(datamodule.predict_dataloader())))
    pred = ridge(batch["image"]).numpy()
    assert pred.shape == tuple(batch["target"].shape)
    assert (pred >= 0).all() and np.allclose(pred.sum(1), 1.0, atol=1e-5)


def test_off_plane_probe(ridge, datamodule):
    from xpression.evaluation.generalisation import evaluate_off_plane

    probe = {"n_points": 40, "distances_um": [50.0, 100.0, 5000.0], "other_planes": 2}
    first = evaluate_off_plane(ridge, datamodule, probe)
    assert {"50", "100", "other_volumes"} <= set(first)
    assert "5000" not in first  # outside the volume on both sides
    assert all(np.isfinite(first[k]) for k in ("50", "100", "other_volumes"))
    assert first["n_points"]["other_volumes"] > 10
    again = evaluate_off_plane(ridge, datamodule, probe)
    assert again["100"] == first["100"]  # fixed probe points


def test_unfitted_ridge_says_so(datamodule):
    model = RidgeBaseline(datamodule.target_spec, datamodule.patch_shape_vox)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict_patches(np.zeros((1, *datamodule.patch_shape_vox), np.float32))

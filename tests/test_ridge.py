"""The features + ridge baseline and the off-plane probe evaluation on the tiny phantom."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from xpression.data.patches import _LEVEL, dequantise
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


def _features_straightforward(patches, voxel_size_um, radii_um, air_threshold):
    """The features as first written (whole-batch numpy calls): what the fast path must equal."""
    from scipy import ndimage

    from xpression.models.ridge import _disc

    def stats(v):
        flat = v.reshape(len(v), -1)
        return [flat.mean(1), flat.std(1), *np.percentile(flat, [10, 50, 90], axis=1)]

    x = np.asarray(patches, np.float32)
    b, d, h, w = x.shape
    centre = x[:, d // 2]
    feats = stats(centre) + stats(x)
    air = x < air_threshold
    for r_um in radii_um:
        disc = _disc((h, w), min(float(r_um) / float(voxel_size_um[2]), min(h, w) / 2))
        feats += [air[:, d // 2][:, disc].mean(1), air[:, :, disc].reshape(b, -1).mean(1)]
    gy, gx = np.gradient(centre, axis=(1, 2))
    g2 = np.hypot(gy, gx)
    feats += [g2.reshape(b, -1).mean(1), g2.reshape(b, -1).std(1)]
    if d > 1:
        gz, gy3, gx3 = np.gradient(x, axis=(1, 2, 3))
        g3 = np.sqrt(gz**2 + gy3**2 + gx3**2)
        feats += [g3.reshape(b, -1).mean(1), np.abs(gz).reshape(b, -1).mean(1)]
    else:
        feats += [g2.reshape(b, -1).mean(1), np.zeros(b, np.float32)]
    feats.append(np.abs(np.stack([ndimage.laplace(c) for c in centre])).reshape(b, -1).mean(1))
    local_sd = np.stack([np.sqrt(np.clip(ndimage.uniform_filter(c * c, 5) - ndimage.uniform_filter(c, 5) ** 2, 0, None))
                         for c in centre])
    feats += [local_sd.reshape(b, -1).mean(1), local_sd.reshape(b, -1).std(1)]
    return np.column_stack(feats).astype(np.float64)


@pytest.mark.parametrize("threads", [1, 3])
def test_features_equal_the_straightforward_ones_bit_for_bit(threads):
    """Sorted-row percentiles, counted air fractions, in-place gradients, chunks and threads
    change no bit: quantised levels (as the loader's), float noise, one slice, a NaN."""
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 256, (7, 9, 41, 37)).astype(np.uint8)
    nan = rng.random((3, 4, 17, 19))
    nan[1, 2, 3, 4] = np.nan
    quantised = levels.astype(np.float32) * np.float32(1 / 255)
    off_grid = quantised.copy()
    off_grid[2, 3, 4, 5] += np.float32(1e-4)  # one value between levels: these rows are sorted
    two_levels = np.where(rng.random((4, 3, 21, 23)) < 0.93, 0, 255).astype(np.uint8)  # ties at every rank
    cases = [quantised, off_grid, dequantise(two_levels), rng.random((5, 6, 33, 31)), rng.random((3, 1, 33, 33)),
             np.zeros((1, 5, 33, 33)), nan]
    for x in cases:
        for b in sorted({1, 2, len(x)}):
            with np.errstate(invalid="ignore"):
                want = _features_straightforward(x[:b], (1.6, 1.6, 1.6), (27.5, 50.0, 100.0), 0.3)
                got = patch_features(x[:b], (1.6, 1.6, 1.6), (27.5, 50.0, 100.0), 0.3, threads=threads)
            np.testing.assert_array_equal(got, want)
    for stored in (levels, two_levels):  # the cache's uint8 levels, counted as they are: their float32 values' features
        want = _features_straightforward(dequantise(stored), (1.6, 1.6, 1.6), (27.5, 50.0, 100.0), 0.3)
        np.testing.assert_array_equal(patch_features(stored, (1.6, 1.6, 1.6), (27.5, 50.0, 100.0), 0.3, threads=threads), want)


def test_only_rows_of_cache_levels_are_counted_instead_of_sorted():
    from xpression.models.ridge import _level_codes

    levels = np.random.default_rng(2).integers(0, 256, (3, 500)).astype(np.uint8)
    np.testing.assert_array_equal(_level_codes(dequantise(levels)), levels)
    assert _level_codes(levels / 255.0) is None  # float64
    assert _level_codes((levels / 255.0).astype(np.float32)) is None  # other numbers than the cache's
    for bad in (np.nan, -_LEVEL, 1 + _LEVEL, 0.5):
        x = dequantise(levels)
        x[1, 7] = bad
        assert _level_codes(x) is None


def test_fit_predict_equals_fit_then_predict(ridge, datamodule):
    """One pass (features once per spot) gives the fit and the spot columns of two passes."""
    from xpression.callbacks import predict_spots
    from xpression.evaluation.run_scores import _fit_ridge_columns, _ridge_columns, fit_ridge_baseline

    table = predict_spots(ridge, datamodule)
    two = fit_ridge_baseline(datamodule)
    one, columns = _fit_ridge_columns(datamodule, table)
    assert one.alpha == two.alpha
    for key, value in two.state_dict().items():
        assert torch.equal(one.state_dict()[key], value), key
    pd.testing.assert_frame_equal(columns, _ridge_columns(two, datamodule, table))


def test_a_fitted_model_takes_the_cache_uint8_levels_as_their_float_intensities(ridge):
    levels = np.random.default_rng(5).integers(0, 256, (4, *ridge.patch_shape), dtype=np.uint8)
    want = ridge.predict_patches(dequantise(levels))
    np.testing.assert_array_equal(ridge.predict_patches(levels), want)
    assert np.ptp(want, axis=0).max() > 0


def test_ridge_beats_the_training_mean(ridge, datamodule):
    from xpression.callbacks import predict_spots
    from xpression.evaluation.scores import evaluate_spots

    spec = datamodule.target_spec
    metrics = evaluate_spots(predict_spots(ridge, datamodule), spec.names, spec.kind)
    for split, values in metrics["splits"].items():
        assert np.isfinite(values["pearson_mean"]) and np.isfinite(values["mse_mean"])
    assert metrics["splits"]["train"]["mse_mean"] < metrics["baseline_train_mean"]["train"]["mse_mean"]
    assert {r["volume_id"] for r in metrics["scores"]} == {"mock_0", "infected_0"}  # per volume
    assert metrics["splits"]["train"]["pearson_mean"] > 0.2
    assert sum(p.numel() for p in ridge.parameters()) > 0


def test_compositions_stay_compositions(ridge, datamodule):
    batch = datamodule.device_batch(next(iter(datamodule.predict_dataloader())))
    pred = ridge(batch["image"]).numpy()
    assert pred.shape == tuple(batch["target"].shape)
    assert (pred >= 0).all() and np.allclose(pred.sum(1), 1.0, atol=1e-5)


class _Constant:
    """A model that predicts the same composition everywhere (probe tests need no network)."""

    def __init__(self, t: int):
        self.t = t

    def predict_patches(self, patches: np.ndarray) -> np.ndarray:
        return np.full((len(patches), self.t), 1.0 / self.t, np.float32)


PROBE = {"n_points": 40, "distances_um": [30.0, 50.0, 100.0, 5000.0], "other_planes": 2, "max_patch_um": [40.0, 220.0, 220.0]}


def test_off_plane_probe(ridge, datamodule):
    from xpression.evaluation.generalisation import evaluate_off_plane
    from xpression.callbacks import predict_spots

    spots = predict_spots(ridge, datamodule)
    first = evaluate_off_plane(ridge, datamodule, spots, PROBE)
    rows = first["scores"]
    places = {(r["volume_id"], r["where"], r["distance_um"]) for r in rows if r["predictor"] == "model"}
    # tiny sections at z 137.4 (mock_0) and 157.3 (infected_0) in a 256 um volume; a 40 um patch
    # fits for centres in [20, 236] um: 50 um fits both sides, 100 um one side, 5000 none, and
    # 30 um is closer than the patch depth
    assert {("mock_0", "plane", 50.0), ("mock_0", "plane", 100.0), ("infected_0", "plane", 50.0),
            ("infected_0", "plane", 100.0)} <= places
    assert not any(d in (30.0, 5000.0) for _, _, d in places)
    assert any(v == "vaccinated_0" and w == "volume" for v, w, _ in places)
    assert any("30 um not probed" in e for e in first["excluded"])
    assert any("5000" in e for e in first["excluded"])
    by = {(r["volume_id"], r["distance_um"], r["predictor"]): r for r in rows}
    assert {"model", "extrusion", "knn", "animal_mean", "train_mean", "section_extrusion"} == {
        p for v, d, p in by if v == "mock_0" and d == 50.0}
    assert {"model", "animal_mean", "train_mean"} == {p for v, _, p in by if v == "vaccinated_0"}
    assert by[("mock_0", 50.0, "model")]["n"] == first["n_points"]["mock_0 50 um"] > 10
    assert np.isfinite(by[("mock_0", 50.0, "model")]["pearson_mean"])
    again = evaluate_off_plane(ridge, datamodule, spots, PROBE)
    assert again["digest"] == first["digest"]
    assert [r["pearson_mean"] for r in again["scores"]] == [r["pearson_mean"] for r in rows]  # fixed probe points


def test_probe_set_is_the_same_for_every_patch_depth(tiny_cohort, datamodule):
    """Runs with 1-, 5- and 7-slice patches are scored on the same points; a patch deeper than the
    probe allows is refused."""
    from xpression.data import XPressionDataModule
    from xpression.data.sampling import SpotSampler
    from xpression.evaluation.generalisation import evaluate_off_plane
    from xpression.callbacks import predict_spots

    digests, counts = set(), []
    for depth in (6.4, 32.0, 44.8):
        dm = XPressionDataModule(tiny_cohort, sections=["mock_0_s0", "infected_0_s0"], seed=0,
                                 sampler=SpotSampler(patch_size_um=[depth, 96.0, 96.0]))
        model = _Constant(len(dm.target_spec.names))
        out = evaluate_off_plane(model, dm, predict_spots(RidgeBaseline(dm.target_spec, dm.patch_shape_vox, 4.3).fit(dm), dm), PROBE)
        digests.add(out["digest"])
        counts.append(out["n_points"])
    assert len(digests) == 1 and counts[0] == counts[1] == counts[2]
    deep = XPressionDataModule(tiny_cohort, sections=["mock_0_s0"], seed=0, sampler=SpotSampler(patch_size_um=[64.0, 96.0, 96.0]))
    with pytest.raises(ValueError, match="max_patch_um"):
        evaluate_off_plane(_Constant(6), deep, pd.DataFrame(), PROBE)


def test_unfitted_ridge_says_so(datamodule):
    model = RidgeBaseline(datamodule.target_spec, datamodule.patch_shape_vox)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict_patches(np.zeros((1, *datamodule.patch_shape_vox), np.float32))


def test_probe_points_rescore_to_the_reported_scores(ridge, datamodule):
    """The probe's per-point table holds what its scores were computed from: scoring its columns
    again gives every reported r, and its places are the reported ones."""
    from xpression.callbacks import predict_spots
    from xpression.evaluation.generalisation import evaluate_off_plane
    from xpression.evaluation.scores import score_rows

    res = evaluate_off_plane(ridge, datamodule, predict_spots(ridge, datamodule), PROBE)
    points = res["points"]
    names = sorted({c.split("/", 1)[1] for c in points.columns if c.startswith("true/")})
    assert {"volume_id", "where", "distance_um", "z_um", "y_um", "x_um"} <= set(points.columns)
    def place(vid, where, d):  # a whole volume has no distance (NaN in the table)
        return vid, where, None if d is None or pd.isna(d) else float(d)

    reported = {(*place(r["volume_id"], r["where"], r["distance_um"]), r["predictor"]): r["pearson_mean"] for r in res["scores"]}
    checked = 0
    for (vid, where, d), part in points.groupby(["volume_id", "where", "distance_um"], dropna=False):
        assert len(part) == res["n_points"][f"{vid} {'volume' if where == 'volume' else f'{d:g} um'}"]
        preds = {p: part[[f"{p}/{n}" for n in names]].to_numpy() for p in ("model", "extrusion")
                 if f"{p}/{names[0]}" in part and part[f"{p}/{names[0]}"].notna().all()}  # absent: NaN after concat
        truth = part[[f"true/{n}" for n in names]].to_numpy()
        for row in score_rows(preds, truth, names, datamodule.target_spec.kind, volume_id=vid, where=where, distance_um=d):
            want = reported[(*place(vid, where, d), row["predictor"])]
            assert row["pearson_mean"] == pytest.approx(want, rel=1e-9, nan_ok=True)
            checked += 1
    assert checked >= 5


def test_infer_sweeps_a_ridge_run_patch_by_patch_on_its_own(datamodule, tiny_cohort, tmp_path):
    """The ridge has no dense mode: infer.py's default (mode=dense) predicts patch by patch, as for
    the forest, instead of telling the user to set mode=patch."""
    from tests._inference_models import infer_config
    from xpression.inference.pipeline import infer

    spec = datamodule.input_spec()
    model = RidgeBaseline(spec.target_spec, spec.patch_shape_vox, input_spec=spec).fit(datamodule)
    checkpoint = model.save_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    cfg = infer_config(run=str(checkpoint), cohort=str(tiny_cohort), volumes=["mock_0"], output=str(tmp_path / "maps"),
                       figures=False, evaluate=False, ct_preview=False)
    assert cfg.mode == "dense"
    summary = infer(cfg)
    assert cfg.mode == "patch" and list(summary["volumes"]) == ["mock_0"]
    assert summary["volumes"]["mock_0"]["tiles"] > 0

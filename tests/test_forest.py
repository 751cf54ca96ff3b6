"""Filter-bank features + extremely randomised trees (``model=forest``)."""

from __future__ import annotations

import numpy as np
import pytest

from xpression.models.filterbank import FEATURES, FilterBank, NearestFirst, ViewKernels
from xpression.models.forest import FilterBankForest, predict_trees, trees_to_arrays


def test_stored_trees_predict_what_scikit_learn_predicts():
    from sklearn.ensemble import ExtraTreesRegressor

    rng = np.random.default_rng(0)
    x = rng.random((300, 8))
    y = np.column_stack([x[:, 0] ** 2, np.sin(3 * x[:, 1]), x[:, 2] * x[:, 3]])
    forest = ExtraTreesRegressor(40, min_samples_leaf=3, max_features=0.5, random_state=0).fit(x, y)
    arrays = trees_to_arrays(forest.estimators_)
    assert len(arrays["tree_roots"]) == 40 and arrays["tree_value"].shape[1] == 3
    unseen = rng.random((2000, 8)) * 1.2 - 0.1  # some outside the training range too
    np.testing.assert_array_equal(predict_trees(unseen, *arrays.values()), forest.predict(unseen))


def test_filter_bank_on_known_views():
    bank = FilterBank((9, 33, 33), [(6.4, 6.4, 6.4), (19.2, 19.2, 19.2)], [6.4, 25.6, 102.4], 0.3, 0.75)
    # 6.4 um: the patch only (finer than the context's pitch); 25.6: both; 102.4: the context only
    assert [k.sigmas_um for k in bank.kernels] == [(6.4, 25.6), (25.6, 102.4)]
    assert bank.names[:6] == [f"{f}@6.4um" for f in FEATURES] and bank.names[-1] == "laplacian@102.4um/context"
    flat = bank(np.full((1, 2, 9, 33, 33), 0.5)).reshape(-1, len(FEATURES))
    np.testing.assert_allclose(flat[:, 0], 0.5)                  # mean
    np.testing.assert_allclose(flat[:, 1:], 0.0, atol=1e-7)      # no air, nothing bright, no texture, edge or blob
    dark = bank(np.zeros((1, 2, 9, 33, 33))).reshape(-1, len(FEATURES))
    np.testing.assert_allclose(dark[:, 1], 1.0)                  # all air

    # a ramp along x of 0.01 per um: the scale-normalised gradient is slope x sigma where the
    # kernel is hardly cut by the view (sigma 6.4 um in a +-102 um patch)
    k = ViewKernels.build((9, 33, 33), (6.4, 6.4, 6.4), [6.4])
    x_um = (np.arange(33) - 16) * 6.4
    ramp = np.broadcast_to(0.5 + 0.01 * x_um, (9, 33, 33)).reshape(1, -1)
    assert k.features(ramp, 0.3, 0.75)[0, 4] == pytest.approx(0.01 * 6.4, rel=1e-3)

    # rotations and flips in-plane leave every feature unchanged
    rng = np.random.default_rng(1)
    views = rng.random((3, 2, 9, 33, 33))
    base = bank(views)
    np.testing.assert_allclose(bank(np.rot90(views, 1, axes=(3, 4))), base, atol=1e-10)
    np.testing.assert_allclose(bank(views[..., ::-1]), base, atol=1e-10)


def test_filter_bank_rows_are_their_own_whatever_the_batch():
    """Views go in blocks of rows: a view's features do not depend on the others in its batch
    (Gaussian ones to float64 rounding, distances exactly), and the caller's array is untouched."""
    bank = FilterBank((5, 17, 17), [(6.4, 6.4, 6.4), (19.2, 19.2, 19.2)], [6.4, 25.6], distance_below=[0.3],
                      distance_above=[0.6])
    rng = np.random.default_rng(2)
    views = rng.random((75, 2, 5, 17, 17))  # 75 rows: over two blocks and a part
    copy = views.copy()
    together = bank(views)
    alone = np.concatenate([bank(views[i : i + 1]) for i in range(len(views))])
    np.testing.assert_array_equal(views, copy)
    np.testing.assert_allclose(together, alone, rtol=1e-12, atol=1e-14)
    distances = [j for j, name in enumerate(bank.names) if name.startswith("dist")]
    np.testing.assert_array_equal(together[:, distances], alone[:, distances])
    assert np.ptp(together[:, distances], axis=0).min() > 0  # the distances vary: the check has teeth


def test_signed_distance_features_on_known_views():
    bank = FilterBank((9, 33, 33), [(6.4, 6.4, 6.4), (19.2, 19.2, 19.2)], [25.6], distance_below=[0.2],
                      distance_above=[0.7], distance_cap_um=150.0)
    assert bank.names[-4:] == ["dist<0.2", "dist>0.7", "dist<0.2/context", "dist>0.7/context"]
    views = np.full((3, 2, 9, 33, 33), 0.5)
    views[0, :, 4, 16, 16 + 5] = 0.0          # one dark voxel 5 voxels along x from the centre
    views[0, :, 4 + 2, 16, 16] = 0.9          # one bright voxel 2 voxels along z
    views[1] = 0.9                            # all bright: the centre is inside, nothing is outside
    views[2, :, 4, 16, 16] = 0.0              # the centre alone is dark: 1 voxel to the nearest not-dark
    d = bank(views)[:, -4:]
    np.testing.assert_allclose(d[0], [5 * 6.4, 2 * 6.4, 5 * 19.2, 2 * 19.2])
    np.testing.assert_allclose(d[1], [150.0, -150.0, 150.0, -150.0])       # nothing dark; bright everywhere
    np.testing.assert_allclose(d[2, [0, 2]], [-6.4, -19.2])                 # inside the dark voxel, one voxel deep
    # in-plane rotations and flips leave them unchanged
    rng = np.random.default_rng(3)
    noise = rng.random((4, 2, 9, 33, 33))
    base = bank(noise)
    np.testing.assert_allclose(bank(np.rot90(noise, 1, axes=(3, 4))), base)
    np.testing.assert_allclose(bank(noise[..., ::-1]), base)
    with pytest.raises(ValueError, match="distance_cap_um"):
        FilterBank((9, 33, 33), [(6.4, 6.4, 6.4)], [25.6], distance_below=[0.2], distance_cap_um=0)


def test_share_levels_on_known_views():
    bank = FilterBank((9, 33, 33), [(6.4, 6.4, 6.4)], [6.4, 51.2], 0.3, 0.75, share_below=[0.1], share_above=[0.6])
    assert bank.names[-4:] == ["share<0.1@6.4um", "share>0.6@6.4um", "share<0.1@51.2um", "share>0.6@51.2um"]
    view = np.full((1, 1, 9, 33, 33), 0.65)
    view[..., :16] = 0.05                      # the left half (x < centre) dark, the centre column and right at 0.65
    f = dict(zip(bank.names, bank(view)[0]))
    assert f["share>0.6@6.4um"] == pytest.approx(1 - f["share<0.1@6.4um"])
    assert f["share<0.1@51.2um"] == pytest.approx(f["air@51.2um"])          # 0.05 and 0.65 fall on the same side of 0.1 and 0.3
    assert 0.4 < f["share<0.1@51.2um"] < 0.5                                 # just under half: the centre column is not dark
    assert f["share>0.6@51.2um"] == pytest.approx(1 - f["share<0.1@51.2um"])
    assert f["bright@51.2um"] == 0.0                                          # 0.65 is above 0.6, not above 0.75


def test_signed_distances_equal_a_brute_force_minimum():
    """Rows whose nearest hit lies among the nearest 512 voxels and rows scanned whole give what
    the minimum over every voxel gives."""
    k = NearestFirst.build((9, 33, 33), (44.8, 25.6, 25.6))
    rng = np.random.default_rng(5)
    views = rng.random((60, 9 * 33 * 33))
    views[:20] = np.where(rng.random((20, views.shape[1])) < 0.002, 0.05, 0.5)  # a few far dark voxels
    views[20:30] = 0.9                                                           # nothing dark, all bright
    levels_below, levels_above, cap = [0.1, 0.3], [0.6], 250.0
    radius = np.minimum(k.radius_um, cap)
    expected = []
    for mask in [views < t for t in levels_below] + [views > t for t in levels_above]:
        expected.append(np.where(mask, radius, cap).min(1) - np.where(mask, cap, radius).min(1))
    np.testing.assert_array_equal(k.distances(views, levels_below, levels_above, cap), np.stack(expected, 1))


def test_a_scale_no_view_serves_is_named():
    with pytest.raises(ValueError, match=r"sigmas_um: 400 um fits no view"):
        FilterBank((9, 33, 33), [(6.4, 6.4, 6.4), (19.2, 19.2, 19.2)], [6.4, 400.0])
    with pytest.raises(ValueError, match="expects"):
        FilterBank((9, 33, 33), [(6.4, 6.4, 6.4)], [6.4])(np.zeros((1, 2, 9, 33, 33)))


@pytest.fixture(scope="module")
def datamodule(tiny_cohort):
    from xpression.data import XPressionDataModule
    from xpression.data.sampling import SpotSampler

    dm = XPressionDataModule(tiny_cohort, sections=["mock_0_s0", "infected_0_s0"], seed=0,
                             sampler=SpotSampler(patch_size_um=[32.0, 205.0, 205.0], context_um=[224.0, 820.0, 820.0]))
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def forest(datamodule):
    spec = datamodule.input_spec()
    return FilterBankForest(spec.target_spec, spec.patch_shape_vox, n_trees=50, input_spec=spec).fit(datamodule)


def test_forest_beats_the_ridge_and_the_training_mean_on_held_out_spots(forest, datamodule):
    """The tiny cohort trains on 24 spots, too few for a correlation to mean much on ~30 held-out
    spots; the squared error does (seeded, so these numbers are fixed)."""
    from xpression.callbacks import predict_spots
    from xpression.evaluation.run_scores import _ridge_columns, fit_ridge_baseline
    from xpression.evaluation.scores import evaluate_spots

    spec = datamodule.target_spec
    assert forest.views == 2 and forest.fitted
    table = _ridge_columns(fit_ridge_baseline(datamodule), datamodule, predict_spots(forest, datamodule))
    rows = evaluate_spots(table, spec.names, spec.kind)["scores"]
    mse = {(r["volume_id"], r["where"], r["predictor"]): r["mse_mean"] for r in rows}
    held_out = {(v, w) for v, w, p in mse if p == "model" and w != "train spots"}
    assert {v for v, _ in held_out} == {"mock_0", "infected_0"}
    for vid, where in held_out:
        assert mse[(vid, where, "model")] < 0.95 * min(mse[(vid, where, "ridge")], mse[(vid, where, "train_mean")]), (vid, where)
    train_r = [r["pearson_mean"] for r in rows if r["where"] == "train spots" and r["predictor"] == "model"]
    assert min(train_r) > 0.8
    batch = datamodule.device_batch(next(iter(datamodule.predict_dataloader())))
    pred = forest(batch["image"]).numpy()
    assert pred.shape == tuple(batch["target"].shape) and (pred >= 0).all()
    np.testing.assert_allclose(pred.sum(1), 1.0, atol=1e-5)


def test_forest_checkpoint_is_read_back_by_infer(forest, datamodule, tmp_path):
    from xpression.inference.runs import load_model, resolve_run

    path = forest.save_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    info = resolve_run(path)
    model = load_model(info)
    assert isinstance(model, FilterBankForest) and info.spec.model["family"] == "forest" and model.views == 2
    views = np.random.default_rng(2).random((5, 2, *datamodule.patch_shape_vox)).astype(np.float32)
    np.testing.assert_array_equal(model.predict_patches(views), forest.predict_patches(views))


def test_forest_with_distance_features_fits_and_reads_back(datamodule, tmp_path):
    from xpression.inference.runs import load_model, resolve_run

    spec = datamodule.input_spec()
    model = FilterBankForest(spec.target_spec, spec.patch_shape_vox, n_trees=20, distance_below=[0.15, 0.3],
                             distance_above=[0.7], input_spec=spec).fit(datamodule)
    assert model.bank.names[-3:] == ["dist<0.15/context", "dist<0.3/context", "dist>0.7/context"]
    loaded = load_model(resolve_run(model.save_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")))
    assert loaded.distance_below == [0.15, 0.3] and loaded.distance_above == [0.7]
    views = np.random.default_rng(4).random((5, 2, *datamodule.patch_shape_vox)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_patches(views), model.predict_patches(views))


def test_unfitted_forest_and_bad_settings_say_so(datamodule):
    spec = datamodule.input_spec()
    model = FilterBankForest(spec.target_spec, spec.patch_shape_vox, input_spec=spec)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict_patches(np.zeros((1, 2, *spec.patch_shape_vox), np.float32))
    with pytest.raises(ValueError, match="max_features"):
        FilterBankForest(spec.target_spec, spec.patch_shape_vox, max_features=0, input_spec=spec)
    with pytest.raises(ValueError, match="800 um fits no view"):
        FilterBankForest(spec.target_spec, spec.patch_shape_vox, sigmas_um=[6.4, 800.0], input_spec=spec)


def test_each_stored_tree_predicts_what_its_scikit_learn_tree_predicts():
    from sklearn.ensemble import ExtraTreesRegressor

    from xpression.models.forest import tree_leaves

    rng = np.random.default_rng(1)
    x = rng.random((200, 5))
    y = np.column_stack([x[:, 0], x[:, 1] * x[:, 2]])
    forest = ExtraTreesRegressor(12, min_samples_leaf=2, random_state=0).fit(x, y)
    unseen = rng.random((500, 5))
    leaves = tree_leaves(unseen, *trees_to_arrays(forest.estimators_).values())
    assert leaves.shape == (500, 12, 2)
    for i, tree in enumerate(forest.estimators_):
        np.testing.assert_array_equal(leaves[:, i], tree.predict(unseen))


def test_forest_spread_is_its_trees_disagreement_and_its_mean_the_forests_answer(forest, datamodule):
    import torch

    from xpression.models.forest import TREE_KEYS, tree_leaves

    views = torch.from_numpy(np.random.default_rng(5).random((6, 2, *datamodule.patch_shape_vox)).astype(np.float32))
    mean, sd, ood = forest.predict_spread(views, with_features=True)
    torch.testing.assert_close(mean, forest(views), rtol=0, atol=0)
    feats = forest.features(views.numpy().astype(np.float64))
    each = tree_leaves(feats, *(getattr(forest, k).numpy() for k in TREE_KEYS))
    each = np.clip(each, 0, None) / np.clip(each, 0, None).sum(2, keepdims=True)  # each tree's composition
    np.testing.assert_allclose(sd.numpy(), each.std(axis=1, ddof=1), rtol=1e-5, atol=1e-7)
    assert (sd.numpy() > 0).any()
    torch.testing.assert_close(ood, forest.ood_features(views), rtol=0, atol=0)


def test_forest_ood_features_are_its_training_features_in_units_of_their_spread(forest):
    z = forest.standardised(forest.training_features)
    assert z.dtype == np.float32 and z.shape == forest.training_features.shape
    varying = forest.training_features.std(0) > 0
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z[:, varying].std(0), 1.0, atol=1e-4)
    stale = FilterBankForest(forest.target_spec, forest.patch_shape, n_trees=5, input_spec=forest.input_spec)
    assert not stale.has_ood_features  # e.g. read from a checkpoint written before the spread was kept
    with pytest.raises(RuntimeError, match="fit it again"):
        stale.standardised(forest.training_features)


def test_a_forest_sweeps_with_its_trees_spread_and_an_ood_channel(forest, datamodule):
    import torch

    from xpression.inference.ood import fit_ood, knn_distance, mahalanobis, require_features, weights_digest
    from xpression.inference.predictor import InferenceError
    from xpression.inference.uncertainty import TrustNet

    fit = fit_ood(forest.standardised(forest.training_features), weights_digest(forest))
    views = torch.from_numpy(np.random.default_rng(6).random((4, 2, *datamodule.patch_shape_vox)).astype(np.float32))
    net = TrustNet([forest], "trees", ood_fits=[fit])
    out = net(views)
    T = len(forest.target_spec.names)
    assert out.shape == (4, 2 * T + 1) and net.sd_scale.shape == (T,)
    mean, sd, feats = forest.predict_spread(views, with_features=True)
    torch.testing.assert_close(out[:, :T], mean)
    torch.testing.assert_close(out[:, T:2 * T], sd)
    torch.testing.assert_close(out[:, -1], mahalanobis(feats, torch.as_tensor(fit.mean, dtype=torch.float32),
                                                       torch.as_tensor(fit.whiten, dtype=torch.float32), dim=1))
    # the training spots lie near their own fit; random views far from it
    train = torch.as_tensor(forest.standardised(forest.training_features))
    assert float(mahalanobis(train, torch.as_tensor(fit.mean, dtype=torch.float32),
                             torch.as_tensor(fit.whiten, dtype=torch.float32), dim=1).median()) < float(out[:, -1].min())
    assert knn_distance(feats, torch.as_tensor(fit.bank), fit.k, dim=1).shape == (4,)
    require_features([forest])  # a fitted forest has features to measure the distance in
    with pytest.raises(InferenceError, match="uncertainty=trees takes one model"):
        TrustNet([forest, forest], "trees")


def test_uncertainty_on_a_forest_run_takes_its_trees_and_refuses_mc_dropout_in_one_line(forest, tmp_path):
    from omegaconf import OmegaConf

    from xpression.inference.predictor import InferenceError
    from xpression.inference.runs import load_predictor, resolve_run
    from xpression.inference.uncertainty import trust_predictor

    info = resolve_run(forest.save_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    pred = load_predictor(info, "cpu", "fp32")
    with pytest.raises(InferenceError, match=r"mc_dropout: .* holds a forest \(no dropout\); use uncertainty=trees"):
        trust_predictor(OmegaConf.create({"uncertainty": "mc_dropout"}), info, [info], pred)
    wrapped, meta = trust_predictor(OmegaConf.create({"uncertainty": "trees"}), info, [info], pred)
    names = list(forest.target_spec.names)
    assert meta["method"] == "trees" and meta["sd_channels"] == [f"{t}_sd" for t in names]
    assert list(wrapped.target_names) == names + [f"{t}_sd" for t in names]


def test_a_forest_on_threads_answers_as_on_one_and_sweeps_in_large_batches(forest, datamodule, monkeypatch):
    """The rows of a batch are split over torch's CPU threads (features, trees, their spread):
    the same numbers, bit for bit, as on one thread; a patch sweep gives it 256 views per thread
    per call, a network 64."""
    import threading

    import torch

    from xpression.inference.predictor import Predictor

    views = torch.from_numpy(np.random.default_rng(6).random((40, 2, *datamodule.patch_shape_vox)).astype(np.float32))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = forest(views), *forest.predict_spread(views, with_features=True)
        assert forest.patch_batch_size == 256 and Predictor(forest, device="cpu").default_batch_size == 256
        torch.set_num_threads(3)
        seen: list[tuple[str, int]] = []
        real_features = type(forest).features
        monkeypatch.setattr(type(forest), "features",
                            lambda self, v: seen.append((threading.current_thread().name, len(v))) or real_features(self, v))
        three = forest(views), *forest.predict_spread(views, with_features=True)
        # 40 rows in blocks of 13-14 on the pool's threads, for each of the two calls
        assert sorted(n for _, n in seen) == [13, 13, 13, 13, 14, 14]
        assert all(name.startswith("xpression-rows") for name, _ in seen)
        assert forest.patch_batch_size == 768
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, three):
        assert torch.equal(a, b)
    net = torch.nn.Conv3d(1, 2, 3)
    net.patch_shape = (3, 3, 3)
    assert Predictor(net, device="cpu").default_batch_size == 64


def test_map_rows_splits_rows_into_blocks_and_keeps_their_order():
    from xpression.models.closed_form import map_rows

    x = np.arange(70.0).reshape(35, 2)
    sizes: list[int] = []
    out = map_rows(lambda rows: sizes.append(len(rows)) or rows * 2, x, threads=4)
    np.testing.assert_array_equal(out, x * 2)
    assert sorted(sizes) == [8, 9, 9, 9]
    sizes.clear()
    map_rows(lambda rows: sizes.append(len(rows)) or rows, x[:15], threads=4)  # under 2 x 8 rows: one call
    assert sizes == [15]

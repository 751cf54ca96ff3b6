"""Uncertainty (ensembles, MC dropout) and the out-of-distribution channel, on a tiny phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from tests._inference_models import infer_config, make_run, two_volume_cohort
from xpression.config import ConfigError
from xpression.evaluation.maps import evaluate_inference
from xpression.evaluation.uncertainty import uncertainty_scores
from xpression.inference.ood import OOD_FILE, OODFit, fit_ood, mahalanobis, ood_fit_for_run, weights_digest
from xpression.inference.pipeline import infer
from xpression.inference.predictor import InferenceError, Predictor
from xpression.inference.runs import load_predictor, resolve_run
from xpression.inference.uncertainty import TrustNet
from xpression.inference.writers import read_maps

torch.set_num_threads(1)
NAMES = ["alveolar", "airway", "vascular", "infected", "immune", "remodelling"]
SD = [f"{t}_sd" for t in NAMES]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return two_volume_cohort(tmp_path_factory.mktemp("phantom") / "c")


@pytest.fixture(scope="module")
def runs(cohort, tmp_path_factory):
    """A multirun-like folder of two untrained cnn3d runs (seeds 0 and 1), no dropout."""
    root = tmp_path_factory.mktemp("multirun")
    return root, [make_run(root / str(i), cohort, seed=i) for i in range(2)]


def config(**over):
    """One volume, no figures, preview or scoring unless asked."""
    return infer_config(**{"volumes": ["mock_0"], "figures": False, "ct_preview": False, "evaluate": False, **over})


def _maps(out: Path, vid: str = "mock_0") -> tuple[np.ndarray, dict]:
    arr, meta = read_maps(out / vid / "maps.ome.zarr")
    return arr[:].astype(np.float32), meta


def test_identical_members_have_sd_zero_and_the_single_run_mean(runs, tmp_path):
    _, (r0, _) = runs
    infer(config(run=str(r0), output=str(tmp_path / "one")))
    infer(config(run=None, uncertainty="ensemble", members=[str(r0), str(r0)], output=str(tmp_path / "ens")))
    single, _ = _maps(tmp_path / "one")
    ens, meta = _maps(tmp_path / "ens")
    assert meta["targets"] == NAMES + SD  # the mean channels keep their names
    assert meta["uncertainty"]["method"] == "ensemble" and len(meta["uncertainty"]["members"]) == 2
    tissue = np.isfinite(single[0])
    assert tissue.sum() > 100
    np.testing.assert_array_equal(ens[6:][:, tissue], 0.0)
    np.testing.assert_allclose(ens[:6], single, atol=1e-3, equal_nan=True)  # float16 storage


def test_dense_ensemble_equals_patch_ensemble(runs, tmp_path):
    root, _ = runs
    infer(config(run=str(root), uncertainty="ensemble", output=str(tmp_path / "dense")))  # the runs of the folder
    infer(config(run=str(root), uncertainty="ensemble", output=str(tmp_path / "patch"), mode="patch"))
    dense, meta = _maps(tmp_path / "dense")
    patch, _ = _maps(tmp_path / "patch")
    assert [Path(m["run_dir"]).name for m in meta["uncertainty"]["members"]] == ["0", "1"]
    np.testing.assert_allclose(dense, patch, atol=2e-3, equal_nan=True)
    sd = dense[6:][np.isfinite(dense[6:])]
    assert sd.min() >= 0 and sd.mean() > 1e-3  # two different random networks disagree


def test_ensemble_sd_is_the_members_sample_sd(runs):
    """The streamed combination against the members' outputs computed one by one."""
    _, paths = runs
    nets = [load_predictor(resolve_run(p), "cpu", "fp32").net for p in paths]
    x = torch.rand(3, 1, 5, 33, 33, generator=torch.Generator().manual_seed(0))
    trust = TrustNet(nets, "ensemble").eval()
    with torch.inference_mode():
        each = torch.stack([n(x) for n in nets])
        out = trust(x)
        dense = trust.dense_forward(torch.rand(2, 1, 5, 41, 45))
    np.testing.assert_allclose(out[:, :6], each.mean(0), atol=1e-6)
    np.testing.assert_allclose(out[:, 6:], each.std(0, unbiased=True), atol=1e-6)
    assert dense.shape == (2, 12, 1, 3, 4)


def test_members_must_share_the_input_contract(cohort, runs, tmp_path):
    _, (r0, _) = runs
    other_patch = make_run(tmp_path / "p", cohort, patch_shape=(7, 33, 33), seed=2)
    with pytest.raises(InferenceError, match=rf"ensemble member {other_patch}.*patch_shape"):
        infer(config(run=None, uncertainty="ensemble", members=[str(r0), str(other_patch)], output=str(tmp_path / "o")))
    other_vs = make_run(tmp_path / "v", cohort, voxel_size_um=(3.2, 3.2, 3.2), seed=3)
    with pytest.raises(InferenceError, match=rf"ensemble member {other_vs} was trained at voxel size"):
        infer(config(run=None, uncertainty="ensemble", members=[str(r0), str(other_vs)], output=str(tmp_path / "o")))
    with pytest.raises(InferenceError, match="is a single run"):
        infer(config(run=str(r0), uncertainty="ensemble", output=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="mc_samples: must be an integer >= 2"):
        infer(config(run=str(r0), uncertainty="mc_dropout", mc_samples=1, output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_mc_dropout_refuses_a_network_without_dropout(runs, tmp_path):
    _, (r0, _) = runs
    with pytest.raises(InferenceError, match=r"mc_dropout: the network of .* has no dropout layer"):
        infer(config(run=str(r0), uncertainty="mc_dropout", output=str(tmp_path / "o")))


def test_mc_dropout_spreads_and_keeps_the_mean_near_the_deterministic_map(cohort, tmp_path):
    backbone = {"name": "cnn3d", "widths": [4, 8, 8], "kernel_size": [[3, 5, 5], [3, 3, 3], [1, 3, 3]],
                "pool": [1, 2, 2], "padding": "valid", "dense_width": 16, "dropout": 0.2}
    run = make_run(tmp_path / "drop", cohort, backbone=backbone)
    infer(config(run=str(run), output=str(tmp_path / "det")))
    infer(config(run=str(run), uncertainty="mc_dropout", mc_samples=30, output=str(tmp_path / "mc")))
    det, _ = _maps(tmp_path / "det")
    mc, meta = _maps(tmp_path / "mc")
    assert meta["targets"] == NAMES + SD and meta["uncertainty"]["mc_samples"] == 30
    tissue = np.isfinite(det[0])
    assert (mc[6:][:, tissue] > 0).mean() > 0.99  # every point varies between passes
    # the MC mean is the mean of 30 noisy passes: near the deterministic map, within a few SD/sqrt(30)
    gap = np.abs(mc[:6] - det)[:, tissue]
    assert np.median(gap / (mc[6:][:, tissue] / np.sqrt(30) + 1e-3)) < 3


def test_mc_dropout_runs_the_trunk_once_with_the_same_numbers(cohort, tmp_path):
    """cnn3d's dropout is its last step: the passes share one trunk forward and give, seed for
    seed, what full passes give."""
    backbone = {"name": "cnn3d", "widths": [4, 8, 8], "kernel_size": [[3, 5, 5], [3, 3, 3], [1, 3, 3]],
                "pool": [1, 2, 2], "padding": "valid", "dense_width": 16, "dropout": 0.3}
    net = load_predictor(resolve_run(make_run(tmp_path / "d", cohort, backbone=backbone)), "cpu", "fp32").net
    trust = TrustNet([net], "mc_dropout", samples=7).eval()
    calls = []
    net.backbone.trunk.register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(4, 1, 5, 33, 33, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.manual_seed(5)
        fast = trust(x)
        assert len(calls) == 1
        trust._mc_last_dropout = lambda run, head: None  # every pass through the whole network
        torch.manual_seed(5)
        full = trust(x)
    assert len(calls) == 1 + 7
    np.testing.assert_allclose(fast, full, atol=1e-6)
    assert (fast[:, 6:] > 0).all()


def test_mahalanobis_fit_on_known_features():
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 1.5], [1.5, 1.0]])
    x = rng.multivariate_normal([1.0, -2.0], cov, size=4000)
    fit = fit_ood(x, "abc")
    assert fit.shrinkage < 0.01  # plenty of samples: almost no shrinkage
    pts = np.array([[1.0, -2.0], [3.0, -2.0]])
    expect = np.sqrt([0.0, np.array([2.0, 0.0]) @ np.linalg.inv(cov) @ np.array([2.0, 0.0])])
    np.testing.assert_allclose(fit.score(pts), expect, atol=0.08)
    # squared distances of training points follow chi2 with 2 dof: 99th percentile sqrt(9.21) = 3.03
    assert abs(fit.train_p99 - 3.03) < 0.15
    t = mahalanobis(torch.tensor(pts.T[None, :, :, None], dtype=torch.float32), torch.tensor(fit.mean, dtype=torch.float32),
                    torch.tensor(fit.whiten, dtype=torch.float32), dim=1)
    np.testing.assert_allclose(t.numpy()[0, :, 0], fit.score(pts), rtol=1e-5)
    # constant features (ReLUs that never fire) and fewer spots than features stay finite
    few = np.concatenate([rng.normal(size=(10, 30)), np.zeros((10, 5))], axis=1)
    small = fit_ood(few)
    assert np.isfinite(small.score(few)).all() and small.shrinkage > 0.1


@pytest.fixture(scope="module")
def trained(tiny_cohort, tmp_path_factory):
    """A real train.py run (a few steps of the default cnn3d) on the tiny phantom."""
    from tests.test_train import _cfg
    from xpression.training import train

    out = tmp_path_factory.mktemp("trained")
    train(_cfg(out, tiny_cohort, ["figures=false", "baselines.ridge=false"]))
    return out


def test_ood_larger_for_an_input_made_out_of_distribution(trained, tmp_path):
    assert (trained / OOD_FILE).is_file()
    info = resolve_run(trained)
    pred = load_predictor(info, "cpu", "fp32")
    fit = OODFit.load(trained / OOD_FILE)
    assert fit.weights_sha256 == weights_digest(pred.net) and fit.num_features == 64
    trust = Predictor(TrustNet([pred.net], "none", ood_fits=[fit]), device="cpu", precision="fp32")
    # the training patches, as training saw them
    from omegaconf import OmegaConf as OC
    from hydra.utils import instantiate

    conf = OC.create(info.config)
    dm = instantiate(conf.data, target=conf.target, sampler=conf.sampler, split=conf.split, seed=conf.seed,
                     _recursive_=False, num_workers=0, persistent_workers=False, pin_memory=False)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    from xpression.data.datamodule import image_to_float

    patches = image_to_float(batch["image"])[:, 0].numpy()
    inside = trust.predict_patches(patches)[:, -1]
    assert inside.shape == (len(patches),)
    assert np.median(inside) < fit.train_p99
    # the same patches with 3x their contrast (intensities up to 3, training saw [0, 1]), and
    # white noise: inputs out of distribution on purpose
    bright = trust.predict_patches(3.0 * patches)[:, -1]
    noise = trust.predict_patches(np.random.default_rng(0).random(patches.shape).astype(np.float32))[:, -1]
    assert np.median(bright) > 2 * np.median(inside) and (bright > fit.train_p99).mean() > 0.9
    assert np.median(noise) > np.median(inside)
    # at inference the fit is made again from the training spots when the file is missing: same numbers
    (trained / OOD_FILE).rename(tmp_path / OOD_FILE)
    try:
        refit = ood_fit_for_run(info, pred.net)
    finally:
        (tmp_path / OOD_FILE).rename(trained / OOD_FILE)
    np.testing.assert_allclose(refit.mean, fit.mean, atol=1e-4)
    assert abs(refit.train_p99 - fit.train_p99) < 1e-3 * fit.train_p99


def test_infer_with_ood_and_mc_dropout_scores_against_the_truth(trained, tiny_cohort, tmp_path):
    out = tmp_path / "o"
    cfg = config(run=str(trained), output=str(out), uncertainty="mc_dropout", mc_samples=8, ood=True, volumes=None,
                 evaluate=True, figures=True, tile_vox=[16, 128, 128])
    summary = infer(cfg)
    maps, meta = _maps(out, next(iter(summary["volumes"])))
    names = meta["uncertainty"]["targets"]
    assert meta["targets"] == names + [f"{t}_sd" for t in names] + ["ood"]
    ood = maps[-1][np.isfinite(maps[-1])]
    assert ood.size and ood.min() > 0
    evaluation = evaluate_inference(cfg, summary)
    rows = pd.read_csv(out / "uncertainty.csv")
    assert set(rows["volume_id"]) == set(summary["volumes"])
    for col in ("sd_mean", "coverage_2sd", "spearman_sd_error", "ood_mean", "ood_p95", "ood_above_train_p99"):
        assert np.isfinite(rows[col]).all(), col
    assert ((rows["coverage_2sd"] >= 0) & (rows["coverage_2sd"] <= 1)).all()
    assert evaluation["uncertainty"]["rows"] and json.loads((out / "summary.json").read_text())["evaluation"]["uncertainty"]
    vid = next(iter(summary["volumes"]))
    assert (out / vid / "figures" / "uncertainty.png").is_file() and (out / vid / "figures" / "orthoviews.png").is_file()


def test_uncertainty_scores_on_known_numbers():
    truth = np.zeros((5, 2))
    pred = np.array([[0.1, 0.0], [0.2, 0.1], [0.3, 0.2], [0.4, 0.3], [0.5, 0.9]])
    sd = np.array([[0.05, 0.1], [0.2, 0.1], [0.1, 0.3], [0.3, 0.4], [0.2, 0.05]])
    row = uncertainty_scores(pred, truth, ["a", "b"], sd, ood=np.array([1.0, 2.0, 3.0, 4.0, 10.0]), ood_threshold=3.5)
    assert row["n"] == 5 and row["sd_mean"] == pytest.approx(sd.mean())
    assert row["coverage_2sd"] == pytest.approx(7 / 10)  # |error| <= 2 SD: a 3 of 5, b all but the 0.9
    assert row["coverage_2sd/a"] == pytest.approx(3 / 5) and row["coverage_2sd/b"] == pytest.approx(4 / 5)
    assert row["spearman_sd_error/a"] == pytest.approx(6.5 / np.sqrt(95))  # ranks of sd 1, 3.5, 2, 5, 3.5 against 1..5
    assert row["ood_above_train_p99"] == pytest.approx(2 / 5) and row["ood_p95"] == pytest.approx(8.8)
    assert row["spearman_ood_error"] == pytest.approx(1.0)


# -- calibration of the SD, and the knn out-of-distribution score ----------------------------------


def test_sd_scale_recovers_known_factors_on_gaussian_errors():
    from xpression.inference.calibration import COVERAGE_2SD, fit_sd_scale

    rng = np.random.default_rng(0)
    n, factors = 20000, np.array([0.5, 2.0, 5.0])
    sd = rng.uniform(0.01, 0.1, size=(n, 3))
    err = np.abs(rng.normal(size=(n, 3)) * sd * factors)  # errors whose true SD is factor x sd
    scale = fit_sd_scale(err, sd)
    np.testing.assert_allclose(scale, factors, rtol=0.04)
    assert np.mean(err <= 2 * sd * scale) == pytest.approx(COVERAGE_2SD, abs=0.003)
    assert np.mean(err <= 2 * sd) == pytest.approx(np.mean([0.99994, 0.683, 0.31]), abs=0.01)  # before: P(|z| <= 2/f)
    # a target whose SD is 0 everywhere keeps 1; mismatched shapes are refused
    assert fit_sd_scale(err[:, :1], np.zeros((n, 1)))[0] == 1.0
    with pytest.raises(InferenceError, match="same"):
        fit_sd_scale(err, sd[:, :2])


def test_calibration_spots_leave_out_what_any_member_trained_on():
    from types import SimpleNamespace

    from xpression.inference.calibration import calibration_spots

    def dm(splits):
        return SimpleNamespace(spots=pd.DataFrame({"section_id": "s", "barcode": list("abcde"), "split": splits}))

    first = dm(["train", "val", "val", "test", "excluded"])
    other = dm(["val", "train", "val", "val", "train"])  # trained on b and e
    assert calibration_spots([first]).tolist() == [1, 2, 3, 4]
    assert calibration_spots([first, other]).tolist() == [2, 3]


def test_knn_distance_on_known_geometry():
    from xpression.inference.ood import knn_distance

    bank = torch.eye(3)[:2]  # unit vectors x and y
    q = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 0.0]])  # on x (any length), on z, between
    d1 = knn_distance(q, bank, 1)
    np.testing.assert_allclose(d1.numpy(), [0.0, np.sqrt(2), np.sqrt(2 - np.sqrt(2))], atol=1e-6)
    d2 = knn_distance(q, bank, 2)  # the 2nd neighbour: y for the first query
    np.testing.assert_allclose(d2.numpy()[0], np.sqrt(2), atol=1e-6)
    # dense layout (B, F, *spatial) gives the same numbers; k beyond the bank is capped
    dense = knn_distance(q.T.reshape(1, 3, 3, 1), bank, 1, dim=1, chunk=2)
    np.testing.assert_allclose(dense.numpy().ravel(), d1.numpy(), atol=1e-6)
    assert torch.equal(knn_distance(q, bank, 5), knn_distance(q, bank, 2))


def test_knn_fit_grows_with_the_shift_from_the_training_features(tmp_path):
    rng = np.random.default_rng(1)
    centre = np.zeros(8)
    centre[0] = 5.0
    x = centre + rng.normal(size=(400, 8))  # training features around one direction
    fit = fit_ood(x).using("knn")
    assert fit.k == 10 and fit.bank.shape == (400, 8)
    away = np.zeros(8)
    away[1] = 5.0
    scores = [np.median(fit.score(centre + rng.normal(size=(200, 8)) + t * (away - centre))) for t in (0.0, 0.3, 0.6, 1.0)]
    assert np.all(np.diff(scores) > 0)  # further from the training direction: further from its neighbours
    assert scores[0] < fit.threshold < scores[-1]
    # saved and loaded with the bank; a fit saved without it refuses knn
    back = OODFit.load(fit.save(tmp_path / "f.npz")).using("knn")
    np.testing.assert_allclose(back.score(x[:5]), fit.score(x[:5]))
    assert back.threshold == pytest.approx(fit.threshold)
    old = OODFit(fit.mean, fit.whiten, fit.train_p99, fit.n_spots, fit.shrinkage)
    with pytest.raises(InferenceError, match="knn"):
        OODFit.load(old.save(tmp_path / "old.npz")).using("knn")


def test_knn_ood_channel_is_the_fit_score_and_grows_with_contrast(trained):
    info = resolve_run(trained)
    pred = load_predictor(info, "cpu", "fp32")
    fit = ood_fit_for_run(info, pred.net, method="knn")
    assert fit.method == "knn" and fit.bank is not None
    trust = Predictor(TrustNet([pred.net], "none", ood_fits=[fit]), device="cpu", precision="fp32")
    from xpression.data.datamodule import image_to_float
    from xpression.inference.ood import run_datamodule

    dm = run_datamodule(info)
    dm.setup("predict")
    patches = image_to_float(next(iter(dm.predict_dataloader()))["image"])[:, 0].numpy()
    inside = trust.predict_patches(patches)[:, -1]
    np.testing.assert_allclose(inside, fit.score(pred.net.forward_features(torch.as_tensor(patches[:, None])).detach().numpy()),
                               atol=1e-5)
    # a feature grown in size moves its direction too (ReLUs, biases): 3x the contrast scores higher
    bright = trust.predict_patches(3.0 * patches)[:, -1]
    assert np.median(inside) < fit.threshold and np.median(bright) > np.median(inside)


def test_calibrated_mc_dropout_scales_the_sd_by_the_fitted_factor(trained, tmp_path):
    from xpression.inference.uncertainty import trust_identity, trust_predictor

    info = resolve_run(trained)
    pred = load_predictor(info, "cpu", "fp32")
    base = dict(run=str(trained), uncertainty="mc_dropout", mc_samples=6, mc_seed=3, ood=False)
    raw, raw_meta = trust_predictor(OmegaConf.create({**base, "calibrate": False}), info, [], pred)
    pred2 = load_predictor(info, "cpu", "fp32")
    cal, meta = trust_predictor(OmegaConf.create({**base, "calibrate": True}), info, [], pred2)
    c = meta["calibration"]
    scale = np.asarray(c["scale"])
    assert scale.shape == (6,) and (scale > 0).all() and c["n_spots"] >= 10
    assert c["coverage_after"] >= 0.9 and c["coverage_after"] >= c["coverage_before"]
    patches = np.random.default_rng(0).random((4, *pred.patch_shape)).astype(np.float32)
    torch.manual_seed(3)
    a = raw.predict_patches(patches)
    torch.manual_seed(3)  # the same dropout masks
    b = cal.predict_patches(patches)
    np.testing.assert_allclose(b[:, :6], a[:, :6], atol=1e-6)
    np.testing.assert_allclose(b[:, 6:], a[:, 6:] * scale, rtol=1e-4, atol=1e-7)
    assert trust_identity(meta) != trust_identity(raw_meta)  # a calibrated map never resumes an uncalibrated one
    with pytest.raises(InferenceError, match="calibrate=true"):
        trust_predictor(OmegaConf.create({**base, "uncertainty": "none", "ood": True, "calibrate": True}), info, [],
                        load_predictor(info, "cpu", "fp32"))


def test_uncertainty_scores_report_coverage_before_calibration():
    truth = np.zeros((4, 1))
    pred = np.array([[0.1], [0.2], [0.3], [0.4]])
    sd = np.full((4, 1), 0.1)  # stored SD, already times 2
    row = uncertainty_scores(pred, truth, ["a"], sd, sd_scale=[2.0])
    assert row["coverage_2sd"] == pytest.approx(2 / 4)  # |error| <= 0.2
    assert row["coverage_2sd_uncalibrated"] == pytest.approx(1 / 4)  # |error| <= 0.1


class _ClosedForm(torch.nn.Module):
    """A stand-in for a closed-form model (ridge, forest): answers only, no features, and a
    context view (``views = 2``) as the forest has."""

    views = 2

    def __init__(self, answer: list[float]):
        super().__init__()
        self.patch_shape = (3, 9, 9)
        self.register_buffer("answer", torch.tensor(answer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (2, 3, 9, 9)  # the patch and its context view
        return self.answer.expand(len(x), -1)


def test_an_ensemble_of_closed_form_models_gives_their_mean_and_spread():
    from xpression.inference.uncertainty import TrustNet

    a, b = _ClosedForm([0.2, 0.8]), _ClosedForm([0.6, 0.4])
    net = TrustNet([a, b], "ensemble")
    assert net.views == 2  # read from the model itself, not only from a network's backbone
    out = net(torch.zeros(4, 2, 3, 9, 9))
    assert out.shape == (4, 4)
    torch.testing.assert_close(out[:, :2], torch.tensor([[0.4, 0.6]] * 4))
    torch.testing.assert_close(out[:, 2:], torch.full((4, 2), float(np.std([0.2, 0.6], ddof=1))))
    from types import SimpleNamespace

    from xpression.inference.predictor import InferenceError

    with pytest.raises(InferenceError, match=r"_ClosedForm has no features to measure the distance in .*; pass ood=false"):
        TrustNet([a, b], "ensemble", ood_fits=[SimpleNamespace(method="mahalanobis")] * 2)


def test_ood_on_a_model_without_features_is_one_line(tmp_path):
    from types import SimpleNamespace

    from xpression.inference.ood import ood_fit_for_run
    from xpression.inference.predictor import InferenceError

    with pytest.raises(InferenceError, match=r"has no features to measure the distance in .*fit it again\); pass ood=false"):
        ood_fit_for_run(SimpleNamespace(run_dir=tmp_path, checkpoint=tmp_path / "model.ckpt"), _ClosedForm([1.0]))

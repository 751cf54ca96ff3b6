"""Baselines without CT, per-volume scoring and paired statistics on constructed spot tables
whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from xpression.evaluation.baselines import TrainingSpots, baseline_predictions
from xpression.metrics import regression_metrics
from xpression.evaluation.scores import evaluate_spots, spot_baselines
from xpression.evaluation.stats import paired_difference

NAMES = ["a", "b", "c"]


def _field(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A composition that depends on (y, x) only: constant along z."""
    raw = np.stack([1.0 + np.sin(y / 150.0), 1.0 + np.cos(x / 200.0), 0.5 + (x + y) / 4000.0], axis=1)
    return raw / raw.sum(1, keepdims=True)


def _section(volume: str, z: float, rng: np.random.Generator, labels=None, pitch: float = 100.0) -> pd.DataFrame:
    yy, xx = np.meshgrid(np.arange(0, 1500, pitch), np.arange(0, 1500, pitch), indexing="ij")
    y, x = yy.ravel().astype(float), xx.ravel().astype(float)
    lab = _field(y, x) if labels is None else np.broadcast_to(labels, (len(y), 3))
    split = rng.choice(["train", "val", "test"], size=len(y), p=[0.6, 0.2, 0.2])
    table = pd.DataFrame({"section_id": f"{volume}_s0", "volume_id": volume, "split": split,
                          "z_um": z, "y_um": y, "x_um": x})
    for j, n in enumerate(NAMES):
        table[f"true/{n}"] = lab[:, j]
    return table


def test_extrusion_is_exact_for_labels_constant_along_z():
    rng = np.random.default_rng(0)
    table = _section("v0", 300.0, rng)
    train = TrainingSpots.from_table(table, [f"true/{n}" for n in NAMES])
    tr = table[table["split"] == "train"]
    # the training spots' own (y, x), 250 um above and below the section
    for dz in (-250.0, 250.0):
        pts = np.column_stack([np.full(len(tr), 300.0 + dz), tr["y_um"], tr["x_um"]])
        pred = baseline_predictions(train, "v0", pts)
        truth = _field(tr["y_um"].to_numpy(), tr["x_um"].to_numpy())
        np.testing.assert_allclose(pred["extrusion"], truth, atol=1e-12)
        m = regression_metrics(pred["extrusion"], truth, NAMES, kind="composition")
        assert m["pearson_mean"] == pytest.approx(1.0) and m["r2_mean"] == pytest.approx(1.0)
    # kNN with k=1 is the extrusion; with k=6 the mean of the 6 nearest in-plane
    pts = np.column_stack([np.full(5, 500.0), rng.uniform(0, 1400, (5, 2))])
    assert np.allclose(train.in_plane_mean("v0", pts, 1), baseline_predictions(train, "v0", pts)["extrusion"])
    uv = tr[["y_um", "x_um"]].to_numpy()
    order = np.argsort(np.linalg.norm(uv[None] - pts[:, None, 1:], axis=2), axis=1)[:, :6]
    expected = tr[[f"true/{n}" for n in NAMES]].to_numpy()[order].mean(1)
    np.testing.assert_allclose(baseline_predictions(train, "v0", pts, k=6)["knn"], expected)


def test_extrusion_follows_a_tilted_section_normal():
    """Labels constant along a tilted normal: extrusion projects along it, not along z."""
    n = np.array([np.cos(0.3), np.sin(0.3), 0.0])  # tilted about x
    v = np.cross(n, [0.0, 0.0, 1.0])
    uv = np.stack(np.meshgrid(np.arange(-600, 601, 100.0), np.arange(-600, 601, 100.0)), -1).reshape(-1, 2)
    pts = np.array([500.0, 700.0, 700.0]) + uv[:, :1] * v + uv[:, 1:] * np.array([0.0, 0.0, 1.0])
    labels = np.column_stack([uv[:, 0] + 1000.0, uv[:, 1] + 1000.0, np.full(len(uv), 5.0)])
    train = TrainingSpots(pts, labels, np.array(["s"] * len(pts)), np.array(["v"] * len(pts)))
    shifted = pts + 180.0 * n  # 180 um along the normal: same in-plane position
    np.testing.assert_allclose(train.in_plane_mean("v", shifted, 1), labels, atol=1e-9)
    along_z = pts + np.array([180.0, 0.0, 0.0])  # along z: the in-plane position moves, labels change
    assert not np.allclose(train.in_plane_mean("v", along_z, 1), labels)


def test_animal_mean_is_exact_when_the_field_depends_only_on_the_animal():
    rng = np.random.default_rng(1)
    a, b = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])
    table = pd.concat([_section("va", 200.0, rng, a), _section("vb", 300.0, rng, b)], ignore_index=True)
    train = TrainingSpots.from_table(table, [f"true/{n}" for n in NAMES])
    pts = np.column_stack([np.full(20, 450.0), rng.uniform(0, 1400, (20, 2))])
    for vid, truth in (("va", a), ("vb", b)):
        pred = baseline_predictions(train, vid, pts)["animal_mean"]
        m = regression_metrics(pred, np.broadcast_to(truth, pred.shape), NAMES, kind="composition")
        assert m["mse_mean"] == pytest.approx(0.0, abs=1e-24) and m["jsd_mean"] == pytest.approx(0.0, abs=1e-12)
        assert np.isnan(m["pearson_mean"])  # a constant prediction (and truth) has no correlation
    mean, own = train.animal_mean("vc")  # an animal without a training section: the training mean
    assert not own and np.allclose(mean, train.labels.mean(0))
    unseen = baseline_predictions(train, "vc", pts)
    assert set(unseen) == {"animal_mean", "train_mean"}  # no section of vc: no extrusion, no kNN


def test_extrusion_uses_the_nearest_trained_section_of_the_volume():
    rng = np.random.default_rng(2)
    low = _section("v", 100.0, rng, np.array([1.0, 0.0, 0.0]))
    high = _section("v", 900.0, rng, np.array([0.0, 0.0, 1.0]))
    high["section_id"] = "v_s1"
    train = TrainingSpots.from_table(pd.concat([low, high], ignore_index=True), [f"true/{n}" for n in NAMES])
    pts = np.array([[300.0, 500.0, 500.0], [700.0, 500.0, 500.0]])
    np.testing.assert_allclose(train.in_plane_mean("v", pts, 1), [[1, 0, 0], [0, 0, 1]])


def test_per_volume_scores_never_pool_animals():
    """Two animals whose compositions differ by an offset: pooled, a predictor that only knows
    the animal correlates strongly; per volume it has no correlation and scores R^2 = 0."""
    rng = np.random.default_rng(3)
    parts = []
    for vid, z, base in (("va", 200.0, np.array([0.8, 0.1, 0.1])), ("vb", 300.0, np.array([0.1, 0.4, 0.5]))):
        t = _section(vid, z, rng, base)
        noise = rng.normal(scale=0.05, size=(len(t), 3))
        for j, n in enumerate(NAMES):
            t[f"true/{n}"] = base[j] + noise[:, j]
        parts.append(t)
    table = pd.concat(parts, ignore_index=True)
    means = {v: table.loc[(table["volume_id"] == v) & (table["split"] == "train"), [f"true/{n}" for n in NAMES]].mean()
             for v in ("va", "vb")}
    for j, n in enumerate(NAMES):  # the "model" predicts its animal's training mean
        table[f"pred/{n}"] = [means[v].iloc[j] for v in table["volume_id"]]
    test = table["split"] == "test"
    pooled = regression_metrics(table.loc[test, [f"pred/{n}" for n in NAMES]].to_numpy(),
                                table.loc[test, [f"true/{n}" for n in NAMES]].to_numpy(), NAMES, min_truth_sd=0.0)
    assert pooled["pearson_mean"] > 0.9  # what pooling across animals would report
    result = evaluate_spots(table, NAMES, "composition")
    rows = [r for r in result["scores"] if r["where"] == "test spots" and r["predictor"] == "model"]
    assert {r["volume_id"] for r in rows} == {"va", "vb"}
    for r in rows:
        assert np.isnan(r["pearson_mean"])  # constant within the volume: n/a, not a number
        assert r["r2_mean"] < 0.05
        assert r["n"] == int(((table["volume_id"] == r["volume_id"]) & test).sum())
    # the model row equals the per-animal-mean baseline row, volume by volume
    for r in rows:
        base = [b for b in result["scores"] if b["where"] == "test spots" and b["predictor"] == "animal_mean"
                and b["volume_id"] == r["volume_id"]][0]
        assert base["mse_mean"] == pytest.approx(r["mse_mean"])
    assert result["splits"]["test"]["n_volumes"] == 2


def test_spot_baselines_columns_and_no_self_copy_on_training_spots():
    rng = np.random.default_rng(4)
    table = _section("v0", 300.0, rng)
    for n in NAMES:
        table[f"pred/{n}"] = table[f"true/{n}"]
    out = spot_baselines(table, NAMES)
    assert {f"extrusion/{n}" for n in NAMES} <= set(out.columns)
    result = evaluate_spots(table, NAMES, "composition")
    train_rows = {r["predictor"] for r in result["scores"] if r["where"] == "train spots"}
    assert "extrusion" not in train_rows and "knn" not in train_rows and "model" in train_rows


def test_paired_difference_on_a_constructed_example():
    a = {0: 0.60, 1: 0.55, 2: 0.62, 3: 0.58, 4: 0.61}
    b = {0: 0.50, 1: 0.47, 2: 0.50, 3: 0.49, 4: 0.52, 7: 0.9}  # seed 7 has no partner: ignored
    d = np.array([a[s] - b[s] for s in range(5)])
    diff = paired_difference(a, b)
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert diff.n == 5 and diff.mean == pytest.approx(d.mean())
    assert (diff.lo, diff.hi) == pytest.approx((d.mean() - half, d.mean() + half))
    assert diff.verdict == "higher" and "higher" in diff.text()
    assert paired_difference(b, a).verdict == "lower"
    noisy = paired_difference({0: 0.5, 1: 0.7, 2: 0.4}, {0: 0.55, 1: 0.5, 2: 0.45})  # differences -0.05, +0.2, -0.05
    assert noisy.lo < 0 < noisy.hi and noisy.verdict == "level"
    one = paired_difference({0: 0.5}, {0: 0.4})
    assert one.n == 1 and one.verdict == "n<2" and np.isnan(one.lo)
    assert paired_difference({0: np.nan}, {0: 0.4}).n == 0


def test_section_extrusion_uses_every_spot_and_never_scores_the_section_itself():
    rng = np.random.default_rng(7)
    table = _section("v0", 300.0, rng)
    for n in NAMES:
        table[f"pred/{n}"] = table[f"true/{n}"]
    labels = [f"true/{n}" for n in NAMES]
    train = TrainingSpots.from_table(table, labels)
    section = TrainingSpots.from_table(table, labels, split=None)
    held = table[table["split"] != "train"]
    pts = np.column_stack([np.full(len(held), 450.0), held["y_um"], held["x_um"]])
    pred = baseline_predictions(train, "v0", pts, section=section)
    np.testing.assert_allclose(pred["section_extrusion"], held[labels].to_numpy())  # held-out labels copied up
    assert not np.allclose(pred["extrusion"], held[labels].to_numpy())  # training spots only: not exact
    result = evaluate_spots(table, NAMES, "composition")
    assert "section_extrusion" not in {r["predictor"] for r in result["scores"]}

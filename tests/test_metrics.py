"""Metrics against scipy / sklearn, and the NaN policy for constant columns."""

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import mean_squared_error, r2_score

from xpression.evaluation import (js_divergence, pearson_per_target, r2_per_target,
                                  regression_metrics, spearman_per_target)

NAMES = ["alveolar", "airway", "vascular", "immune"]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(200, 4))
    p = y + rng.normal(scale=0.8, size=y.shape)
    p[:, 3] = np.round(p[:, 3])  # ties for Spearman
    return p, y


def test_against_scipy_sklearn(data):
    p, y = data
    m = regression_metrics(p, y, NAMES, kind="log_expression")
    for j, n in enumerate(NAMES):
        assert m[f"pearson/{n}"] == pytest.approx(pearsonr(p[:, j], y[:, j])[0], abs=1e-10)
        assert m[f"spearman/{n}"] == pytest.approx(spearmanr(p[:, j], y[:, j])[0], abs=1e-10)
        assert m[f"r2/{n}"] == pytest.approx(r2_score(y[:, j], p[:, j]), abs=1e-10)
        assert m[f"mse/{n}"] == pytest.approx(mean_squared_error(y[:, j], p[:, j]), abs=1e-10)
    assert m["r2_mean"] == pytest.approx(r2_score(y, p, multioutput="uniform_average"))
    assert m["pearson_mean"] == pytest.approx(np.mean([m[f"pearson/{n}"] for n in NAMES]))
    assert "jsd_mean" not in m and "dominant_acc" not in m


def test_composition_metrics():
    rng = np.random.default_rng(1)
    y = rng.dirichlet(np.ones(4) * 0.5, size=100)
    p = rng.dirichlet(np.ones(4), size=100)
    p[:10] = y[:10]
    m = regression_metrics(p, y, NAMES, kind="composition")
    ref = np.mean([jensenshannon(a, b, base=2) ** 2 for a, b in zip(p, y)])
    assert m["jsd_mean"] == pytest.approx(ref, abs=1e-10)
    assert m["dominant_acc"] == pytest.approx(np.mean(p.argmax(1) == y.argmax(1)))
    assert js_divergence(y[:5], y[:5]) == pytest.approx(np.zeros(5), abs=1e-12)
    # disjoint supports: 1 bit
    assert js_divergence(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))[0] == pytest.approx(1.0)


def test_constant_columns_are_nan_or_undefined_value():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(50, 3))
    p = y + rng.normal(size=y.shape)
    p[:, 0] = 0.3   # constant prediction
    y[:, 1] = 2.0   # constant target
    assert np.isnan(pearson_per_target(p, y)[:2]).all()
    assert np.isnan(spearman_per_target(p, y)[:2]).all()
    r2 = r2_per_target(p, y)
    assert np.isnan(r2[1]) and np.isfinite(r2[[0, 2]]).all()
    m = regression_metrics(p, y, ["a", "b", "c"])
    assert np.isnan(m["pearson/a"]) and np.isnan(m["pearson/b"])
    assert m["pearson_mean"] == pytest.approx(pearsonr(p[:, 2], y[:, 2])[0])  # defined ones only
    m0 = regression_metrics(p, y, ["a", "b", "c"], undefined=0.0)
    assert m0["pearson/a"] == 0.0 and m0["pearson/b"] == 0.0
    assert m0["pearson_mean"] == m["pearson_mean"]
    none = regression_metrics(np.ones((4, 2)), np.ones((4, 2)), ["a", "b"], undefined=0.0)
    assert none["pearson_mean"] == 0.0 and none["r2_mean"] == 0.0 and none["mse_mean"] == 0.0


def test_shape_errors():
    with pytest.raises(ValueError, match="names"):
        regression_metrics(np.zeros((3, 2)), np.zeros((3, 2)), ["a"])
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        regression_metrics(np.zeros((3, 2)), np.zeros((3, 3)), ["a", "b"])


def test_macro_auc_against_sklearn():
    from sklearn.metrics import roc_auc_score

    from xpression.evaluation import macro_auc

    rng = np.random.default_rng(5)
    y = rng.dirichlet(np.ones(4) * 0.7, size=300)
    p = np.round(0.6 * y + 0.4 * rng.dirichlet(np.ones(4), size=300), 2)  # rounding makes ties
    dom = y.argmax(1)
    ref = np.mean([roc_auc_score(dom == k, p[:, k]) for k in range(4) if 0 < (dom == k).sum() < 300])
    assert macro_auc(p, y) == pytest.approx(ref, abs=1e-12)
    m = regression_metrics(p, y, NAMES, kind="composition")
    assert m["macro_auc"] == pytest.approx(ref, abs=1e-12)
    assert np.isnan(macro_auc(p, np.tile([0.7, 0.1, 0.1, 0.1], (300, 1))))  # one program dominates everywhere


def test_flat_truth_has_no_correlation():
    """A program whose truth sd is below the threshold is n/a for r, rho and R^2, not a number."""
    from xpression.evaluation import MIN_TRUTH_SD, format_score

    rng = np.random.default_rng(6)
    y = rng.normal(size=(100, 3))
    y[:, 1] = 0.3 + rng.normal(scale=MIN_TRUTH_SD / 4, size=100)  # hardly varies
    p = y + rng.normal(scale=0.1, size=y.shape)
    m = regression_metrics(p, y, ["a", "b", "c"])
    for key in ("pearson", "spearman", "r2"):
        assert np.isnan(m[f"{key}/b"]) and np.isfinite(m[f"{key}/a"])
    assert np.isfinite(m["mse/b"])
    assert m["pearson_mean"] == pytest.approx(np.mean([m["pearson/a"], m["pearson/c"]]))
    loose = regression_metrics(p, y, ["a", "b", "c"], min_truth_sd=0.0)
    assert np.isfinite(loose["pearson/b"])  # a number, but one that measures noise
    assert format_score(m["pearson/b"]) == "n/a" and format_score(0.51234) == "0.512"

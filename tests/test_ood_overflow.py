"""The ood channel of a trust map beyond float16's range: stored finite, scored on every tissue point.

A forest ensemble's Mahalanobis ood reaches 1e15 training spreads (a feature constant on its few
training spots up to rounding is standardised by a spread of ~1e-16); a float16 store turned
5104 of 8319 tissue points of a volume into +inf and the uncertainty table then scored the other
3215 alone.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from xpression.evaluation.maps import score_uncertainty
from xpression.evaluation.uncertainty import uncertainty_scores
from xpression.inference.grid import OutputGrid, Tiling
from xpression.inference.ood import constant_features, mahalanobis, warn_constant_features
from xpression.inference.writers import MapStore, cast_for_store, read_maps, store_dtype

F16_MAX = 65504.0
GRID = OutputGrid((2, 1, 1), (5, 4, 4), (4, 6, 8), (6.4, 3.2, 3.2), (10.0, 0.0, 0.0))
CHANNELS = ["a", "b", "a_sd", "b_sd", "ood"]


def _trust_store(path, values: np.ndarray, channels=CHANNELS, levels: int = 2) -> MapStore:
    store = MapStore.open(path, GRID, GRID.shape, channels, {"run_dir": "r"}, {"mode": "patch"}, levels=levels)
    for tile in Tiling(GRID.shape, GRID.shape):
        store.write_tile(tile, values)
    store.finalize([0])
    return store


def _values(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Means, SDs and an ood spanning 1 to 3e15 (half the tissue above 65504); NaN outside a
    tissue mask of known size. Returns (values (5, *grid), tissue mask)."""
    tissue = rng.random(GRID.shape) < 0.6
    a = rng.uniform(0, 1, GRID.shape)
    v = np.stack([a, 1 - a, rng.uniform(0.01, 0.1, GRID.shape), rng.uniform(0.01, 0.1, GRID.shape),
                  10.0 ** rng.uniform(0, 15.5, GRID.shape)]).astype(np.float32)
    v[:, ~tissue] = np.nan
    return v, tissue


def test_an_ood_above_float16_round_trips_through_the_map_store_finite(tmp_path):
    values, tissue = _values(np.random.default_rng(0))
    assert (values[-1][tissue] > F16_MAX).mean() > 0.4  # the case that overflowed
    store = _trust_store(tmp_path / "maps.ome.zarr", values)
    arr, meta = read_maps(store.path)
    assert arr.dtype == np.float32 and meta["dtype"] == "float32"
    got = np.asarray(arr[:])
    assert np.isfinite(got[:, tissue]).all() and np.isnan(got[:, ~tissue]).all()
    np.testing.assert_allclose(got[-1][tissue], values[-1][tissue], rtol=1e-7)  # float32 exactly
    assert float(np.nanmax(got[-1])) == pytest.approx(float(np.nanmax(values[-1])), rel=1e-7)
    level1 = np.asarray(store.read(1)[-1])
    assert np.isfinite(level1[~np.isnan(level1)]).all() and np.nanmax(level1) > F16_MAX


def test_stores_without_an_unbounded_channel_stay_float16(tmp_path):
    assert store_dtype(["a", "a_sd"]) == "float16" and store_dtype(CHANNELS) == "float32"
    values, _ = _values(np.random.default_rng(1))
    arr, meta = read_maps(_trust_store(tmp_path / "m.ome.zarr", values[:4], CHANNELS[:4]).path)
    assert arr.dtype == np.float16 and meta["dtype"] == "float16"


def test_a_value_beyond_the_store_dtype_is_warned_about_by_channel(caplog):
    values = np.array([[[1.0, 2.0]], [[7e4, np.nan]], [[1e5, 3e5]]], np.float32)
    with caplog.at_level(logging.WARNING, logger="xpression.inference.writers"):
        out = cast_for_store(values, np.float16, ["a", "b", "ood"], "store x")
    assert out.dtype == np.float16 and np.isinf(out[1, 0, 0]) and np.isinf(out[2]).all()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "store x: 1 value(s) of channel 'b' are infinite as float16" in lines[0]
    assert "store x: 2 value(s) of channel 'ood'" in lines[1]


def test_the_uncertainty_table_counts_every_tissue_point_of_a_large_ood(tmp_path):
    values, tissue = _values(np.random.default_rng(2))
    store = _trust_store(tmp_path / "maps.ome.zarr", values)
    trust = {"targets": ["a", "b"], "sd_channels": ["a_sd", "b_sd"], "ood_channel": "ood", "ood": {"train_p99": 3.25}}
    row = score_uncertainty(store.read(0), GRID, trust, CHANNELS, lambda p: np.full((len(p), 2), 0.5), ["a", "b"], "v")
    assert row["n"] == int(tissue.sum()) == 110
    assert row["n_nonfinite_ood"] == 0 and row["n_nonfinite_sd"] == 0
    ood = values[-1][tissue].astype(np.float64)
    assert row["ood_mean"] == pytest.approx(ood.mean(), rel=1e-6)
    assert row["ood_above_train_p99"] == pytest.approx(np.mean(ood > 3.25))


def test_uncertainty_scores_count_and_warn_non_finite_values_and_drop_none(caplog):
    truth = np.zeros((5, 1))
    pred = np.array([[0.1], [0.2], [0.3], [0.4], [0.5]])
    sd = np.array([[0.1], [np.nan], [0.2], [0.2], [0.3]])
    ood = np.array([1.0, 2.0, 3.0, np.inf, np.inf])
    with caplog.at_level(logging.WARNING, logger="xpression.evaluation.uncertainty"):
        row = uncertainty_scores(pred, truth, ["a"], sd, ood, ood_threshold=2.5, where="mock_0")
    assert row["n"] == 5 and row["n_nonfinite_sd"] == 1 and row["n_nonfinite_ood"] == 2
    assert row["ood_mean"] == np.inf and row["ood_p95"] == np.inf
    assert row["ood_above_train_p99"] == pytest.approx(3 / 5)  # 3.0 and both inf
    # inf ranks above every finite value: ranks 1, 2, 3, 4.5, 4.5 against 1..5
    assert row["spearman_ood_error"] == pytest.approx(9.5 / np.sqrt(95))
    assert np.isnan(row["sd_mean"]) and row["coverage_2sd"] == pytest.approx(4 / 5)  # 0.1, 0.3, 0.4, 0.5 within 2 SD; the NaN SD covers nothing
    msgs = [r.getMessage() for r in caplog.records]
    assert any("(mock_0): 2 of 5 points have a non-finite ood (2 +-inf, 0 NaN values)" in m for m in msgs), msgs
    assert any("(mock_0): 1 of 5 points have a non-finite sd (0 +-inf, 1 NaN values)" in m for m in msgs), msgs


def test_mahalanobis_stays_finite_where_its_square_overflows_float32():
    feats = torch.tensor([[3e20, 4e20], [3.0, 4.0], [0.0, 0.0]])
    d = mahalanobis(feats, torch.zeros(2), torch.eye(2) / 2)
    assert torch.isfinite(d).all()
    np.testing.assert_allclose(d.numpy(), [2.5e20, 2.5, 0.0], rtol=1e-6)


class _Forest(torch.nn.Module):
    """A closed-form model's feature spread: feature 1 constant on the training spots up to rounding."""

    input_spec = None

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("feature_spread", torch.tensor([1.0, 2.78e-16, 0.5, 1.6e-6], dtype=torch.float64))


def test_features_constant_up_to_rounding_are_named_and_warned_about(caplog):
    assert constant_features(_Forest()) == [("feature 1", pytest.approx(2.78e-16))]
    assert constant_features(torch.nn.Linear(2, 2)) == []  # a network: no per-feature spread
    with caplog.at_level(logging.WARNING, logger="xpression.inference.ood"):
        warn_constant_features(_Forest(), " (run r)")
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("ood (run r): 1 of 4 features are constant on the training spots up to rounding "
                          "(e.g. feature 1, sd 2.78e-16)")


def test_an_infinite_ood_in_an_older_float16_store_is_counted_not_dropped(caplog):
    """Maps written as float16 before ood was stored as float32 hold +inf at the points beyond
    65504: the tissue is where the mean channels are finite, so those points are scored (as inf)
    and counted, not left out of the table."""
    values, tissue = _values(np.random.default_rng(3))
    old = values.astype(np.float16)  # what such a store holds
    beyond = int((old[-1][tissue] == np.inf).sum())
    assert beyond > 30
    trust = {"targets": ["a", "b"], "sd_channels": ["a_sd", "b_sd"], "ood_channel": "ood", "ood": {"train_p99": 3.25}}
    with caplog.at_level(logging.WARNING, logger="xpression.evaluation.uncertainty"):
        row = score_uncertainty(old, GRID, trust, CHANNELS, lambda p: np.full((len(p), 2), 0.5), ["a", "b"], "mock_0")
    assert row["n"] == int(tissue.sum()) and row["n_nonfinite_ood"] == beyond and row["ood_mean"] == np.inf
    assert any(f"(mock_0): {beyond} of {int(tissue.sum())} points have a non-finite ood" in r.getMessage()
               for r in caplog.records)


def test_a_feature_constant_up_to_rounding_standardises_by_one():
    """Six training spots on which a feature is 0.1 but for float error (spread ~1e-17) are what
    gave a forest's ood 1e13-1e15: that feature counts as constant, the others keep their spread."""
    from xpression.models.closed_form import feature_spread

    rng = np.random.default_rng(0)
    feats = np.column_stack([rng.normal(5.0, 2.0, 6), np.full(6, 0.1) + np.array([0, 1, 0, 1, 0, 1]) * 2.8e-17,
                             np.zeros(6), rng.normal(0.0, 1e-6, 6)])
    assert 0 < feats[:, 1].std() < 1e-16
    spread = feature_spread(feats)
    np.testing.assert_array_equal(spread[1:3], [1.0, 1.0])
    assert spread[0] == pytest.approx(feats[:, 0].std()) and spread[3] == pytest.approx(feats[:, 3].std())

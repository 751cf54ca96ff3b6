"""An ensemble's spot table: the members' mean predictions, scored only on spots no member
trained on; the baselines learn from every spot some member trained on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xpression.evaluation.ensemble_spots import ensemble_spot_table
from xpression.evaluation.scores import evaluate_spots

TARGETS = ["a", "b"]


def _member(path, splits, pred, extra_spot=False):
    n = len(splits)
    rng = np.random.default_rng(0)
    truth = rng.dirichlet([1, 1], size=n)
    table = pd.DataFrame({"section_id": "s0", "volume_id": "v0", "barcode": [f"bc{i}" for i in range(n)],
                          "z_um": 100.0, "y_um": np.arange(n) * 50.0, "x_um": (np.arange(n) % 3) * 50.0, "split": splits,
                          "true/a": truth[:, 0], "true/b": truth[:, 1], "pred/a": pred[:, 0], "pred/b": pred[:, 1]})
    if extra_spot:  # a spot this member alone scored
        table = pd.concat([table, table.iloc[[0]].assign(barcode="only-here")], ignore_index=True)
    path.mkdir(parents=True, exist_ok=True)
    table.to_csv(path / "predictions.csv", index=False)
    return table


def test_members_are_averaged_and_held_out_means_held_out_by_every_member(tmp_path):
    splits0 = ["train", "train", "val", "val", "test", "test", "test", "val", "excluded", "excluded"] * 3
    splits1 = ["train", "val", "train", "val", "test", "val", "test", "test", "excluded", "val"] * 3
    p0 = np.tile([[0.2, 0.8]], (30, 1))
    p1 = np.tile([[0.6, 0.4]], (30, 1))
    a = _member(tmp_path / "0", splits0, p0)
    _member(tmp_path / "1", splits1, p1, extra_spot=True)
    table = ensemble_spot_table([tmp_path / "0", tmp_path / "1"], TARGETS)
    assert len(table) == 30 and list(table["barcode"]) == list(a["barcode"])  # the spot only member 1 has is dropped
    np.testing.assert_allclose(table[["pred/a", "pred/b"]].to_numpy(), [[0.4, 0.6]] * 30)
    expected = ["train", "train", "train", "val", "test", "val", "test", "val", "excluded", "excluded"] * 3
    assert list(table["split"]) == expected
    np.testing.assert_allclose(table["true/a"], a["true/a"])
    rows = evaluate_spots(table, TARGETS, "composition")["scores"]
    held = {r["where"]: r["n"] for r in rows if r["predictor"] == "model"}
    assert held == {"train spots": 9, "val spots": 9, "test spots": 6}


def test_a_member_without_predictions_gives_none(tmp_path):
    _member(tmp_path / "0", ["train", "val"], np.zeros((2, 2)))
    (tmp_path / "1").mkdir()
    assert ensemble_spot_table([tmp_path / "0", tmp_path / "1"], TARGETS) is None
    assert ensemble_spot_table([tmp_path / "0"], ["a", "missing"]) is None

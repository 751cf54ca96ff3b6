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


def test_infer_scores_an_ensemble_on_the_spots_no_member_trained_on(tmp_path):
    """End to end: two members with different splits; `infer.py`'s evaluation scores the mean of
    their spot predictions on the spots both held out, and its plane baselines learn from every
    spot either member trained on."""
    import anndata as ad

    from tests._inference_models import infer_config, make_run, two_volume_cohort
    from xpression.data.manifest import load_manifest
    from xpression.evaluation.maps import evaluate_inference
    from xpression.inference.pipeline import infer
    from xpression.phantom import Phantom

    cohort_path = two_volume_cohort(tmp_path / "cohort")
    cohort = load_manifest(cohort_path)
    section = cohort.sections[0]
    a = ad.read_h5ad(section.adata)
    pos = np.asarray(a.obsm["ct_position_um"], float)
    names = ["alveolar", "airway", "vascular", "infected", "immune", "remodelling"]
    truth = Phantom.from_spec(cohort.truth.spec).programs_at(section.volume_id, pos)
    truth = truth[:, [Phantom.from_spec(cohort.truth.spec).program_names.index(n) for n in names]]
    rng = np.random.default_rng(0)
    root = tmp_path / "multirun"
    splits = []
    for i in range(2):
        run = make_run(root / str(i), cohort_path, seed=i)
        split = rng.choice(["train", "val", "test"], size=len(pos), p=[0.5, 0.25, 0.25])
        pred = truth + rng.normal(0, 0.05, truth.shape)
        table = pd.DataFrame({"section_id": section.id, "volume_id": section.volume_id, "barcode": a.obs_names,
                              "z_um": pos[:, 0], "y_um": pos[:, 1], "x_um": pos[:, 2], "split": split})
        for j, n in enumerate(names):
            table[f"true/{n}"], table[f"pred/{n}"] = truth[:, j], pred[:, j]
        table.to_csv(run / "predictions.csv", index=False)
        splits.append(split)
    out = tmp_path / "maps"
    cfg = infer_config(run=str(root), uncertainty="ensemble", output=str(out), volumes=[section.volume_id],
                       figures=False, ct_preview=False, evaluate=True)
    evaluate_inference(cfg, infer(cfg))
    rows = pd.read_csv(out / "evaluation.csv")
    spots = rows[rows["where"].isin(["val spots", "test spots"]) & (rows["predictor"] == "model")].set_index("where")["n"]
    both_test = int(((splits[0] == "test") & (splits[1] == "test")).sum())
    held = int((np.isin(splits[0], ["val", "test"]) & np.isin(splits[1], ["val", "test"])).sum())
    assert spots["test spots"] == both_test and spots["val spots"] == held - both_test
    # the members' mean of noisy predictions of the truth scores well on those spots
    r = rows[(rows["where"] == "test spots") & (rows["predictor"] == "model")]["pearson_mean"].iloc[0]
    assert r > 0.8
    assert (rows["predictor"] == "extrusion").any()  # plane baselines from the members' union of training spots

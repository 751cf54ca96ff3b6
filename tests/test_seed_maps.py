"""benchmarks/seed_maps.py on hand-made evaluation tables: runs found by their seed, rows paired by
seed per volume and place (unseen volumes, whose distance is empty, included), baselines beside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests._scripts import load_benchmark


def _module():
    return load_benchmark("seed_maps")


def _multirun(root: Path, model_r: dict[int, float], extrusion_r: dict[int, float], unseen_r: dict[int, float]) -> Path:
    """One run folder per seed (named apart from its seed) with config.yaml and maps/evaluation.csv."""
    for i, seed in enumerate(model_r):
        run = root / f"job{10 + i}"
        (run / "maps").mkdir(parents=True)
        (run / "config.yaml").write_text(f"seed: {seed}\n")
        (run / ".hydra").mkdir()  # as a Hydra multirun job has it: its own config.yaml is no run
        (run / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")
        rows = [
            {"volume_id": "a", "where": "plane", "distance_um": 100.0, "predictor": "model", "pearson_mean": model_r[seed], "r2_mean": 0.1},
            {"volume_id": "a", "where": "plane", "distance_um": 100.0, "predictor": "extrusion", "pearson_mean": extrusion_r[seed], "r2_mean": -0.2},
            {"volume_id": "a", "where": "plane", "distance_um": 100.0, "predictor": "section_extrusion", "pearson_mean": 0.9, "r2_mean": 0.5},
            {"volume_id": "a", "where": "plane", "distance_um": 100.0, "predictor": "train_mean", "pearson_mean": np.nan, "r2_mean": -0.3},
            {"volume_id": "b", "where": "volume", "distance_um": np.nan, "predictor": "model", "pearson_mean": unseen_r[seed], "r2_mean": 0.0},
            {"volume_id": "b", "where": "volume", "distance_um": np.nan, "predictor": "train_mean", "pearson_mean": np.nan, "r2_mean": -1.0},
        ]
        pd.DataFrame(rows).to_csv(run / "maps" / "evaluation.csv", index=False)
    return root


def test_rows_are_paired_by_seed_with_the_baselines_beside(tmp_path):
    m = _module()
    a = _multirun(tmp_path / "A", {0: 0.50, 1: 0.60, 2: 0.70}, {0: 0.3, 1: 0.3, 2: 0.3}, {0: 0.4, 1: 0.5, 2: 0.6})
    # B's seeds are listed in another order: pairing must follow the seeds, not the folders
    b = _multirun(tmp_path / "B", {2: 0.80, 0: 0.60, 1: 0.70}, {2: 0.3, 0: 0.3, 1: 0.3}, {2: 0.6, 0: 0.4, 1: 0.5})
    assert sorted(m.runs_by_seed(b)) == [0, 1, 2]
    table = m.summary(m.scores(m.runs_by_seed(a)), m.scores(m.runs_by_seed(b)), "A", "B").set_index("volume")
    plane, unseen = table.loc["a"], table.loc["b"]
    assert plane["um"] == "100" and unseen["um"] == "" and plane["seeds"] == 3
    assert plane["A r"].startswith("0.600 ± 0.100 (0.100)") and plane["B r"].startswith("0.700 ± 0.100")
    # B - A is +0.1 in every seed: no spread, so the interval is the point itself
    assert plane["B - A"].startswith("+0.100 [+0.100, +0.100] higher")
    assert unseen["B - A"] == "+0.000 [+0.000, +0.000] level"  # the same r in every seed
    assert plane["extrusion r"] == "0.300" and plane["all-spot extrusion r"] == "0.900" and plane["training mean R²"] == "-0.300"
    assert plane["B - extrusion"].startswith("+0.400 [")
    assert unseen["extrusion r"] == "-" and unseen["training mean R²"] == "-1.000" and unseen["B - extrusion"] == "-"
    assert m.markdown(table.reset_index()).splitlines()[0].startswith("| volume | where | um | seeds |")


def test_a_folder_without_runs_or_maps_is_one_line(tmp_path):
    m = _module()
    with pytest.raises(SystemExit, match="holds no train.py runs"):
        m.runs_by_seed(tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(SystemExit, match="evaluation.csv is missing; sweep the run first"):
        m.scores(m.runs_by_seed(tmp_path))

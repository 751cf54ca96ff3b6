"""benchmarks/label_curve.py: training spots and per-volume scores read from run folders, mean and
sd over seeds, never pooled across volumes; a figure and a table written; bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests._scripts import load_benchmark


def _module():
    return load_benchmark("label_curve")


def _run(folder: Path, seed: int, train: dict[str, int], scores: list[dict]) -> None:
    """A run folder as train.py leaves it, with only what the curve reads."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}"]))
    (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    (folder / "metrics.json").write_text(json.dumps({"held_out_split": "test", "scores": scores}))
    rows = [{"volume_id": v, "split": "train"} for v, n in train.items() for _ in range(n)]
    rows += [{"volume_id": "infected_0", "split": "test"}] * 3
    pd.DataFrame(rows).to_csv(folder / "predictions.csv", index=False)


def _score(vid, where, r, predictor="model", distance=None):
    return {"volume_id": vid, "condition": vid.split("_")[0], "where": where, "distance_um": distance,
            "predictor": predictor, "n": 10, "pearson_mean": r, "r2_mean": r - 1}


def test_label_curve_reads_spots_and_scores_per_volume(tmp_path):
    half, full = tmp_path / "half", tmp_path / "full"
    for seed, (a, b) in enumerate([(0.40, 0.50), (0.50, 0.70)]):
        _run(half / str(seed), seed, {"infected_0": 100, "mock_0": 50},
             [_score("infected_0", "plane", a, distance=150.0), _score("infected_0", "plane", a + 0.1, distance=200.0),
              _score("infected_0", "plane", 0.3, "extrusion", 150.0), _score("mock_1", "volume", b),
              _score("infected_0", "test spots", 0.2)])
        _run(full / str(seed), seed, {"infected_0": 200, "mock_0": 100},
             [_score("infected_0", "plane", a + 0.2, distance=150.0), _score("mock_1", "volume", b + 0.1),
              _score("infected_0", "val spots", 0.9)])
    out = tmp_path / "out"
    mod = _module()
    assert mod.main([str(half), str(full), "--names", "half", "full", "--out", str(out)]) == 0
    text = (out / "label_curve.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    # half: planes = mean over distances, then over seeds: (0.45 + 0.55) / 2; sd over the two seeds
    assert "150 (infected_0 100, mock_0 50)" in rows["half"]
    assert "0.500 ± 0.071 (extrusion 0.300)" in rows["half"]
    assert "0.600 ± 0.141" in rows["half"]  # mock_1 unseen: 0.5 and 0.7
    assert "300 (infected_0 200, mock_0 100)" in rows["full"]
    assert "0.650 ± 0.071" in rows["full"] and "0.700 ± 0.141" in rows["full"]
    assert "0.200 ± 0.000" in rows["half"]  # held-out (test) spots; full's val rows are not held-out
    assert rows["full"].count(" - ") == 1
    assert (out / "label_curve.png").stat().st_size > 10_000


def test_label_curve_refuses_a_folder_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no scored runs"):
        _module().main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        _module().main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")])


def test_label_curve_names_a_run_without_its_predictions(tmp_path):
    run = tmp_path / "cfg" / "0"
    _run(run, 0, {"infected_0": 10}, [_score("mock_1", "volume", 0.5)])
    (run / "predictions.csv").unlink()
    with pytest.raises(SystemExit, match="no predictions.csv"):
        _module().main([str(tmp_path / "cfg"), "--out", str(tmp_path / "out")])


def test_label_curve_overwrites_nothing(tmp_path, capsys):
    run = tmp_path / "cfg" / "0"
    _run(run, 0, {"infected_0": 10}, [_score("mock_1", "volume", 0.5)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "label_curve.md").write_text("mine")
    with pytest.raises(SystemExit):
        _module().main([str(tmp_path / "cfg"), "--out", str(out)])
    assert "label_curve.md exists; choose another --out (nothing is overwritten)" in capsys.readouterr().err
    assert (out / "label_curve.md").read_text() == "mine" and not (out / "label_curve.png").exists()

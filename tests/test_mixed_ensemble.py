"""benchmarks/mixed_ensemble.py on hand-made probe tables: the mix's weights, the pairing by seed
and the refusal of runs that scored different points."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests._scripts import load_benchmark

NAMES = ["alveolar", "airway", "infected"]


def _run(folder: Path, seed: int, model: np.ndarray, truth: np.ndarray, z: np.ndarray) -> None:
    run = folder / str(seed)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"seed: {seed}\n")
    (run / "metrics.json").write_text(json.dumps({"target_kind": "composition"}))
    n = len(truth)
    table = pd.DataFrame({"volume_id": ["mock_0"] * (n // 2) + ["mock_1"] * (n - n // 2),
                          "where": ["plane"] * (n // 2) + ["volume"] * (n - n // 2),
                          "distance_um": [150.0] * (n // 2) + [np.nan] * (n - n // 2),
                          "z_um": z, "y_um": np.arange(n, dtype=float), "x_um": np.arange(n, dtype=float)})
    for j, name in enumerate(NAMES):
        table[f"true/{name}"] = truth[:, j]
        table[f"model/{name}"] = model[:, j]
        table[f"extrusion/{name}"] = truth[::-1, j]
    table.to_csv(run / "probe_points.csv", index=False)


def _compositions(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.random((n, len(NAMES)))
    return x / x.sum(1, keepdims=True)


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.random(40) * 100
    for seed in (0, 1, 2):
        truth = _compositions(rng, 40)
        _run(tmp_path / "A", seed, 0.7 * truth + 0.3 * _compositions(rng, 40), truth, z)
        _run(tmp_path / "B", seed, 0.5 * truth + 0.5 * _compositions(rng, 40), truth, z)
    return tmp_path


def _mix(folders: Path, weight: float, monkeypatch, capsys) -> tuple[int, str, str]:
    """The script's main() in this process (a subprocess costs seconds of imports)."""
    module = load_benchmark("mixed_ensemble")
    monkeypatch.setattr(sys, "argv", ["mixed_ensemble.py", str(folders / "A"), str(folders / "B"), "--weight-b", str(weight),
                                      "--csv", str(folders / "out.csv")])
    code = 0
    try:
        module.main()
    except SystemExit as exc:  # the script's one-line errors
        code, message = 1, str(exc)
    out = capsys.readouterr()
    return code, out.out, message if code else out.err


def test_weights_zero_and_one_give_each_model(folders, monkeypatch, capsys):
    for weight, same in ((0.0, "A"), (1.0, "B")):
        code, stdout, stderr = _mix(folders, weight, monkeypatch, capsys)
        assert code == 0, stderr
        out = pd.read_csv(folders / "out.csv")
        mix = out[out.predictor == "mix"].set_index(["seed", "volume_id"])["pearson_mean"]
        ref = out[out.predictor == same].set_index(["seed", "volume_id"])["pearson_mean"]
        assert len(mix) == 6 and np.allclose(mix.sort_index(), ref.sort_index())
    assert "mock_0" in stdout and "mock_1" in stdout
    assert any(verdict in stdout for verdict in ("level", "higher", "lower"))


def test_runs_that_scored_other_points_are_refused(folders, monkeypatch, capsys):
    table = pd.read_csv(folders / "B" / "1" / "probe_points.csv")
    table["y_um"] += 5.0
    table.to_csv(folders / "B" / "1" / "probe_points.csv", index=False)
    code, _, message = _mix(folders, 0.5, monkeypatch, capsys)
    assert code != 0 and "seed 1" in message and "different probe points" in message


def test_a_weight_outside_zero_one_is_refused(folders, monkeypatch, capsys):
    code, _, message = _mix(folders, 1.5, monkeypatch, capsys)
    assert code != 0 and "--weight-b must lie in [0, 1]" in message

"""The benchmark report on fake run folders with known numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from xpression.evaluation.benchmark import collect_runs, main, summarise_runs, write_report


def _fake_run(folder: Path, overrides: list[str], held_out: float, off: dict, seconds: float = 10.0) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    seed = int([o for o in overrides if o.startswith("seed=")][0].split("=")[1])
    (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "model": {"backbone": {"name": "cnn3d"}}}))
    metrics = {"pearson_mean": held_out, "train_seconds": seconds, "epochs": 3, "parameters": 12345,
               "off_plane": {**off, "n_points": {k: 10 for k in off}, "truth": "spot-averaged"}}
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    root = tmp_path / "backbones"
    values = {"cnn3d": [0.5, 0.6, 0.7], "unet": [0.2, 0.3, 0.4]}
    job = 0
    for model, scores in values.items():
        for seed, s in enumerate(scores):
            _fake_run(root / str(job), [f"model={model}", f"seed={seed}", "experiment=backbones", "debug=smoke"],
                      held_out=s, off={"100": s - 0.1, "200": s - 0.2, "other_volumes": s - 0.3}, seconds=10.0 + seed)
            job += 1
    return root


def test_mean_and_sd_over_seeds(multirun):
    runs = collect_runs([multirun])
    assert len(runs) == 6 and set(runs["experiment"]) == {"backbones"}
    summary = summarise_runs(runs).set_index("config")
    assert list(summary.index) == ["model=cnn3d", "model=unet"]  # launch order, varying override only
    row = summary.loc["model=cnn3d"]
    assert row["n_seeds"] == 3
    assert row["r/held-out spots_mean"] == pytest.approx(0.6)
    assert row["r/held-out spots_sd"] == pytest.approx(0.1)  # sample sd of 0.5, 0.6, 0.7
    assert row["r/100 um_mean"] == pytest.approx(0.5)
    assert row["r/200 um_mean"] == pytest.approx(0.4)
    assert row["r/other volumes_mean"] == pytest.approx(0.3)
    assert row["train_seconds"] == pytest.approx(11.0)
    assert summary.loc["model=unet", "r/held-out spots_mean"] == pytest.approx(0.3)


def test_report_files(multirun, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(multirun), "--out", str(out)])
    table = pd.read_csv(out / "benchmark.csv")
    assert len(table) == 2
    md = (out / "benchmark.md").read_text()
    header = [line for line in md.splitlines() if line.startswith("| experiment")][0]
    # columns in order: plane, distances ascending, other volumes
    assert header.index("held-out spots") < header.index("100 um") < header.index("200 um") < header.index("other volumes")
    assert "0.600 ± 0.100" in md and "0.300 ± 0.100" in md
    assert (out / "accuracy_vs_distance.png").stat().st_size > 0
    assert "benchmark.md" in capsys.readouterr().out


def test_single_seed_has_no_sd(tmp_path):
    _fake_run(tmp_path / "ridge" / "0", ["seed=0", "experiment=ridge"], 0.42, {"100": 0.3})
    summary = summarise_runs(collect_runs([tmp_path / "ridge"]))
    assert summary.loc[0, "n_seeds"] == 1 and np.isnan(summary.loc[0, "r/held-out spots_sd"])
    assert summary.loc[0, "config"] == "cnn3d"  # nothing varies: the model names the row
    paths = write_report([tmp_path / "ridge"], tmp_path / "out")
    assert "| 0.420 |" in paths["md"].read_text()


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        write_report([tmp_path], tmp_path / "out")


def test_findings_answer_the_questions(tmp_path):
    from xpression.evaluation.benchmark import findings

    def run(exp: str, job: int, label: str, seed: int, spots: float, off: float, model: str, split: str, depth: int) -> None:
        folder = tmp_path / exp / str(job)
        _fake_run(folder, [label, f"seed={seed}", f"experiment={exp}"], spots, {"100": off, "200": off})
        (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "model": {"backbone": {"name": model}},
                                                            "split": {"_target_": f"x.{split}"}}))
        m = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**m, "patch_shape_vox": [depth, 33, 33]}))

    for seed in range(3):
        run("context", seed, "sampler.patch_size_um=[6.4,205,205]", seed, 0.5, 0.30, "cnn3d", "SpatialBlocksSplit", 1)
        run("context", 3 + seed, "sampler.patch_size_um=[34,205,205]", seed, 0.5, 0.40, "cnn3d", "SpatialBlocksSplit", 5)
        run("backbones", seed, "model=cnn3d_paper", seed, 0.4, 0.20, "cnn3d_paper", "SpatialBlocksSplit", 5)
        run("splits", seed, "split=stratified_random", seed, 0.8, 0.35, "cnn3d", "StratifiedRandomSplit", 5)
        run("splits", 3 + seed, "split=spatial_blocks", seed, 0.5, 0.38, "cnn3d", "SpatialBlocksSplit", 5)
    notes = findings(summarise_runs(collect_runs([tmp_path / e for e in ("context", "backbones", "splits")])))
    assert any(n.startswith("3D context beats 2D") and "0.400" in n and "0.300" in n for n in notes)
    assert any("beats the paper's network" in n for n in notes)
    assert any("+0.300" in n and "+0.450" in n for n in notes)  # 0.8 - 0.5 and 0.8 - 0.35
    summary = summarise_runs(collect_runs([tmp_path / "context"]))
    summary["r/off-plane mean_sd"] = 0.2  # a 0.1 difference within one sd is no win
    assert any("is level with" in n for n in findings(summary))

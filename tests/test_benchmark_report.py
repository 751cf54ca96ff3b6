"""The benchmark report on fake run folders with known per-volume scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from xpression.evaluation.benchmark import collect_runs, findings, main, summarise_scores, write_report


def _row(vid: str, cond: str, where: str, d: float | None, predictor: str, r: float, r2: float) -> dict:
    return {"volume_id": vid, "condition": cond, "where": where, "distance_um": d, "predictor": predictor, "n": 100,
            "pearson_mean": r, "r2_mean": r2, "spearman_mean": r, "mse_mean": 0.01, "jsd_mean": 0.1,
            "dominant_acc": 0.5, "macro_auc": 0.7}


def _fake_run(folder: Path, overrides: list[str], model_r: float, extrusion_r: float, ridge_r: float,
              depth: int = 5, split: str = "SpatialBlocksSplit", unseen_r: float = 0.2, spots_r: float | None = None) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    seed = int([o for o in overrides if o.startswith("seed=")][0].split("=")[1])
    (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "model": {"backbone": {"name": "cnn3d"}},
                                                        "split": {"_target_": f"x.{split}"}}))
    scores = []
    for predictor, r in (("model", model_r), ("extrusion", extrusion_r), ("ridge", ridge_r), ("animal_mean", np.nan)):
        scores.append(_row("infected_0", "infected", "test spots", 0.0, predictor, spots_r if spots_r is not None and predictor == "model" else r, 0.1))
        scores.append(_row("infected_0", "infected", "val spots", 0.0, predictor, 0.99, 0.9))  # not the held-out split
        for d in (150.0, 200.0):
            scores.append(_row("infected_0", "infected", "plane", d, predictor, r, 0.1 if predictor == "model" else -0.2))
    for vid, cond in (("infected_1", "infected"), ("mock_0", "mock")):
        scores.append(_row(vid, cond, "volume", None, "model", unseen_r, 0.05))
        scores.append(_row(vid, cond, "volume", None, "ridge", unseen_r - 0.1, 0.0))
        scores.append(_row(vid, cond, "volume", None, "animal_mean", np.nan, -0.3))
    metrics = {"scores": scores, "held_out_split": "test", "pearson_mean": model_r, "train_seconds": 10.0 + seed,
               "epochs": 3, "parameters": 12345, "patch_shape_vox": [depth, 33, 33], "voxel_size_um": [6.4, 6.4, 6.4],
               "off_plane": {"excluded": ["distances 100 um not probed: closer than the deepest patch"],
                             "digest": "abc123", "probe": {"max_patch_um": [134.4, 400.0, 400.0]}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def context(tmp_path: Path) -> Path:
    root = tmp_path / "context"
    job = 0
    for seed in range(4):
        # 2D: level with extrusion (differences +0.01, -0.01, ...); 3D: 0.1 above extrusion every seed
        _fake_run(root / str(job), ["sampler.patch_size_um=[6.4,205,205]", f"seed={seed}", "experiment=context"],
                  model_r=0.40 + (0.01 if seed % 2 else -0.01), extrusion_r=0.40, ridge_r=0.45, depth=1, unseen_r=0.1)
        _fake_run(root / str(job + 1), ["sampler.patch_size_um=[134.4,205,205]", f"seed={seed}", "experiment=context"],
                  model_r=0.50 + 0.01 * seed, extrusion_r=0.40 + 0.01 * seed, ridge_r=0.45, depth=21, unseen_r=0.3 + 0.01 * seed)
        job += 2
    return root


def test_collect_runs_per_volume(context):
    runs, scores = collect_runs([context])
    assert len(runs) == 8 and list(dict.fromkeys(runs["config"])) == ["sampler.patch_size_um=[6.4,205,205]",
                                                                      "sampler.patch_size_um=[134.4,205,205]"]
    assert set(scores["place"]) == {"held-out spots", "plane", "volume"}  # val spots are not the held-out split
    assert set(scores.loc[scores["place"] == "volume", "volume_id"]) == {"infected_1", "mock_0"}
    summary = summarise_scores(runs, scores)
    row = summary[(summary["config"] == "sampler.patch_size_um=[134.4,205,205]") & (summary["place"] == "plane")
                  & (summary["distance_um"] == 150.0) & (summary["predictor"] == "model")].iloc[0]
    assert row["n_seeds"] == 4 and row["pearson_mean_mean"] == pytest.approx(0.515)


def test_report_tables_and_paired_baselines(context, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(context), "--out", str(out)])
    md = (out / "benchmark.md").read_text()
    assert "### infected_0 (infected, trained animal): probe planes 150 µm from its section" in md
    assert "### infected_0 (infected, trained animal): held-out spots of its section" in md
    assert "### infected_1 (infected, unseen animal of a trained condition): whole volume" in md
    assert "### mock_0 (mock, unseen animal, condition not trained on): whole volume" in md
    assert md.index("infected_1 (infected") < md.index("mock_0 (mock")  # same condition first
    table = md.split("probe planes 150 µm from its section")[1].split("###")[0]
    deep = [line for line in table.splitlines() if "[134.4,205,205]" in line][0]
    assert "+0.100 [+0.100, +0.100] higher" in deep  # exactly 0.1 above its extrusion on every seed
    assert "0.515 ± 0.013" in deep  # mean ± sd over seeds 0.50 .. 0.53
    flat = [line for line in table.splitlines() if "[6.4,205,205]" in line][0]
    assert "level" in flat.split("|")[10]  # Δr vs extrusion: +-0.01 around 0
    assert "ΔR² vs animal mean" in table
    unseen = md.split("whole volume")[1].split("###")[0]
    assert "training mean R²" in unseen and "2D extrusion" not in unseen  # no section of this animal
    assert "same points (probe set abc123" in md and "100 um not probed" in md
    comparisons = pd.read_csv(out / "comparisons.csv")
    assert {"extrusion", "ridge", "animal_mean"} <= set(comparisons["b"])
    assert (out / "accuracy_vs_distance.png").stat().st_size > 0
    assert "benchmark.md" in capsys.readouterr().out


def test_findings_carry_intervals(context):
    runs, scores = collect_runs([context])
    notes = findings(runs, scores)
    deep_vs_flat = [n for n in notes if n.startswith("The 134.4 µm deep patch") and "probe planes" in n][0]
    assert "beats" in deep_vs_flat and "higher" in deep_vs_flat
    best = [n for n in notes if n.startswith("The best model off the plane") and "2D extrusion" in n][0]
    assert "[134.4,205,205]" in best and "+0.100 [+0.100, +0.100]" in best
    ridge = [n for n in notes if "ridge" in n and "probe planes" in n][0]
    assert "beats" in ridge  # 0.515 vs 0.45
    # unseen animals: one of a trained condition (animal shift alone) apart from one of another condition
    assert any("unseen animals of a trained condition" in n for n in notes)
    assert any("condition not trained on" in n for n in notes)


def test_split_findings(tmp_path):
    for seed in range(3):
        _fake_run(tmp_path / "splits" / str(seed), ["split=stratified_random", f"seed={seed}", "experiment=splits"],
                  0.45 + 0.01 * seed, 0.3, 0.3, split="StratifiedRandomSplit", spots_r=0.80 + 0.01 * seed)
        _fake_run(tmp_path / "splits" / str(3 + seed), ["split=spatial_blocks", f"seed={seed}", "experiment=splits"],
                  0.44 + 0.01 * seed, 0.3, 0.3, spots_r=0.50)
    notes = findings(*collect_runs([tmp_path / "splits"]))
    flatter = [n for n in notes if n.startswith("What the random split flatters")][0]
    # (0.80 + s - 0.45 - s) - (0.50 - 0.44 - s) = 0.29 + s: mean 0.30
    assert "+0.300" in flatter


def test_runs_without_scores_are_an_error(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text(json.dumps({"pearson_mean": 0.4}))
    with pytest.raises(SystemExit, match="error: no metrics.json with per-volume scores under"):
        write_report([tmp_path], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_there_is_one_line_and_nothing_written(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "typo"), "--out", str(tmp_path / "report")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: not a folder: {tmp_path / 'typo'} (give multirun or run folders)\n"
    assert list(tmp_path.iterdir()) == []


def test_label_chain_finding(tmp_path):
    """The labels experiment: fitted-from-counts labels against the noise-free ones, paired by seed."""
    for seed in range(3):
        _fake_run(tmp_path / "labels" / str(seed), ["target=obsm", f"seed={seed}", "experiment=labels"],
                  0.50 + 0.01 * seed, 0.3, 0.3, spots_r=0.60)
        _fake_run(tmp_path / "labels" / str(3 + seed), ["target=programs_fitted", f"seed={seed}", "experiment=labels"],
                  0.40 + 0.01 * seed, 0.3, 0.3, spots_r=0.60 - 0.05 * seed)
    notes = [n for n in findings(*collect_runs([tmp_path / "labels"])) if n.startswith("The network trained on programs fitted")]
    planes = [n for n in notes if "probe planes" in n][0]
    assert "loses to" in planes and "-0.100 [-0.100, -0.100]" in planes
    spots = [n for n in notes if "held-out spots" in n][0]
    assert "-0.050" in spots  # 0, -0.05, -0.10 below: mean -0.05


def _with_cohort(run: Path, manifest: str, cwd: Path | None = None) -> None:
    """Record ``manifest`` as the run's ``data.manifest`` (and, for a relative one, the folder train.py ran in)."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"] = {"manifest": manifest}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if cwd is not None:
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"cwd": str(cwd)}}}))


def test_runs_of_two_cohorts_are_refused_in_one_line(tmp_path, capsys):
    """The tiny and the default phantom share volume ids of different animals: never one table."""
    for seed in range(2):
        _fake_run(tmp_path / "A" / str(seed), [f"seed={seed}", "experiment=context"], 0.5, 0.4, 0.45)
        _with_cohort(tmp_path / "A" / str(seed), str(tmp_path / "tiny" / "cohort.yaml"))
    for seed in range(3):
        _fake_run(tmp_path / "B" / str(seed), [f"seed={seed}", "experiment=splits"], 0.6, 0.4, 0.45)
        # relative, as benchmarks/run_benchmark.sh passes it: resolved against the folder train.py ran in
        _with_cohort(tmp_path / "B" / str(seed), "default/cohort.yaml", cwd=tmp_path)
    runs, _ = collect_runs([tmp_path / "A", tmp_path / "B"])
    assert sorted(runs["cohort"].unique()) == [str(tmp_path / "default" / "cohort.yaml"), str(tmp_path / "tiny" / "cohort.yaml")]
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "report")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: the runs trained on 2 cohorts: {tmp_path / 'tiny' / 'cohort.yaml'} (2 runs, under {tmp_path / 'A'}); "
                   f"{tmp_path / 'default' / 'cohort.yaml'} (3 runs, under {tmp_path / 'B'}); each cohort's volumes are its "
                   "own animals (the same volume id names a different animal in each), so their scores never share a "
                   "table: benchmark one cohort at a time (give only that cohort's run folders)\n")
    assert not (tmp_path / "report").exists()  # nothing written
    # one cohort, the same manifest spelled absolute and relative: one report, naming it
    for seed in range(2):
        _with_cohort(tmp_path / "A" / str(seed), str(tmp_path / "default" / "cohort.yaml"))
    main([str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "benchmark.md").read_text()
    assert "5 runs (2 configurations, seeds 0, 1, 2)" in md
    assert f"all trained on the cohort `{tmp_path / 'default' / 'cohort.yaml'}`" in md


def _without_probe(run: Path) -> None:
    """A run trained without ``+off_plane=probe``: no plane rows, no ``off_plane`` in metrics.json."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["scores"] = [r for r in metrics["scores"] if r["where"] != "plane"]
    del metrics["off_plane"]
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_runs_without_the_probe_say_why_the_plane_columns_are_empty(tmp_path):
    for seed in range(2):
        _fake_run(tmp_path / "runs" / str(seed), [f"seed={seed}", "experiment=context"], 0.5 + 0.1 * seed, 0.4, 0.45)
        _without_probe(tmp_path / "runs" / str(seed))
    write_report([tmp_path / "runs"], tmp_path / "report")
    md = (tmp_path / "report" / "benchmark.md").read_text()
    assert ("No run was scored off the plane, so the plane columns are empty: the probe-plane scores need runs "
            "trained with `+off_plane=probe`") in md
    assert "No probe set: no run was scored off the plane" in md
    assert "?" not in md and "One probe set for all rows" not in md and "µm from its section" not in md
    table = md.split("## Every configuration against its own baselines")[1].split("##")[0]
    row = [line for line in table.splitlines() if line.startswith("| context |")][0].split(" | ")
    assert row[2] == "-"  # planes r: empty, and the line above says why
    # held-out spots still scored: 0.5 and 0.6 over the two seeds
    spots = md.split("held-out spots of its section")[1].split("###")[0]
    assert "0.550 ± 0.071" in spots


def test_some_runs_without_the_probe_are_named(context, tmp_path):
    _fake_run(context / "99", ["sampler.patch_size_um=[34,205,205]", "seed=0", "experiment=context"], 0.5, 0.4, 0.45)
    _without_probe(context / "99")
    write_report([context], tmp_path / "report")
    md = (tmp_path / "report" / "benchmark.md").read_text()
    assert ("1 of 9 runs (context: sampler.patch_size_um=[34,205,205]) were not scored off the plane, so their plane "
            "columns are empty: the probe-plane scores need runs trained with `+off_plane=probe`") in md
    assert "One probe set for all rows" in md and "(probe set abc123, 8 runs)" in md


def test_an_earlier_report_is_not_replaced_unless_asked(context, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(context), "--out", str(out)])
    (out / "benchmark.md").write_text("my edited report")
    with pytest.raises(SystemExit) as stop:
        main([str(context), "--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: {out} holds an earlier report (benchmark.md, benchmark.csv")
    assert err.rstrip().endswith("choose another --out or pass --overwrite")
    assert (out / "benchmark.md").read_text() == "my edited report"
    main([str(context), "--out", str(out), "--overwrite"])
    assert (out / "benchmark.md").read_text().startswith("# Benchmark")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as stop:
        main([str(context), "--out", str(tmp_path / "a_file" / "r")])
    assert stop.value.code == 2 and "a_file is a file; give a folder for the report" in capsys.readouterr().err

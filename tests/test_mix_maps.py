"""Maps of a mix of models (xpression.inference.mix) and its command (xpression.evaluation.mix):
the weighted mean and the mixture's SD on numbers, the errors, and the scores against the truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from xpression.evaluation.mix import main, mix_and_score
from xpression.inference.grid import OutputGrid
from xpression.inference.mix import MixError, mix_maps
from xpression.inference.writers import MapStore, read_maps

torch.set_num_threads(1)
NAMES = ["a", "b", "c"]
GRID = OutputGrid(origin_vox=(2, 2, 2), step_vox=(5, 4, 4), shape=(6, 10, 12), voxel_size_um=(6.4, 6.4, 6.4))


def _store(folder: Path, values: np.ndarray, channels: list[str], grid: OutputGrid = GRID, vid: str = "v",
           complete: bool = True, uncertainty: dict | None = None) -> np.ndarray:
    """An infer.py-like store ``<folder>/<vid>/maps.ome.zarr`` of ``values`` ``(C, *grid.shape)``
    in chunks of (4, 8, 8) grid points; returns the values as stored (float16)."""
    meta = {"volume_id": vid, "target_kind": "composition", "uncertainty": uncertainty}
    store = MapStore.open(folder / vid / "maps.ome.zarr", grid, (4, 8, 8), channels, {"run_dir": str(folder)},
                          {"mode": "dense"}, meta, levels=2)
    for tile in store.tiling:
        store.write_tile(tile, values[(slice(None),) + tile.slices])
    if complete:
        store.finalize(range(len(store.tiling)))
    return values.astype(np.float16)


def _values(seed: int, channels: int = 3, grid: OutputGrid = GRID) -> np.ndarray:
    v = np.random.default_rng(seed).uniform(0.0, 1.0, (channels, *grid.shape))
    v[:, :, :2] = np.nan  # outside the tissue mask
    return v


def _read(folder: Path, vid: str = "v") -> tuple[np.ndarray, dict]:
    arr, meta = read_maps(folder / vid / "maps.ome.zarr")
    return arr[:], meta


def test_the_mix_is_the_weighted_mean_on_the_same_grid(tmp_path):
    a = _store(tmp_path / "A", _values(0), NAMES)
    b = _store(tmp_path / "B", _values(1), NAMES)
    _store(tmp_path / "B", _values(2), NAMES, vid="only_in_b")
    stores = mix_maps([tmp_path / "A", tmp_path / "B"], [1.0, 3.0], tmp_path / "mix", progress=False)
    assert list(stores) == ["v"]  # the volumes every source holds
    mix, meta = _read(tmp_path / "mix")
    expected = 0.25 * a.astype(np.float64) + 0.75 * b.astype(np.float64)  # weights normalised to sum 1
    np.testing.assert_array_equal(mix, expected.astype(np.float16))  # NaN where a source is NaN
    assert np.isnan(mix[:, :, :2]).all() and np.isfinite(mix[:, :, 2:]).all()
    assert meta["targets"] == NAMES and meta["complete"] and meta["grid"] == GRID.to_dict()
    assert meta["mix"]["weights"] == [0.25, 0.75] and meta["mix"]["dropped"] == []
    assert meta["mix"]["sources"] == [str((tmp_path / s / "v" / "maps.ome.zarr").resolve()) for s in ("A", "B")]
    src = zarr.open_group(str(tmp_path / "A" / "v" / "maps.ome.zarr"), mode="r").attrs["ome"]["multiscales"]
    out = zarr.open_group(str(tmp_path / "mix" / "v" / "maps.ome.zarr"), mode="r")
    assert out.attrs["ome"]["multiscales"][0]["datasets"] == src[0]["datasets"]  # scale and translation (um)
    assert out["1"].shape == (3, 3, 5, 6) and np.isfinite(out["1"][:]).any()  # its pyramid


def test_the_mixture_sd_on_numbers_and_no_ood(tmp_path):
    channels = NAMES + [f"{t}_sd" for t in NAMES] + ["ood"]
    trust = {"method": "ensemble", "targets": NAMES, "sd_channels": channels[3:6], "ood_channel": "ood"}
    va, vb = np.ones((7, *GRID.shape)), np.ones((7, *GRID.shape))
    va[:3], va[3:6], vb[:3], vb[3:6] = 0.25, 0.125, 0.625, 0.375
    _store(tmp_path / "A", va, channels, uncertainty=trust)
    _store(tmp_path / "B", vb, channels, uncertainty=trust)
    mix_maps([tmp_path / "A", tmp_path / "B"], [1.0, 1.0], tmp_path / "mix", progress=False)
    mix, meta = _read(tmp_path / "mix")
    assert meta["targets"] == channels[:6] and meta["mix"]["dropped"] == ["ood"] and "ood" in meta["mix"]["note"]
    assert meta["uncertainty"]["sd_channels"] == channels[3:6] and meta["uncertainty"]["ood_channel"] is None
    # mu = (0.25 + 0.625) / 2 = 0.4375; sd^2 = ((0.125^2 + 0.25^2) + (0.375^2 + 0.625^2)) / 2 - 0.4375^2 = 0.11328125
    np.testing.assert_allclose(mix[:3].astype(float), 0.4375)
    np.testing.assert_allclose(mix[3:].astype(float), np.sqrt(0.11328125), rtol=1e-3)
    # random numbers against the formula, unequal weights
    a = _store(tmp_path / "C", _values(3, 7), channels, uncertainty=trust).astype(np.float64)
    b = _store(tmp_path / "D", _values(4, 7), channels, uncertainty=trust).astype(np.float64)
    mix_maps([tmp_path / "C", tmp_path / "D"], [2.0, 6.0], tmp_path / "mix2", progress=False)
    mix, _ = _read(tmp_path / "mix2")
    mu = 0.25 * a[:3] + 0.75 * b[:3]
    sd = np.sqrt(0.25 * (a[3:6] ** 2 + a[:3] ** 2) + 0.75 * (b[3:6] ** 2 + b[:3] ** 2) - mu**2)
    np.testing.assert_allclose(mix.astype(np.float64), np.concatenate([mu, sd]), rtol=1e-3, atol=1e-4)
    # a source without SD channels: the mix has none
    _store(tmp_path / "E", _values(5), NAMES)
    mix_maps([tmp_path / "C", tmp_path / "E"], [1.0, 1.0], tmp_path / "mix3", progress=False)
    mix, meta = _read(tmp_path / "mix3")
    assert meta["targets"] == NAMES and "uncertainty" not in meta and mix.shape[0] == 3


def test_a_store_mixed_with_itself_is_itself(tmp_path):
    channels = NAMES + [f"{t}_sd" for t in NAMES]
    trust = {"method": "mc_dropout", "targets": NAMES, "sd_channels": channels[3:], "ood_channel": None}
    a = _store(tmp_path / "A", _values(6, 6), channels, uncertainty=trust)
    mix_maps([tmp_path / "A", tmp_path / "A"], [1.0, 2.0], tmp_path / "mix", progress=False)
    mix, _ = _read(tmp_path / "mix")
    np.testing.assert_array_equal(mix, a)


def test_bad_inputs_are_one_line_errors(tmp_path):
    _store(tmp_path / "A", _values(0), NAMES)
    _store(tmp_path / "B", _values(1), NAMES)
    (tmp_path / "empty").mkdir()

    def bad(sources, match, weights=None, output=None):
        with pytest.raises(MixError, match=match) as err:
            mix_maps([tmp_path / s for s in sources], weights or [1.0] * len(sources), output or tmp_path / "out",
                     progress=False)
        assert "\n" not in str(err.value)

    bad(["A", "empty"], r"empty holds no maps \(no <volume>/maps.ome.zarr\)")
    bad(["A", "missing"], r"missing holds no maps")
    _store(tmp_path / "W", _values(1), NAMES, vid="w")
    bad(["A", "W"], r"no volume has maps in every source \(.*A: \['v'\]; .*W: \['w'\]\)")
    wider = OutputGrid((2, 2, 2), (5, 4, 4), (6, 10, 13), (6.4,) * 3)
    _store(tmp_path / "S", _values(1, grid=wider), NAMES, grid=wider)
    bad(["A", "S"], r"volume v: the grids differ in shape: \[6, 10, 12\] in .* against \[6, 10, 13\]")
    _store(tmp_path / "Z", _values(1), NAMES, grid=OutputGrid((2, 2, 2), (5, 4, 5), (6, 10, 12), (6.4,) * 3))
    bad(["A", "Z"], r"volume v: the grids differ in scale \(um\): \[32.0, 25.6, 25.6\] in .* against \[32.0, 25.6, 32.0\]")
    _store(tmp_path / "T", _values(1), NAMES, grid=OutputGrid((2, 2, 3), (5, 4, 4), (6, 10, 12), (6.4,) * 3))
    bad(["A", "T"], r"volume v: the grids differ in translation \(um\)")
    _store(tmp_path / "N", _values(1), ["a", "b", "d"])
    bad(["A", "N"], r"volume v: the target channels differ: \['a', 'b', 'c'\] in .* against \['a', 'b', 'd'\]")
    _store(tmp_path / "O", _values(1), ["a", "c", "b"])
    bad(["A", "O"], r"target channels differ")
    _store(tmp_path / "I", _values(1), NAMES, complete=False)
    bad(["A", "I"], r"I/v/maps.ome.zarr is not complete")
    bad(["A", "B"], r"1 weight\(s\) for 2 sources", weights=[1.0])
    bad(["A", "B"], r"weights must be positive numbers, got \[1.0, 0.0\]", weights=[1.0, 0.0])
    bad(["A", "B"], r"weights must be positive", weights=[1.0, -2.0])
    bad(["A"], r"a mix needs two sources or more, got 1")
    bad(["A", "B"], r"output .*A.* and source .*A overlap", output=tmp_path / "A")
    assert not (tmp_path / "out").exists()  # nothing written by any of them


def test_an_existing_output_is_replaced_only_with_overwrite(tmp_path):
    a = _store(tmp_path / "A", _values(0), NAMES)
    b = _store(tmp_path / "B", _values(1), NAMES)
    out = tmp_path / "mix"
    (out / "v").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MixError, match=r"mix exists; choose another output or pass --overwrite"):
        mix_maps([tmp_path / "A", tmp_path / "B"], [1.0, 1.0], out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "v"] and not any((out / "v").iterdir())
    mix_maps([tmp_path / "A", tmp_path / "B"], [1.0, 1.0], out, overwrite=True, progress=False)
    mix_maps([tmp_path / "A", tmp_path / "B"], [1.0, 3.0], out, overwrite=True, progress=False)  # a finished mix replaced
    mix, meta = _read(out)
    expected = 0.25 * a.astype(np.float64) + 0.75 * b.astype(np.float64)
    np.testing.assert_array_equal(mix, expected.astype(np.float16))
    assert meta["mix"]["weights"] == [0.25, 0.75] and (out / "notes.txt").read_text() == "mine"


def test_cli_bad_input_is_one_line_with_status_2(tmp_path, capsys):
    _store(tmp_path / "A", _values(0), NAMES)
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "out"), str(tmp_path / "A"), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "empty holds no maps" in err
    assert main([str(tmp_path / "out"), str(tmp_path / "A"), str(tmp_path / "A"), "--weights", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: 1 weight(s) for 2 sources")
    assert main([str(tmp_path / "out"), str(tmp_path / "A"), str(tmp_path / "A")]) == 0  # no summary.json: not scored
    assert "mixed maps of 1 volume(s)" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["weights"] == [0.5, 0.5]
    assert main([str(tmp_path / "out"), str(tmp_path / "A"), str(tmp_path / "A")]) == 2
    assert "exists; choose another output or pass --overwrite" in capsys.readouterr().err


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A tiny two-volume cohort, two untrained runs with a predictions.csv of noisy truth (so the
    baselines have training spots), and what infer.py wrote and scored for the first run and for
    the ensemble of both: ``(single output, ensemble output)``."""
    import anndata as ad

    from tests._inference_models import infer_config, make_run, two_volume_cohort
    from xpression.data.manifest import load_manifest
    from xpression.evaluation.maps import evaluate_inference
    from xpression.inference.pipeline import infer
    from xpression.phantom import Phantom

    root = tmp_path_factory.mktemp("mix_cohort")
    cohort_path = two_volume_cohort(root / "cohort")
    cohort = load_manifest(cohort_path)
    phantom = Phantom.from_spec(cohort.truth.spec)
    names = ["alveolar", "airway", "vascular", "infected", "immune", "remodelling"]
    rng = np.random.default_rng(0)
    runs = []
    for i in range(2):
        run = make_run(root / "multirun" / str(i), cohort_path, seed=i)
        tables = []
        for section in cohort.sections:
            a = ad.read_h5ad(section.adata)
            pos = np.asarray(a.obsm["ct_position_um"], float)
            truth = phantom.programs_at(section.volume_id, pos)[:, [phantom.program_names.index(n) for n in names]]
            table = pd.DataFrame({"section_id": section.id, "volume_id": section.volume_id, "barcode": a.obs_names,
                                  "z_um": pos[:, 0], "y_um": pos[:, 1], "x_um": pos[:, 2],
                                  "split": rng.choice(["train", "val", "test"], size=len(pos), p=[0.5, 0.25, 0.25])})
            for j, n in enumerate(names):
                table[f"true/{n}"], table[f"pred/{n}"] = truth[:, j], truth[:, j] + rng.normal(0, 0.05, len(pos))
            tables.append(table)
        pd.concat(tables).to_csv(run / "predictions.csv", index=False)
        runs.append(run)
    outs = []
    for name, over in (("single", {"run": str(runs[0])}),
                       ("ensemble", {"run": str(root / "multirun"), "uncertainty": "ensemble"})):
        cfg = infer_config(output=str(root / name), figures=False, ct_preview=False, evaluate=True, **over)
        evaluate_inference(cfg, infer(cfg))
        outs.append(root / name)
    return outs


def _map_rows(path: Path) -> pd.DataFrame:
    """The score rows of swept maps (the held-out spot rows left out), in a fixed order."""
    rows = pd.read_csv(path)
    rows = rows[~rows["where"].isin(["val spots", "test spots"])]
    return rows.sort_values(["volume_id", "where", "distance_um", "predictor"]).reset_index(drop=True)


def test_a_mix_of_maps_with_themselves_scores_what_infer_recorded(swept, tmp_path, capsys):
    single, ensemble = swept
    capsys.readouterr()
    summary = mix_and_score(tmp_path / "mix", [single, single], [1.0, 2.0], figures=False, progress=False)
    out = " ".join(capsys.readouterr().out.split())  # the title as rich wraps it, unwrapped
    assert "the first source's run" in out and "no held-out spot rows" in out
    recorded, mixed = _map_rows(single / "evaluation.csv"), _map_rows(tmp_path / "mix" / "evaluation.csv")
    assert {"extrusion", "knn", "animal_mean"} <= set(recorded["predictor"]) and len(recorded) > 10
    pd.testing.assert_frame_equal(mixed, recorded)
    assert not pd.read_csv(tmp_path / "mix" / "evaluation.csv")["where"].isin(["val spots", "test spots"]).any()
    assert summary["evaluation"]["rows"] and summary["run_dir"] == json.loads((single / "summary.json").read_text())["run_dir"]
    # an ensemble's maps: the mean and SD channels, the baselines from its members' training spots
    mix_and_score(tmp_path / "mix_ens", [ensemble, ensemble], figures=False, progress=False)
    pd.testing.assert_frame_equal(_map_rows(tmp_path / "mix_ens" / "evaluation.csv"), _map_rows(ensemble / "evaluation.csv"))
    recorded = pd.read_csv(ensemble / "uncertainty.csv").drop(columns="method")
    mixed = pd.read_csv(tmp_path / "mix_ens" / "uncertainty.csv")
    assert set(mixed["method"]) == {"mix"}
    pd.testing.assert_frame_equal(mixed.drop(columns="method").sort_values("volume_id").reset_index(drop=True),
                                  recorded.sort_values("volume_id").reset_index(drop=True))


def _summary(folder: Path, section_z_um: float | None, vid: str = "v") -> None:
    """The summary.json infer.py writes beside its maps: the plane its grid was laid through."""
    (folder / "summary.json").write_text(json.dumps({"run_dir": str(folder), "cohort": None,
                                                     "volumes": {vid: {"section_z_um": section_z_um}}}))


def test_grids_of_one_spacing_apart_name_their_anchors(tmp_path):
    """Sweeps of one spacing_um of runs trained on different sections: the grids pass through
    different planes, and the error says so (not 'use the same spacing_um')."""
    _store(tmp_path / "A", _values(0), NAMES)  # z grid points at 12.8 + 32 k um
    shifted = OutputGrid((4, 2, 2), (5, 4, 4), (6, 10, 12), (6.4,) * 3)  # z at 25.6 + 32 k um
    _store(tmp_path / "B", _values(1), NAMES, grid=shifted)

    def message() -> str:
        with pytest.raises(MixError) as err:
            mix_maps([tmp_path / "A", tmp_path / "B"], [1.0, 1.0], tmp_path / "out", progress=False)
        assert "\n" not in str(err.value) and "same spacing_um" not in str(err.value)
        return str(err.value)

    head = (f"volume v: the grids differ in translation (um): [12.8, 12.8, 12.8] in {tmp_path / 'A' / 'v' / 'maps.ome.zarr'} "
            f"against [25.6, 12.8, 12.8] in {tmp_path / 'B' / 'v' / 'maps.ome.zarr'} at the same spacing")
    fix = "maps mix on one grid: mix sweeps of runs trained on the same sections (data.sections)"
    # no summary.json: the likely cause
    assert message() == (f"{head}: likely their anchors differ (infer.py lays each grid through the trained section of "
                         f"its run, so runs trained on different sections give shifted grids); {fix}")
    # summary.json: the two planes, 38.4 - 12.8 = 25.6 um = 4 voxels apart
    _summary(tmp_path / "A", 12.8)
    _summary(tmp_path / "B", 38.4)
    assert message() == (f"{head}: their anchors differ, as infer.py lays each grid through the trained section of its run "
                         f"(z = 12.8 um in {tmp_path / 'A'}, z = 38.4 um in {tmp_path / 'B'}); {fix}, or sweep both with a z "
                         "spacing whose step divides the 4 voxels (25.6 um) between the two planes")
    _summary(tmp_path / "B", None)  # B's run trained on no section of this volume: its grid is centred
    assert message().endswith(f"(z = 12.8 um in {tmp_path / 'A'}, none (grid centred) in {tmp_path / 'B'}); {fix}")
    _summary(tmp_path / "B", 12.8)  # the same plane: not the anchors
    assert "through the same plane: the sources swept different images of this volume" in message()
    # one spacing, one grid point 0, more points: a larger image, not the anchors
    _store(tmp_path / "S", _values(1, grid=OutputGrid((2, 2, 2), (5, 4, 4), (7, 10, 12), (6.4,) * 3)), NAMES,
           grid=OutputGrid((2, 2, 2), (5, 4, 4), (7, 10, 12), (6.4,) * 3))
    with pytest.raises(MixError, match=r"differ in shape: \[6, 10, 12\] in .* against \[7, 10, 12\] in .* at the same "
                                       r"spacing and translation: the sources swept images of this volume of different sizes"):
        mix_maps([tmp_path / "A", tmp_path / "S"], [1.0, 1.0], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_grids_apart_through_the_cli_are_one_line_with_status_2(tmp_path, capsys):
    _store(tmp_path / "A", _values(0), NAMES)
    _store(tmp_path / "B", _values(1), NAMES, grid=OutputGrid((4, 2, 2), (5, 4, 4), (6, 10, 12), (6.4,) * 3))
    _summary(tmp_path / "A", 12.8)
    _summary(tmp_path / "B", 38.4)
    assert main([str(tmp_path / "out"), str(tmp_path / "A"), str(tmp_path / "B"), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: volume v: the grids differ in translation (um)")
    assert "their anchors differ" in err and "z = 38.4 um" in err and "4 voxels (25.6 um)" in err

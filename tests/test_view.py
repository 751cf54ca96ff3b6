"""The napari layers of an infer.py output, built without napari: data, names, physical scale."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from xpression.inference.genes import GeneLoadings, write_gene_maps
from xpression.inference.grid import OutputGrid, Tiling
from xpression.inference.writers import MapStore, write_ct_preview
from xpression.view import ViewError, build_layers, main, open_viewer


@pytest.fixture
def output(tmp_path):
    """One volume's infer.py output: maps with two targets and their _sd channels, the CT
    preview, gene maps, and a run whose predictions.csv has spots of two volumes."""
    grid = OutputGrid((2, 1, 1), (5, 4, 4), (3, 6, 7), (6.4, 3.2, 3.2), (10.0, 0.0, 0.0))
    run = tmp_path / "run"
    run.mkdir()
    targets = ["alveolar", "airway", "alveolar_sd", "airway_sd"]
    store = MapStore.open(tmp_path / "out" / "lung_1" / "maps.ome.zarr", grid, (3, 6, 7), targets,
                          {"checkpoint_sha256": "abc", "run_dir": str(run)}, {"mode": "dense"},
                          metadata={"target_kind": "composition", "target_colors": ["#db5f57", "#57d3db", None, None]})
    values = np.random.default_rng(0).uniform(0, 1, (4,) + grid.shape).astype(np.float32)
    for tile in Tiling(grid.shape, (3, 6, 7)):
        store.write_tile(tile, values)
    store.finalize([0])
    volume = np.random.default_rng(1).integers(0, 255, (20, 30, 30)).astype(np.uint8)

    class Vol:
        shape, dtype = volume.shape, volume.dtype

        def __getitem__(self, key):
            return volume[key]

    write_ct_preview(Vol(), grid, tmp_path / "out" / "lung_1" / "ct_preview.ome.zarr")
    write_gene_maps(store.path, GeneLoadings(["alveolar", "airway", "alveolar_sd", "airway_sd"], ["Sftpc"],
                                             np.array([[5.0], [1.0], [0.0], [0.0]]), "log units", "test"))
    pd.DataFrame({"volume_id": ["lung_1", "lung_1", "lung_2"], "barcode": ["A-1", "C-1", "G-1"], "split": ["train", "test", "train"],
                  "dominant": ["alveolar", "airway", "airway"], "z_um": [33.0, 33.0, 5.0], "y_um": [5.0, 9.0, 1.0],
                  "x_um": [7.0, 8.0, 2.0]}).to_csv(run / "predictions.csv", index=False)
    return tmp_path / "out", grid, values


def test_layers_carry_physical_scale_and_the_right_channels(output):
    out, grid, values = output
    layers = build_layers(out)
    names = [kw["name"] for _, kw, _ in layers]
    assert names == ["CT", "alveolar", "airway", "alveolar sd", "airway sd", "Sftpc (imputed)", "spots (dominant target)"]
    kinds = [k for _, _, k in layers]
    assert kinds == ["image"] * 6 + ["points"]
    for data, kw, kind in layers[:6]:
        assert kw["scale"] == pytest.approx([32.0, 12.8, 12.8]) and kw["translate"] == pytest.approx([22.8, 3.2, 3.2])
        assert kw["units"] == ("um", "um", "um") and data.shape == grid.shape
    # grid point (iz, iy, ix) sits at translate + index * scale: the physical position of that grid point
    assert np.allclose(np.asarray(layers[1][1]["translate"]) + 2 * np.asarray(layers[1][1]["scale"]), grid.points_um((2, 2, 2), (3, 3, 3))[0])
    alveolar = layers[1][0]
    np.testing.assert_allclose(np.asarray(alveolar[1]), values[0, 1], atol=1e-3)  # float16 storage
    assert layers[1][1]["visible"] and not layers[2][1]["visible"] and not layers[3][1]["visible"]
    assert layers[1][1]["colormap"]["colors"][1][:3] == pytest.approx([0xdb / 255, 0x5f / 255, 0x57 / 255])
    assert layers[3][1]["colormap"] == "viridis" and layers[5][1]["metadata"]["units"] == "log units"
    np.testing.assert_allclose(np.asarray(layers[5][0]), 5.0 * values[0] + values[1], rtol=2e-3, atol=2e-3)
    ct, ct_kw, _ = layers[0]
    assert ct.shape == grid.shape and ct_kw["colormap"] == "gray"
    points, pkw, _ = layers[-1]
    np.testing.assert_allclose(points, [[33.0, 5.0, 7.0], [33.0, 9.0, 8.0]])  # this volume's spots only, in um
    assert pkw["size"] == 55.0 and list(pkw["features"]["barcode"]) == ["A-1", "C-1"]
    assert pkw["face_color"][0][:3] == pytest.approx([0xdb / 255, 0x5f / 255, 0x57 / 255])
    # the volume's own folder works too; a wrong volume or folder is one clear error
    assert [kw["name"] for _, kw, _ in build_layers(out / "lung_1")] == names
    with pytest.raises(ViewError, match="no volume 'lung_9'"):
        build_layers(out, "lung_9")
    with pytest.raises(ViewError, match="holds no maps.ome.zarr"):
        build_layers(out.parent / "run")


def test_missing_napari_is_one_line(output, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "napari", None)  # import napari raises ImportError
    with pytest.raises(ViewError, match=r"napari is not installed: .*python.* -m pip install -e '\.\[viewer\]'"):
        open_viewer([], "x")
    assert main([str(output[0])]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: napari is not installed") and "\n" not in err


def test_layers_load_into_a_napari_viewer_model(output):
    """With napari installed (the viewer extra), every layer's kwargs are accepted and the
    layers sit in um; skipped without it."""
    pytest.importorskip("napari")
    from napari.components import ViewerModel

    viewer = ViewerModel()
    for data, kwargs, kind in build_layers(output[0]):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    assert [layer.name for layer in viewer.layers][-1] == "spots (dominant target)"
    ct = viewer.layers["CT"]
    assert str(ct.units[0]) == "micrometer" and tuple(ct.scale) == pytest.approx((32.0, 12.8, 12.8))
    world = viewer.layers["alveolar"].data_to_world((1, 2, 3))
    assert world == pytest.approx((22.8 + 32.0, 3.2 + 2 * 12.8, 3.2 + 3 * 12.8))


def test_spots_without_target_colours_keep_each_target_s_colour_of_the_other_figures(tmp_path):
    """Without colours of their own, a target's spots are the colour the check overlay and the depth
    plots give it (C0, C1, ... by its place among the targets), not one picked by which targets
    this volume's spots happen to show."""
    from matplotlib.colors import to_rgba

    from xpression.view import _spot_layer

    pd.DataFrame({"volume_id": ["v", "v"], "dominant": ["remodelling", "airway"], "z_um": [1.0, 1.0],
                  "y_um": [1.0, 2.0], "x_um": [1.0, 2.0]}).to_csv(tmp_path / "predictions.csv", index=False)
    meta = {"identity": {"run_dir": str(tmp_path)}, "targets": ["alveolar", "airway", "vascular", "infected", "immune", "remodelling"]}
    _, kwargs, _ = _spot_layer(tmp_path, "v", meta)
    np.testing.assert_allclose(kwargs["face_color"], [to_rgba("C5"), to_rgba("C1")])


def test_an_existing_screenshot_is_not_overwritten(output, capsys):
    out, _, _ = output
    shot = out.parent / "view.png"
    shot.write_bytes(b"mine")
    assert main([str(out), "--screenshot", str(shot)]) == 1
    assert "--screenshot" in capsys.readouterr().err and shot.read_bytes() == b"mine"

"""OME-Zarr writer and the resumable TIFF -> OME-Zarr conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

import xpression.data.convert as convert_mod
from xpression.data.convert import PROGRESS_FILE, convert_tiff_to_omezarr, convert_to_omezarr
from xpression.data.omezarr import downsample2_mean, level_shapes, write_omezarr
from xpression.data.volume import VolumeError, open_volume

SHAPE = (41, 50, 37)  # odd sizes exercise the pyramid's edge handling
CHUNK = (8, 16, 16)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, SHAPE, dtype=np.uint8)


@pytest.fixture()
def tiff(tmp_path, data):
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, data, bigtiff=True)
    return p


def _ref_downsample(a: np.ndarray) -> np.ndarray:
    """Mean over each existing 2x2x2 cell, computed voxel by voxel."""
    out = np.empty(tuple(-(-s // 2) for s in a.shape))
    for idx in np.ndindex(out.shape):
        cell = a[tuple(slice(2 * i, 2 * i + 2) for i in idx)]
        out[idx] = cell.mean()
    return out


def test_downsample_matches_reference():
    a = np.random.default_rng(0).integers(0, 256, (5, 6, 7), dtype=np.uint8)
    got = downsample2_mean(a)
    assert got.shape == (3, 3, 4) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.rint(_ref_downsample(a)))
    f = downsample2_mean(a.astype(np.float32))
    np.testing.assert_allclose(f, _ref_downsample(a), rtol=1e-6)


def test_pyramid_shapes_means_metadata(tmp_path, data):
    out = write_omezarr(data, tmp_path / "v.ome.zarr", (2.0, 1.0, 1.0), chunk=CHUNK, levels=3, name="v")
    meta = json.loads((out / "zarr.json").read_text())
    ome = meta["attributes"]["ome"]
    assert ome["version"] == "0.5" and meta["zarr_format"] == 3
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"micrometer"}
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[2.0, 1.0, 1.0], [4.0, 2.0, 2.0], [8.0, 4.0, 4.0]]
    assert level_shapes(SHAPE, 3) == [(41, 50, 37), (21, 25, 19), (11, 13, 10)]
    prev = data.astype(np.float64)
    for k, shape in enumerate(level_shapes(SHAPE, 3)):
        lv = open_volume(out, level=k)
        assert lv.shape == shape
        arr = lv[:, :, :]
        if k:
            # Each level is the rounded 2x mean of the previous one.
            np.testing.assert_array_equal(arr, np.rint(_ref_downsample(prev)))
        assert abs(arr.mean() - data.mean()) < 1.0
        prev = arr.astype(np.float64)
    np.testing.assert_array_equal(open_volume(out)[:, :, :], data)


def test_write_from_block_iterator(tmp_path, data):
    a = write_omezarr(data, tmp_path / "a.ome.zarr", 1.0, chunk=CHUNK)
    blocks = (data[z : z + 5] for z in range(0, SHAPE[0], 5))  # thickness unrelated to chunks
    b = write_omezarr(blocks, tmp_path / "b.ome.zarr", 1.0, chunk=CHUNK, shape=SHAPE, dtype=np.uint8)
    planes = iter(list(data))  # single 2D planes
    c = write_omezarr(planes, tmp_path / "c.ome.zarr", 1.0, chunk=CHUNK, shape=SHAPE, dtype=np.uint8)
    for k in range(3):
        ref = open_volume(a, level=k)[:, :, :]
        np.testing.assert_array_equal(open_volume(b, level=k)[:, :, :], ref)
        np.testing.assert_array_equal(open_volume(c, level=k)[:, :, :], ref)
    with pytest.raises(ValueError, match="ended after"):
        write_omezarr(iter([data[:10]]), tmp_path / "d.ome.zarr", 1.0, shape=SHAPE, dtype=np.uint8)
    with pytest.raises(ValueError, match="shape and dtype"):
        write_omezarr(iter([data]), tmp_path / "e.ome.zarr", 1.0)


def test_writer_refuses_existing(tmp_path, data):
    out = write_omezarr(data, tmp_path / "v.ome.zarr", 1.0)
    with pytest.raises(VolumeError, match="overwrite=True"):
        write_omezarr(data, out, 1.0)
    write_omezarr(data[:10], out, 1.0, overwrite=True)
    assert open_volume(out).shape == (10, 50, 37)


def _all_levels(path, levels=3):
    return [open_volume(path, level=k)[:, :, :] for k in range(levels)]


def test_convert_matches_source(tmp_path, tiff, data):
    out = convert_tiff_to_omezarr(tiff, tmp_path / "o.ome.zarr", 2.0, chunk=CHUNK, progress=False)
    vol = open_volume(out)
    assert vol.voxel_size_um == (2.0, 2.0, 2.0) and vol.chunks == CHUNK
    np.testing.assert_array_equal(vol[:, :, :], data)
    ref = write_omezarr(data, tmp_path / "ref.ome.zarr", 2.0, chunk=CHUNK)
    for got, want in zip(_all_levels(out), _all_levels(ref)):
        np.testing.assert_array_equal(got, want)
    assert not (out / PROGRESS_FILE).exists()


def test_convert_resume_identical(tmp_path, tiff, monkeypatch):
    full = convert_tiff_to_omezarr(tiff, tmp_path / "full.ome.zarr", 2.0, chunk=CHUNK, progress=False)

    written = []

    def interrupt_after_3(z0, z1):
        written.append(z0)
        if len(written) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "_AFTER_SLAB_HOOK", interrupt_after_3)
    part = tmp_path / "part.ome.zarr"
    with pytest.raises(KeyboardInterrupt):
        convert_tiff_to_omezarr(tiff, part, 2.0, chunk=CHUNK, progress=False)
    assert json.loads((part / PROGRESS_FILE).read_text())["done"] == [0, 8, 16]

    resumed = []
    monkeypatch.setattr(convert_mod, "_AFTER_SLAB_HOOK", lambda z0, z1: resumed.append(z0))
    convert_tiff_to_omezarr(tiff, part, 2.0, chunk=CHUNK, progress=False)
    assert resumed == [24, 32, 40]  # finished slabs were skipped
    for got, want in zip(_all_levels(part), _all_levels(full)):
        np.testing.assert_array_equal(got, want)
    assert json.loads((part / "zarr.json").read_text()) == json.loads((full / "zarr.json").read_text())

    # A finished conversion is not redone.
    resumed.clear()
    convert_tiff_to_omezarr(tiff, part, 2.0, chunk=CHUNK, progress=False)
    assert resumed == []


def test_convert_refuses_different_output(tmp_path, tiff, data):
    out = convert_tiff_to_omezarr(tiff, tmp_path / "o.ome.zarr", 2.0, chunk=CHUNK, progress=False)
    with pytest.raises(VolumeError, match=r"pass overwrite \(--overwrite\) to replace it"):
        convert_tiff_to_omezarr(tiff, out, 3.0, chunk=CHUNK, progress=False)
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # a folder this tool did not write is never deleted
        with pytest.raises(VolumeError, match=r"is not a conversion written here; choose another output \(nothing"):
            convert_tiff_to_omezarr(tiff, other, 2.0, progress=False, overwrite=overwrite)
    assert (other / "notes.txt").read_text() == "mine"
    for target in (tiff, tiff.parent):  # the source itself, or a folder holding it: refused, the source kept
        with pytest.raises(VolumeError, match="the output and the source .* overlap"):
            convert_tiff_to_omezarr(tiff, target, 2.0, progress=False, overwrite=True)
    assert tiff.is_file() and open_volume(tiff, 2.0).shape == data.shape
    convert_tiff_to_omezarr(tiff, out, 3.0, chunk=CHUNK, levels=2, overwrite=True, progress=False)
    vol = open_volume(out)
    assert vol.voxel_size_um == (3.0, 3.0, 3.0) and vol.levels == ("0", "1")


def test_convert_source_changed_is_different(tmp_path, tiff, data, monkeypatch):
    def stop(z0, z1):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "_AFTER_SLAB_HOOK", stop)
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(KeyboardInterrupt):
        convert_tiff_to_omezarr(tiff, out, 2.0, chunk=CHUNK, progress=False)
    monkeypatch.setattr(convert_mod, "_AFTER_SLAB_HOOK", None)
    tifffile.imwrite(tiff, 255 - data, bigtiff=True)  # the source was replaced meanwhile
    with pytest.raises(VolumeError, match=r"overwrite \(--overwrite\)"):
        convert_tiff_to_omezarr(tiff, out, 2.0, chunk=CHUNK, progress=False)
    convert_tiff_to_omezarr(tiff, out, 2.0, chunk=CHUNK, overwrite=True, progress=False)
    np.testing.assert_array_equal(open_volume(out)[:, :, :], 255 - data)


def test_convert_bad_inputs(tmp_path, data):
    with pytest.raises(VolumeError, match="file not found"):
        convert_tiff_to_omezarr(tmp_path / "missing.tif", tmp_path / "o.ome.zarr", 1.0, progress=False)
    np.save(tmp_path / "v.npy", data)
    with pytest.raises(VolumeError, match="missing voxel size"):
        convert_to_omezarr(tmp_path / "v.npy", tmp_path / "o.ome.zarr", progress=False)
    assert not (tmp_path / "o.ome.zarr").exists()


def test_convert_cli(tmp_path, tiff, data, capsys):
    convert_mod.main([str(tiff), str(tmp_path / "cli.ome.zarr"), "--voxel-size-um", "1.6", "--chunk", "8", "16", "16"])
    vol = open_volume(tmp_path / "cli.ome.zarr")
    assert vol.voxel_size_um == (1.6, 1.6, 1.6)
    np.testing.assert_array_equal(vol[3:7, 10:20, :], data[3:7, 10:20, :])


@pytest.mark.parametrize("args, message", [
    (["--voxel-size-um", "-1"], "--voxel-size-um: give one or three positive numbers (z y x, um), got [-1.0]"),
    (["--voxel-size-um", "1", "2"], "--voxel-size-um: give one or three positive numbers (z y x, um), got [1.0, 2.0]"),
    (["--voxel-size-um", "1", "--chunk", "0", "8", "8"], "--chunk: give three positive voxel counts (z y x), got [0, 8, 8]"),
    (["--voxel-size-um", "1", "--levels", "0"], "--levels: must be at least 1, got 0"),
])
def test_convert_cli_refuses_bad_settings_in_one_line(tmp_path, tiff, args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        convert_mod.main([str(tiff), str(tmp_path / "o.ome.zarr"), *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m xpression.data.convert: error: {message}"
    assert not (tmp_path / "o.ome.zarr").exists()


def test_convert_cli_reports_a_bad_source_or_output_in_one_line(tmp_path, tiff, capsys):
    for src, out, expected in [(tmp_path / "missing.tif", tmp_path / "a.ome.zarr", "file not found"),
                               (tiff, tmp_path, "the output and the source"),  # the folder holding the stack itself
                               (tiff, tiff, "overlap")]:
        with pytest.raises(SystemExit) as exit_:
            convert_mod.main([str(src), str(out), "--voxel-size-um", "1", "--overwrite"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "a.ome.zarr").exists() and tiff.is_file()


def test_convert_cli_takes_the_voxel_size_a_file_records(tmp_path, data, capsys):
    """--voxel-size-um was required even for an OME-TIFF that records it (and a wrong value then
    told the user to drop it)."""
    ome = tmp_path / "ome.ome.tif"
    tifffile.imwrite(ome, data, metadata={"axes": "ZYX", "PhysicalSizeZ": 4.0, "PhysicalSizeY": 2.0, "PhysicalSizeX": 2.0})
    convert_mod.main([str(ome), str(tmp_path / "o.ome.zarr"), "--chunk", *map(str, CHUNK)])
    assert open_volume(tmp_path / "o.ome.zarr").voxel_size_um == (4.0, 2.0, 2.0)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, data)
    with pytest.raises(SystemExit) as exit_:
        convert_mod.main([str(plain), str(tmp_path / "p.ome.zarr")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "missing voxel size" in err and err.count("\n") == 1

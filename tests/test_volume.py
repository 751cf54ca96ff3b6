"""Volume readers: identical lazy reads across formats, padding, metadata, bad inputs."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import tifffile
import zarr

from xpression.data.omezarr import write_omezarr
from xpression.data.volume import Volume, VolumeError, open_volume

VOX = (4.0, 2.0, 2.0)


def blob_volume(shape=(40, 96, 96), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    r = np.sqrt((z - 20) ** 2 + (y - 48) ** 2 + (x - 40) ** 2)
    a = np.where(r < 25, 150.0, 20.0) + rng.normal(0, 10, shape)
    return a.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return blob_volume()


@pytest.fixture(scope="module")
def files(tmp_path_factory, data) -> dict:
    d = tmp_path_factory.mktemp("vol")
    paths = {
        "npy": d / "v.npy",
        "tiff": d / "v.tif",
        "bigtiff": d / "v_big.tiff",
        "pages": d / "v_pages.tif",
        "omezarr": d / "v.ome.zarr",
        "plainzarr": d / "plain.zarr",
    }
    np.save(paths["npy"], data)
    tifffile.imwrite(paths["tiff"], data)
    tifffile.imwrite(paths["bigtiff"], data, bigtiff=True)
    with tifffile.TiffWriter(paths["pages"]) as w:  # one page written at a time
        for plane in data:
            w.write(plane, contiguous=False)
    write_omezarr(data, paths["omezarr"], VOX, chunk=(16, 32, 32), levels=3)
    zarr.create_array(str(paths["plainzarr"]), data=data, chunks=(8, 32, 32))
    return paths


BLOCKS = [
    ((0, 0, 0), (40, 96, 96)),
    ((3, 17, 5), (19, 60, 91)),
    ((39, 95, 95), (40, 96, 96)),
    ((10, 0, 33), (11, 96, 34)),
]


@pytest.mark.parametrize("kind", ["npy", "tiff", "bigtiff", "pages", "omezarr", "plainzarr"])
def test_reads_identical(files, data, kind):
    vol = open_volume(files[kind], voxel_size_um=VOX)
    assert vol.shape == data.shape and vol.dtype == np.uint8
    assert vol.voxel_size_um == VOX
    assert vol.extent_um == (160.0, 192.0, 192.0)
    for start, stop in BLOCKS:
        key = tuple(slice(a, b) for a, b in zip(start, stop))
        np.testing.assert_array_equal(vol[key], data[key])
        np.testing.assert_array_equal(vol.read_block(start, stop), data[key])
    np.testing.assert_array_equal(vol[5], data[5])
    np.testing.assert_array_equal(vol[2:9:3, 4, ::7], data[2:9:3, 4, ::7])


@pytest.mark.parametrize("kind", ["npy", "bigtiff", "omezarr"])
def test_padded_read(files, data, kind):
    vol = open_volume(files[kind], voxel_size_um=VOX)
    block = vol.read_block((-3, 90, -2), (5, 100, 4), fill=7)
    assert block.shape == (8, 10, 6) and block.dtype == np.uint8
    expect = np.full((8, 10, 6), 7, np.uint8)
    expect[3:, :6, 2:] = data[0:5, 90:96, 0:4]
    np.testing.assert_array_equal(block, expect)
    outside = vol.read_block((50, 0, 0), (52, 3, 3), fill=1)
    assert outside.shape == (2, 3, 3) and np.all(outside == 1)
    assert vol.read_block((0, 0, 0), (0, 5, 5)).shape == (0, 5, 5)
    with pytest.raises(ValueError):
        vol.read_block((5, 0, 0), (4, 1, 1))


def test_omezarr_metadata_levels(files, data):
    vol = open_volume(files["omezarr"])  # voxel size from metadata
    assert vol.voxel_size_um == VOX and vol.origin_um == (0.0, 0.0, 0.0)
    assert vol.levels == ("0", "1", "2") and vol.chunks == (16, 32, 32)
    l1, l2 = vol.level(1), open_volume(files["omezarr"], level=2)
    assert l1.shape == (20, 48, 48) and l1.voxel_size_um == (8.0, 4.0, 4.0)
    assert l1.origin_um == (2.0, 1.0, 1.0)  # centre of level-0 voxels 0 and 1
    assert l2.shape == (10, 24, 24) and l2.voxel_size_um == (16.0, 8.0, 8.0)
    assert l2.origin_um == (6.0, 3.0, 3.0)
    np.testing.assert_allclose(l1.to_um([[0, 0, 0]]), [[2.0, 1.0, 1.0]])
    np.testing.assert_allclose(vol.to_voxel([[8.0, 4.0, 2.0]]), [[2.0, 2.0, 1.0]])
    # Same voxel size given explicitly is fine; a different one is an error.
    assert open_volume(files["omezarr"], voxel_size_um=list(VOX)).voxel_size_um == VOX
    with pytest.raises(VolumeError, match="metadata says"):
        open_volume(files["omezarr"], voxel_size_um=3.0)
    with pytest.raises(VolumeError, match="level 3 out of range"):
        vol.level(3)


def test_isotropic_scalar_and_plain_group(tmp_path, data):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("0", data=data, chunks=(8, 32, 32))
    g.create_array("1", data=data[::2, ::2, ::2], chunks=(8, 32, 32))
    vol = open_volume(tmp_path / "g.zarr", voxel_size_um=2.5)
    assert vol.voxel_size_um == (2.5, 2.5, 2.5) and vol.levels == ("0", "1")
    assert vol.level(1).voxel_size_um == (5.0, 5.0, 5.0)
    np.testing.assert_array_equal(vol.level(1)[3], data[6, ::2, ::2])


def test_singleton_axes_dropped(tmp_path, data):
    np.save(tmp_path / "v5.npy", data[None, None])
    vol = open_volume(tmp_path / "v5.npy", voxel_size_um=1)
    assert vol.shape == data.shape
    np.testing.assert_array_equal(vol[1:3, 4:9, 7], data[1:3, 4:9, 7])
    np.save(tmp_path / "mid.npy", data[:, None])  # (z, 1, y, x)
    vol = open_volume(tmp_path / "mid.npy", voxel_size_um=1)
    assert vol.shape == data.shape
    np.testing.assert_array_equal(vol[..., 7], data[..., 7])
    np.testing.assert_array_equal(vol[3, ..., 2:5], data[3, ..., 2:5])
    np.testing.assert_array_equal(vol.read_block((-1, 2, 3), (4, 9, 9)), np.pad(data[:4, 2:9, 3:9], ((1, 0), (0, 0), (0, 0))))
    one = tmp_path / "one.npy"
    np.save(one, data[:1])  # a single slice is still a (1, y, x) volume
    assert open_volume(one, voxel_size_um=1).shape == (1, 96, 96)


def test_tiff_written_page_by_page_contiguous(tmp_path, data):
    p = tmp_path / "contig.tif"
    with tifffile.TiffWriter(p, bigtiff=True) as w:
        for plane in data:
            w.write(plane, contiguous=True)
    vol = open_volume(p, voxel_size_um=1)
    assert vol.shape == data.shape and vol.chunks[1:] == (96, 96)
    np.testing.assert_array_equal(vol[5:30, 10:50, 3:90], data[5:30, 10:50, 3:90])


def test_pickle_and_close(files, data):
    vol = open_volume(files["bigtiff"], voxel_size_um=VOX)
    clone = pickle.loads(pickle.dumps(vol))
    np.testing.assert_array_equal(clone[3:6, 10:20, 30:40], data[3:6, 10:20, 30:40])
    with clone:
        pass
    np.testing.assert_array_equal(clone[1:2, 3:5, 7:9], data[1:2, 3:5, 7:9])  # reopened on demand
    assert open_volume(vol) is vol
    assert "bigtiff" not in repr(vol) and "shape=(40, 96, 96)" in repr(vol)


def test_npy_never_loaded(files):
    vol = open_volume(files["npy"], voxel_size_um=VOX)
    assert isinstance(vol._arr, np.memmap)


# ----------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError, match="file not found") as e:
        open_volume(tmp_path / "nope.tif", voxel_size_um=1)
    assert "nope.tif" in str(e.value) and isinstance(e.value, ValueError)


def test_unsupported_extension(tmp_path):
    p = tmp_path / "v.nii.gz"
    p.write_bytes(b"xx")
    with pytest.raises(VolumeError, match="unsupported volume format"):
        open_volume(p, voxel_size_um=1)


def test_missing_voxel_size(files):
    for kind in ("npy", "tiff", "plainzarr"):
        with pytest.raises(VolumeError, match="missing voxel size"):
            open_volume(files[kind])


@pytest.mark.parametrize("bad", [0, -1, [1, 2], "abc", [1, float("nan"), 1]])
def test_bad_voxel_size(files, bad):
    with pytest.raises(VolumeError, match="voxel_size_um"):
        open_volume(files["npy"], voxel_size_um=bad)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_truncated_tiff(tmp_path, data, fraction):
    for i, kw in enumerate([{}, {"bigtiff": True}, {"compression": "zlib"}, {"tile": (32, 32)}, None]):
        p = tmp_path / f"t{i}.tif"
        if kw is None:
            with tifffile.TiffWriter(p) as w:
                for plane in data:
                    w.write(plane, contiguous=False)
        else:
            tifffile.imwrite(p, data, **kw)
        size = p.stat().st_size
        with open(p, "r+b") as f:
            f.truncate(int(size * fraction))
        with pytest.raises(VolumeError, match="corrupt|truncated") as e:
            open_volume(p, voxel_size_um=1)
        assert str(p) in str(e.value)


def test_garbage_tiff_and_npy(tmp_path):
    p = tmp_path / "g.tif"
    p.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(VolumeError, match="corrupt or unreadable TIFF"):
        open_volume(p, voxel_size_um=1)
    q = tmp_path / "g.npy"
    q.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(VolumeError, match="unreadable .npy"):
        open_volume(q, voxel_size_um=1)


def test_truncated_npy(tmp_path, data):
    p = tmp_path / "t.npy"
    np.save(p, data)
    with open(p, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(VolumeError, match="npy"):
        open_volume(p, voxel_size_um=1)


def test_non_3d(tmp_path, data):
    np.save(tmp_path / "a2.npy", data[0])
    with pytest.raises(VolumeError, match="expected a 3D"):
        open_volume(tmp_path / "a2.npy", voxel_size_um=1)
    np.save(tmp_path / "a4.npy", np.stack([data, data]))
    with pytest.raises(VolumeError, match="expected a 3D"):
        open_volume(tmp_path / "a4.npy", voxel_size_um=1)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(VolumeError, match="expected a 3D"):
        open_volume(tmp_path / "rgb.tif", voxel_size_um=1)


def test_not_a_zarr_store(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(VolumeError, match="zarr"):
        open_volume(tmp_path / "empty.zarr", voxel_size_um=1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path, data):
    p = tmp_path / "locked.npy"
    np.save(p, data)
    p.chmod(0)
    with pytest.raises(VolumeError, match="not readable"):
        open_volume(p, voxel_size_um=1)


def test_volume_class_direct(files):
    assert isinstance(Volume(files["npy"], VOX), Volume)


_SHARED: dict = {}


def _read_in_child(z):
    vol = _SHARED["vol"]  # inherited through fork, not pickled
    return os.getpid(), int(vol[z : z + 4, 10:60, 5:80].astype(np.int64).sum())


def test_forked_workers_read_tiff_correctly(files, data):
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork start method")
    vol = open_volume(files["bigtiff"], voxel_size_um=VOX)
    vol[0:2, 0:2, 0:2]  # the parent has used its file handle before forking
    _SHARED["vol"] = vol
    zs = list(range(0, 36, 3)) * 4
    try:
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map(_read_in_child, zs, chunksize=1)
    finally:
        _SHARED.clear()
    assert [s for _, s in got] == [int(data[z : z + 4, 10:60, 5:80].astype(np.int64).sum()) for z in zs]
    assert os.getpid() not in {pid for pid, _ in got}
    np.testing.assert_array_equal(vol[7:9], data[7:9])  # the parent's handle still works


def test_tiff_voxel_size_as_fiji_and_ome_write_it(tmp_path):
    """Voxel sizes from TIFFs written the way tifffile documents ImageJ hyperstacks (X/YResolution
    in pixels per unit, ``spacing`` and ``unit`` in the ImageJ description) and OME-TIFF
    (``PhysicalSize{X,Y,Z}`` with their units), not with this project's writer."""
    data = np.arange(4 * 6 * 8, dtype=np.uint8).reshape(4, 6, 8)
    fiji = tmp_path / "fiji.tif"
    tifffile.imwrite(fiji, data, imagej=True, resolution=(1 / 0.8, 1 / 0.6),  # x, y: pixels per micron
                     metadata={"spacing": 2.5, "unit": "um", "axes": "ZYX"})
    assert open_volume(fiji).voxel_size_um == pytest.approx((2.5, 0.6, 0.8))
    ome = tmp_path / "scan.ome.tif"
    tifffile.imwrite(ome, data, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.0016, "PhysicalSizeXUnit": "mm", "PhysicalSizeY": 1.6,
        "PhysicalSizeYUnit": "µm", "PhysicalSizeZ": 3.2, "PhysicalSizeZUnit": "µm"})
    assert open_volume(ome).voxel_size_um == pytest.approx((3.2, 1.6, 1.6))
    np.testing.assert_array_equal(open_volume(ome).read_block((0, 0, 0), (4, 6, 8)), data)

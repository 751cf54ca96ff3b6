"""The threaded chunk reader against zarr itself: every fixture is written by zarr-python, and
every box the reader returns must equal what zarr reads from the same array."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, TransposeCodec, ZstdCodec

from xpression.data.volume import open_volume
from xpression.data.zarr_chunks import ChunkReader

SHAPE, CHUNKS = (13, 40, 37), (4, 16, 8)


def _data(dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is None:
        return rng.normal(size=SHAPE).astype(dtype)
    return rng.integers(info.min, info.max, size=SHAPE, endpoint=True, dtype=dtype)


def _boxes(rng: np.random.Generator, n: int = 25) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    out = [((0, 0, 0), SHAPE), ((3, 15, 7), (5, 17, 9)), ((0, 0, 0), (1, 1, 1))]
    for _ in range(n):
        a = [int(rng.integers(0, s)) for s in SHAPE]
        out.append((tuple(a), tuple(int(rng.integers(x + 1, s + 1)) for x, s in zip(a, SHAPE))))
    return out


def _check_same_as_zarr(arr: zarr.Array, seed: int = 1) -> None:
    reader = ChunkReader.for_array(arr)
    assert reader is not None
    for lo, hi in _boxes(np.random.default_rng(seed)):
        want = arr[tuple(slice(a, b) for a, b in zip(lo, hi))]
        got = reader.read_into(lo, hi, np.empty(want.shape, reader.dtype))
        np.testing.assert_array_equal(got, want)


V3_LAYOUTS = {
    "zstd": dict(compressors=[ZstdCodec(level=3)]),
    "gzip": dict(compressors=[GzipCodec(level=5)]),
    "blosc": dict(compressors=[BloscCodec(cname="lz4", clevel=5)]),
    "zstd+crc32c": dict(compressors=[ZstdCodec(), Crc32cCodec()]),
    "raw big-endian": dict(compressors=None, serializer=BytesCodec(endian="big")),
    "raw little-endian": dict(compressors=None, serializer=BytesCodec(endian="little")),
}


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
@pytest.mark.parametrize("layout", list(V3_LAYOUTS))
def test_v3_boxes_equal_zarr_reads(tmp_path, layout, dtype):
    arr = zarr.create_array(tmp_path / "a.zarr", shape=SHAPE, chunks=CHUNKS, dtype=dtype, **V3_LAYOUTS[layout])
    arr[:] = _data(dtype)
    _check_same_as_zarr(arr)


@pytest.mark.parametrize("separator", [".", "/"])
@pytest.mark.parametrize("compressor", ["default", None])
def test_v2_boxes_equal_zarr_reads(tmp_path, separator, compressor):
    kw = {} if compressor == "default" else {"compressors": None}
    arr = zarr.create_array(tmp_path / "a.zarr", shape=SHAPE, chunks=CHUNKS, dtype="uint16", zarr_format=2,
                            chunk_key_encoding={"name": "v2", "separator": separator}, **kw)
    arr[:] = _data("uint16")
    _check_same_as_zarr(arr)


def test_missing_chunks_read_as_the_fill_value(tmp_path):
    arr = zarr.create_array(tmp_path / "a.zarr", shape=SHAPE, chunks=CHUNKS, dtype="uint8", fill_value=7)
    arr[4:8, 16:32, 8:16] = 200  # one chunk written; the others are never stored
    stored = [p for p in (tmp_path / "a.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(stored) == 1
    _check_same_as_zarr(arr)
    got = ChunkReader.for_array(arr).read_into((0, 0, 0), SHAPE, np.empty(SHAPE, np.uint8))
    assert (got == 7).sum() == np.prod(SHAPE) - 4 * 16 * 8 and (got == 200).sum() == 4 * 16 * 8


def test_a_corrupted_chunk_fails_its_checksum(tmp_path):
    arr = zarr.create_array(tmp_path / "a.zarr", shape=SHAPE, chunks=CHUNKS, dtype="uint8",
                            compressors=[Crc32cCodec()])
    arr[:] = _data("uint8")
    chunk = tmp_path / "a.zarr" / "c" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        ChunkReader.for_array(arr).read_into((0, 0, 0), (2, 2, 2), np.empty((2, 2, 2), np.uint8))


@pytest.mark.parametrize("layout", ["sharded", "transposed", "v2 filters", "v2 F order"])
def test_layouts_it_does_not_decode_are_left_to_zarr(tmp_path, layout):
    from numcodecs import Delta

    kw = {"sharded": dict(shards=(8, 32, 16)), "transposed": dict(filters=[TransposeCodec(order=(2, 1, 0))]),
          "v2 filters": dict(zarr_format=2, filters=[Delta(dtype="u1")]), "v2 F order": dict(zarr_format=2, order="F")}[layout]
    arr = zarr.create_array(tmp_path / "a.zarr", shape=SHAPE, chunks=CHUNKS, dtype="uint8", **kw)
    assert ChunkReader.for_array(arr) is None


def test_volume_read_block_matches_zarr_with_singleton_axes_and_overhang(tmp_path):
    """A 5-D (t, c, z, y, x) array, as OME-Zarr stores one channel, read past its edges."""
    data = _data("uint8")
    arr = zarr.create_array(tmp_path / "v.zarr", shape=(1, 1) + SHAPE, chunks=(1, 1) + CHUNKS, dtype="uint8")
    arr[:] = data[None, None]
    vol = open_volume(tmp_path / "v.zarr", voxel_size_um=[2.0, 1.0, 1.0])
    assert vol._chunk_reader is not None and vol.shape == SHAPE
    got = vol.read_block((-2, 30, -5), (9, 45, 20), fill=3)
    want = np.full((11, 15, 25), 3, np.uint8)
    want[2:, :10, 5:] = data[0:9, 30:40, 0:20]
    np.testing.assert_array_equal(got, want)
    vol._chunk_reader = None  # the same read through zarr
    np.testing.assert_array_equal(vol.read_block((-2, 30, -5), (9, 45, 20), fill=3), want)


def test_a_box_outside_the_array_is_refused(tmp_path):
    arr = zarr.create_array(tmp_path / "a.zarr", shape=SHAPE, chunks=CHUNKS, dtype="uint8")
    reader = ChunkReader.for_array(arr)
    with pytest.raises(ValueError, match="not inside"):
        reader.read_into((0, 0, 0), (14, 1, 1), np.empty((14, 1, 1), np.uint8))


def test_read_threads_from_the_environment(monkeypatch):
    from xpression.data.zarr_chunks import read_threads

    monkeypatch.setenv("XPRESSION_READ_THREADS", "3")
    assert read_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("XPRESSION_READ_THREADS", bad)
        with pytest.raises(ValueError, match="XPRESSION_READ_THREADS must be a positive integer"):
            read_threads()


def test_a_forked_child_reads_with_its_own_pool(tmp_path):
    """A fork while the parent holds the pool's lock (a reader thread mid-read) must not leave
    the child waiting on a lock no thread of its own will release."""
    import multiprocessing as mp

    from xpression.data import zarr_chunks

    arr = zarr.create_array(tmp_path / "a.zarr", shape=SHAPE, chunks=CHUNKS, dtype="uint8")
    arr[:] = _data("uint8")
    reader = ChunkReader.for_array(arr)
    reader.read_into((0, 0, 0), SHAPE, np.empty(SHAPE, np.uint8))  # the parent's pool exists
    ctx = mp.get_context("fork")
    with zarr_chunks._pool_lock:  # held across the fork
        proc = ctx.Process(target=_child_read, args=(str(tmp_path / "a.zarr"),))
        proc.start()
    proc.join(timeout=60)
    if proc.is_alive():  # waiting on the copied lock
        proc.kill()
        proc.join()
    assert proc.exitcode == 0


def _child_read(path: str) -> None:
    arr = zarr.open_array(path, mode="r")
    got = ChunkReader.for_array(arr).read_into((0, 0, 0), SHAPE, np.empty(SHAPE, np.uint8))
    raise SystemExit(0 if np.array_equal(got, arr[:]) else 1)


def test_a_bad_thread_count_is_a_volume_error_at_open(tmp_path, monkeypatch):
    """Reported by train.py and infer.py on one line (VolumeError is an input error), before any read."""
    from xpression.cli import input_error
    from xpression.data.volume import VolumeError

    arr = zarr.create_array(tmp_path / "a.zarr", shape=SHAPE, chunks=CHUNKS, dtype="uint8")
    monkeypatch.setenv("XPRESSION_READ_THREADS", "many")
    with pytest.raises(VolumeError, match="XPRESSION_READ_THREADS must be a positive integer, got 'many'") as err:
        open_volume(tmp_path / "a.zarr", voxel_size_um=[1, 1, 1])
    assert input_error(err.value) is err.value

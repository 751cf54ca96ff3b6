"""Blocks of a local zarr array read chunk by chunk on a thread pool.

zarr-python's synchronous API hands every read to one event loop, so reading blocks from several
threads does not add up: a 64^3-chunked uint8 volume read at about 190 MVoxel/s here whatever
the number of threads, and at 155 MVoxel/s with 4 threads on a 16-core GPU machine, below what
the GPU sweeps. The decoders zarr itself calls (numcodecs' zstd, blosc and gzip) release the GIL,
so decoding chunks on a pool of threads scales with the cores.

Only layouts decoded here exactly as zarr decodes them are taken; :meth:`ChunkReader.for_array`
returns ``None`` for anything else (sharding, transpose or other codecs, zarr v2 filters or
Fortran order, remote stores), and the caller reads through zarr as before:

- zarr v3: a regular chunk grid, the ``bytes`` codec (either endianness), then any of ``zstd``,
  ``gzip``, ``blosc`` and ``crc32c`` (the checksum is verified, as zarr does);
- zarr v2: C order, no filters, any numcodecs compressor (or none).

Chunk files are named by the array's own chunk-key encoding; a missing chunk is the fill value.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["ChunkReader", "read_threads"]

_V3_BYTES_CODECS = ("zstd", "gzip", "blosc", "crc32c")
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def read_threads() -> int:
    """Threads decoding chunks: ``XPRESSION_READ_THREADS`` or one per CPU core."""
    env = os.environ.get("XPRESSION_READ_THREADS")
    if not env:
        return max(1, os.cpu_count() or 1)
    if not env.strip().isdigit() or int(env) < 1:
        raise ValueError(f"XPRESSION_READ_THREADS must be a positive integer, got {env!r}")
    return int(env)


def _reset_after_fork() -> None:
    # a fork copies neither the pool's threads nor a lock a reading thread may hold at that moment
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _executor() -> ThreadPoolExecutor:
    """One pool per process (a forked loader worker makes its own: see :func:`_reset_after_fork`)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(read_threads(), thread_name_prefix="xpression-chunks")
        return _pool


def _crc32c_stripped(data: bytes) -> bytes:
    import google_crc32c

    body, stored = data[:-4], data[-4:]
    computed = np.uint32(google_crc32c.value(body)).tobytes()  # little-endian, as zarr stores it
    if computed != bytes(stored):
        raise ValueError(f"zarr chunk checksum mismatch: stored {bytes(stored)!r}, computed {computed!r}")
    return body


def _v3_decoders(codecs: Sequence[dict]) -> tuple[list[Callable[[bytes], bytes]], str | None] | None:
    """Bytes-to-bytes decoders in decoding order and the ``bytes`` codec's endianness, or None."""
    if not codecs or codecs[0].get("name") != "bytes":
        return None
    endian = (codecs[0].get("configuration") or {}).get("endian")
    decoders: list[Callable[[bytes], bytes]] = []
    for c in codecs[1:]:
        name = c.get("name")
        if name not in _V3_BYTES_CODECS:
            return None
        if name == "crc32c":
            decoders.append(_crc32c_stripped)
        else:
            from numcodecs import Blosc, GZip, Zstd

            decoders.append({"zstd": Zstd(), "gzip": GZip(), "blosc": Blosc()}[name].decode)
    return decoders[::-1], endian


class ChunkReader:
    """Reads ``[start, stop)`` boxes of one local zarr array, decoding its chunks in parallel.

    Args (use :meth:`for_array`): ``root`` the array's folder, ``encode_key`` its chunk-key
    encoding, ``shape`` / ``chunks`` (voxels per axis), ``dtype`` of the stored bytes,
    ``fill`` for missing chunks, ``decoders`` applied to each chunk file's bytes in order.
    """

    def __init__(self, root: Path, encode_key: Callable[[tuple[int, ...]], str], shape: Sequence[int],
                 chunks: Sequence[int], dtype: np.dtype, fill: Any, decoders: list[Callable[[bytes], bytes]]):
        self.root, self.encode_key = Path(root), encode_key
        self.shape = tuple(int(s) for s in shape)
        self.chunks = tuple(int(c) for c in chunks)
        self.stored_dtype = np.dtype(dtype)
        self.dtype = self.stored_dtype.newbyteorder("=")
        self.fill = fill
        self.decoders = decoders

    @classmethod
    def for_array(cls, arr: Any) -> "ChunkReader | None":
        """A reader for a zarr ``Array`` on a local store whose layout this module decodes, else None."""
        try:
            from zarr.storage import LocalStore

            if not isinstance(arr.store, LocalStore):
                return None
            meta = arr.metadata
            root = Path(str(arr.store.root))
            if arr.path:
                root = root / arr.path
            fill = arr.fill_value
            if fill is None:
                return None
            if meta.zarr_format == 3:
                d = meta.to_dict()
                if d.get("storage_transformers") or d.get("chunk_grid", {}).get("name") != "regular":
                    return None
                parsed = _v3_decoders(d.get("codecs") or [])
                if parsed is None:
                    return None
                decoders, endian = parsed
                dtype = np.dtype(arr.dtype)
                if dtype.itemsize > 1:
                    dtype = dtype.newbyteorder("<" if endian == "little" else ">" if endian == "big" else "=")
            elif meta.zarr_format == 2:
                if meta.filters or meta.order != "C":
                    return None
                comp = meta.compressor
                decoders = [comp.decode] if comp is not None else []
                dtype = np.dtype(meta.dtype.to_native_dtype())
            else:
                return None
            if dtype.hasobject or dtype.kind not in "biuf":
                return None
            return cls(root, meta.encode_chunk_key, arr.shape, arr.chunks, dtype, fill, decoders)
        except (AttributeError, ImportError, TypeError, ValueError):  # another zarr version's API
            return None

    def _chunk(self, coords: tuple[int, ...]) -> np.ndarray | None:
        """The decoded chunk at chunk-grid ``coords``; None where no file is stored (fill value)."""
        try:
            data: bytes = (self.root / self.encode_key(coords)).read_bytes()
        except FileNotFoundError:
            return None
        for decode in self.decoders:
            data = decode(data)
        return np.frombuffer(data, dtype=self.stored_dtype).reshape(self.chunks)

    def read_into(self, start: Sequence[int], stop: Sequence[int], out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (shape ``stop - start``, inside the array) with the box ``[start, stop)``."""
        start = tuple(int(s) for s in start)
        stop = tuple(int(s) for s in stop)
        if any(a < 0 or b > n or b < a for a, b, n in zip(start, stop, self.shape)):
            raise ValueError(f"box {start}-{stop} is not inside the array of shape {self.shape}")
        if out.shape != tuple(b - a for a, b in zip(start, stop)):
            raise ValueError(f"out has shape {out.shape}, the box {start}-{stop} needs {tuple(b - a for a, b in zip(start, stop))}")
        ranges = [range(a // c, (b - 1) // c + 1) if b > a else range(0) for a, b, c in zip(start, stop, self.chunks)]

        def copy(coords: tuple[int, ...]) -> None:
            lo = [max(a, k * c) for a, k, c in zip(start, coords, self.chunks)]
            hi = [min(b, (k + 1) * c) for b, k, c in zip(stop, coords, self.chunks)]
            dst = tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, start))
            chunk = self._chunk(coords)
            if chunk is None:
                out[dst] = self.fill
            else:
                out[dst] = chunk[tuple(slice(l - k * c, h - k * c) for l, h, k, c in zip(lo, hi, coords, self.chunks))]

        todo = list(itertools.product(*ranges))
        if len(todo) <= 1:
            for coords in todo:
                copy(coords)
        else:
            for fut in [_executor().submit(copy, coords) for coords in todo]:
                fut.result()
        return out

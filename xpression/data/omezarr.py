"""Streamed OME-Zarr 0.5 (zarr v3) writer with a 2x-mean multiscale pyramid.

Level ``k`` has shape ``ceil(shape / 2**k)`` and voxel size ``voxel_size_um * 2**k``; its
voxel ``j`` is the mean of level-0 voxels ``2**k * j ... 2**k * (j + 1) - 1`` that exist, so
its centre sits at ``(2**k - 1) / 2`` level-0 voxels, which the OME ``translation`` records
(um). Data are written one z slab at a time, so memory stays bounded by one slab.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from xpression.data.volume import VolumeError, _as_voxel_size

__all__ = ["OmeZarrWriter", "write_omezarr", "ome_multiscales_metadata", "downsample2_mean", "level_shapes"]

AXES = [
    {"name": "z", "type": "space", "unit": "micrometer"},
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]


def level_shapes(shape: Sequence[int], levels: int) -> list[tuple[int, int, int]]:
    """Shapes of the ``levels`` pyramid levels (each ``ceil`` of half the previous one)."""
    return [tuple(int(math.ceil(s / 2**k)) for s in shape) for k in range(levels)]  # type: ignore[misc]


def ome_multiscales_metadata(voxel_size_um: Sequence[float], levels: int, name: str | None = None) -> dict:
    """The ``{"ome": {...}}`` group attributes for a ``levels``-level 2x pyramid (scales in um)."""
    vox = np.asarray(voxel_size_um, dtype=float)
    datasets = []
    for k in range(levels):
        f = 2.0**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [float(v) for v in vox * f]},
                    {"type": "translation", "translation": [float(v) for v in vox * (f - 1) / 2]},
                ],
            }
        )
    ms: dict[str, Any] = {"axes": AXES, "datasets": datasets, "type": "mean"}
    if name:
        ms["name"] = name
    return {"ome": {"version": "0.5", "multiscales": [ms]}}


def downsample2_mean(block: np.ndarray) -> np.ndarray:
    """2x mean downsampling of a 3D block; odd edges average only the voxels that exist.

    Integer results are rounded to nearest; works plane pair by plane pair so the float
    temporary is two planes, not the whole block.
    """
    nz = int(math.ceil(block.shape[0] / 2))
    ny, nx = (int(math.ceil(s / 2)) for s in block.shape[1:])
    out = np.empty((nz, ny, nx), dtype=block.dtype)
    integer = np.issubdtype(block.dtype, np.integer) or block.dtype == np.bool_
    for j in range(nz):
        pair = np.asarray(block[2 * j : 2 * j + 2], dtype=np.float64).mean(axis=0)
        # Edge padding by replication keeps the mean equal to that of the real voxels.
        pair = np.pad(pair, ((0, 2 * ny - pair.shape[0]), (0, 2 * nx - pair.shape[1])), mode="edge")
        plane = pair.reshape(ny, 2, nx, 2).mean(axis=(1, 3))
        if integer:
            info = np.iinfo(block.dtype) if block.dtype != np.bool_ else None
            plane = np.rint(plane)
            if info is not None:
                plane = np.clip(plane, info.min, info.max)
        out[j] = plane
    return out


class OmeZarrWriter:
    """Create an OME-Zarr pyramid and fill it slab by slab (``slab_depth`` level-0 z slices).

    ``write_slab(z0, data)`` needs ``z0`` to be a multiple of ``slab_depth`` and ``data`` to
    hold ``slab_depth`` slices (fewer only for the last slab). Writing a slab twice gives the
    same result, which makes interrupted writes resumable.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        shape: Sequence[int],
        dtype: Any,
        voxel_size_um: Any,
        chunk: Sequence[int] = (64, 64, 64),
        levels: int = 3,
        name: str | None = None,
        overwrite: bool = False,
        attributes: dict | None = None,
        open_existing: bool = False,
    ):
        import zarr

        self.path = Path(out)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise VolumeError(self.path, f"expected a non-empty 3D (z, y, x) shape, got {self.shape}")
        self.dtype = np.dtype(dtype)
        self.voxel_size_um = _as_voxel_size(voxel_size_um, self.path)
        self.levels = max(1, int(levels))
        self.chunk = tuple(int(c) for c in chunk)
        if len(self.chunk) != 3 or min(self.chunk) < 1:
            raise ValueError(f"chunk must be 3 positive ints, got {chunk!r}")
        step = 2 ** (self.levels - 1)
        self.slab_depth = int(math.ceil(self.chunk[0] / step) * step)
        self.shapes = level_shapes(self.shape, self.levels)
        if open_existing:
            self.group = zarr.open_group(str(self.path), mode="r+")
            self.arrays = [self.group[str(k)] for k in range(self.levels)]
            return
        if self.path.exists():
            if not overwrite:
                raise VolumeError(self.path, "output exists; pass overwrite=True to replace it")
            remove_path(self.path)
        self.group = zarr.open_group(str(self.path), mode="w-", zarr_format=3)
        attrs = ome_multiscales_metadata(self.voxel_size_um, self.levels, name)
        attrs.update(attributes or {})
        self.group.attrs.update(attrs)
        self.arrays = [
            self.group.create_array(
                str(k),
                shape=s,
                dtype=self.dtype,
                chunks=tuple(min(c, n) for c, n in zip(self.chunk, s)),
                fill_value=0,
                dimension_names=["z", "y", "x"],
            )
            for k, s in enumerate(self.shapes)
        ]

    def slabs(self) -> list[tuple[int, int]]:
        """Level-0 ``(z0, z1)`` ranges of all slabs, in order."""
        d, n = self.slab_depth, self.shape[0]
        return [(z, min(z + d, n)) for z in range(0, n, d)]

    def write_slab(self, z0: int, data: np.ndarray) -> None:
        """Write level-0 slices ``z0 .. z0 + len(data)`` and their downsampled pyramid parts."""
        if z0 % self.slab_depth:
            raise ValueError(f"slab start {z0} is not a multiple of slab_depth {self.slab_depth}")
        data = np.asarray(data)
        expect = (min(self.slab_depth, self.shape[0] - z0),) + self.shape[1:]
        if data.shape != expect:
            raise ValueError(f"slab at z0={z0} has shape {data.shape}, expected {expect}")
        block = data.astype(self.dtype, copy=False)
        for k, arr in enumerate(self.arrays):
            if k:
                block = downsample2_mean(block)
            zk = z0 // 2**k
            arr[zk : zk + block.shape[0]] = block


def remove_path(path: Path) -> None:
    """Delete a file, a link or a whole directory tree; a missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _iter_slabs(data: Any, writer: OmeZarrWriter) -> Iterable[tuple[int, np.ndarray]]:
    """Yield ``(z0, slab)`` aligned to the writer's slabs from an array-like or an iterable of
    consecutive z blocks of any thickness."""
    if hasattr(data, "shape") and hasattr(data, "__getitem__"):
        for z0, z1 in writer.slabs():
            yield z0, np.asarray(data[z0:z1])
        return
    buf: list[np.ndarray] = []
    have, z0 = 0, 0
    for block in data:
        block = np.asarray(block)
        if block.ndim == 2:
            block = block[None]
        buf.append(block)
        have += block.shape[0]
        while have >= writer.slab_depth or (buf and z0 + have >= writer.shape[0]):
            cat = np.concatenate(buf, axis=0)
            n = min(writer.slab_depth, writer.shape[0] - z0)
            yield z0, cat[:n]
            z0 += n
            rest = cat[n:]
            buf, have = ([rest] if rest.shape[0] else []), rest.shape[0]
            if z0 >= writer.shape[0]:
                if have:
                    raise ValueError(f"blocks hold more than the {writer.shape[0]} declared z slices")
                break
    if z0 < writer.shape[0]:
        raise ValueError(f"blocks ended after {z0 + have} of {writer.shape[0]} z slices")


def write_omezarr(
    data: Any,
    out: str | os.PathLike,
    voxel_size_um: Any,
    chunk: Sequence[int] = (64, 64, 64),
    levels: int = 3,
    overwrite: bool = False,
    name: str | None = None,
    shape: Sequence[int] | None = None,
    dtype: Any = None,
    attributes: dict | None = None,
    progress: bool = False,
    on_slab: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a 3D volume as OME-Zarr 0.5 with a ``levels``-level 2x-mean pyramid.

    ``data``: an array-like indexed ``(z, y, x)`` (numpy, zarr, :class:`Volume`) read one slab at
    a time, or an iterable of consecutive z blocks (2D slices or 3D slabs, any thickness), in
    which case ``shape`` and ``dtype`` are required. ``voxel_size_um``: ``[z, y, x]`` of level 0
    in um. ``on_slab(z0, z1)`` is called after each slab. Returns the output path.
    """
    if hasattr(data, "shape") and hasattr(data, "__getitem__"):
        shape = tuple(data.shape) if shape is None else shape
        dtype = data.dtype if dtype is None else dtype
    elif shape is None or dtype is None:
        raise ValueError("write_omezarr: shape and dtype are required when data is an iterable of blocks")
    writer = OmeZarrWriter(out, shape, dtype, voxel_size_um, chunk, levels, name, overwrite, attributes)
    bar = _progress(len(writer.slabs()), f"writing {Path(out).name}", progress)
    try:
        for z0, slab in _iter_slabs(data, writer):
            writer.write_slab(z0, slab)
            if on_slab is not None:
                on_slab(z0, z0 + slab.shape[0])
            bar.update(1)
    finally:
        bar.close()
    return writer.path


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="slab", disable=not enabled, leave=False)

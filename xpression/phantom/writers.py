"""File writers: OME-Zarr 0.5 volumes and pyramids, program-field truth, BigTIFF, AnnData, manifest."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
import zarr

SPACE_AXES = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("z", "y", "x")]


def n_levels(shape: tuple[int, ...], chunk: int) -> int:
    """Pyramid depth: halve until the largest axis fits a chunk or the smallest gets under 8."""
    levels, s = 1, list(shape)
    while max(s) > chunk and min(s) >= 16:
        s = [(n + 1) // 2 for n in s]
        levels += 1
    return levels


def _multiscales(name: str, voxel: list[float], levels: int) -> dict[str, Any]:
    datasets = []
    for lv in range(levels):
        f = 2**lv
        tr: list[dict[str, Any]] = [{"type": "scale", "scale": [v * f for v in voxel]}]
        if lv:
            # a level-l voxel averages 2^l level-0 voxels: its centre is shifted by (2^l - 1)/2
            tr.append({"type": "translation", "translation": [v * (f - 1) / 2 for v in voxel]})
        datasets.append({"path": str(lv), "coordinateTransformations": tr})
    return {"ome": {"version": "0.5", "multiscales": [{
        "name": name, "axes": SPACE_AXES, "datasets": datasets, "type": "mean",
        "metadata": {"description": "2x2x2 mean per level", "method": "numpy.mean"}}]}}


def chunk_grid(shape: tuple[int, ...], chunk: int) -> list[tuple[int, int, int]]:
    """All chunk indices (cz, cy, cx) of a 3D array, C order."""
    n = [-(-s // chunk) for s in shape]
    return [(a, b, c) for a in range(n[0]) for b in range(n[1]) for c in range(n[2])]


def create_volume(path: Path, name: str, shape: tuple[int, int, int], voxel: list[float],
                  chunk: int) -> tuple[zarr.Group, int]:
    """Create the OME-Zarr group and every (empty) level array; return (group, levels)."""
    levels = n_levels(shape, chunk)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    s = list(shape)
    for lv in range(levels):
        root.create_array(str(lv), shape=tuple(s), chunks=(chunk,) * 3, dtype="uint8",
                          fill_value=0, dimension_names=["z", "y", "x"])
        s = [(n + 1) // 2 for n in s]
    root.attrs.update(_multiscales(name, voxel, levels))
    return root, levels


def downsample_level(root: zarr.Group, level: int, chunk: int,
                     run: Callable[[Callable, list], Iterator]) -> None:
    """Fill level `level` from level - 1 by 2x2x2 means, one output chunk at a time."""
    src, dst = root[str(level - 1)], root[str(level)]

    def one(idx: tuple[int, int, int]) -> tuple[tuple[slice, ...], np.ndarray]:
        out_sl = tuple(slice(i * chunk, min((i + 1) * chunk, n)) for i, n in zip(idx, dst.shape))
        block = src[tuple(slice(2 * s.start, min(2 * s.stop, n)) for s, n in zip(out_sl, src.shape))]
        block = block.astype(np.float32)
        want = [2 * (s.stop - s.start) for s in out_sl]
        pad = [(0, w - b) for w, b in zip(want, block.shape)]
        if any(p[1] for p in pad):
            block = np.pad(block, pad, mode="edge")
        m = block.reshape(want[0] // 2, 2, want[1] // 2, 2, want[2] // 2, 2).mean(axis=(1, 3, 5))
        return out_sl, np.rint(m).astype(np.uint8)

    for sl, data in run(one, chunk_grid(dst.shape, chunk)):
        dst[sl] = data


def write_program_field(path: Path, name: str, field: np.ndarray, spacing_um: float,
                        programs: list[str]) -> None:
    """Coarse truth field (P, z, y, x) float32 as a single-level OME-Zarr 0.5 image."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    chunks = (1,) + tuple(min(64, n) for n in field.shape[1:])
    arr = root.create_array("0", shape=field.shape, chunks=chunks, dtype="float32",
                            fill_value=0.0, dimension_names=["c", "z", "y", "x"])
    arr[...] = field.astype(np.float32)
    root.attrs.update({
        "ome": {"version": "0.5", "multiscales": [{
            "name": name,
            "axes": [{"name": "c", "type": "channel"}] + SPACE_AXES,
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, spacing_um, spacing_um, spacing_um]}]}],
        }], "omero": {"channels": [{"label": p} for p in programs]}},
        "programs": list(programs),
    })


def write_tiff(path: Path, array: zarr.Array, voxel: list[float], slab: int = 64) -> None:
    """OME-TIFF (BigTIFF) stack, one page per z slice, streamed from level 0 slab by slab; the
    voxel size [z, y, x] um as OME ``Pixels`` ``PhysicalSize{Z,Y,X}`` (tifffile's ``ome=True``
    metadata), so readers (tifffile, Fiji/Bio-Formats, ``open_volume``) need no extra argument."""
    import tifffile

    def pages() -> Iterator[np.ndarray]:
        for z0 in range(0, array.shape[0], slab):
            block = array[z0:z0 + slab]
            yield from block

    physical = {}
    for axis, size in zip("ZYX", voxel):
        physical[f"PhysicalSize{axis}"] = float(size)
        physical[f"PhysicalSize{axis}Unit"] = "µm"
    tifffile.imwrite(str(path), data=pages(), shape=array.shape, dtype=np.uint8, bigtiff=True, ome=True,
                     photometric="minisblack", metadata={"axes": "ZYX", **physical})


def write_h5ad(adata: Any, path: Path) -> None:
    """Write an AnnData as ``.h5ad`` with its string indices and columns as object arrays.

    Under pandas 3 (or pandas 2 with ``future.infer_string``) strings default to pandas' string
    dtype, which anndata refuses to write unless ``allow_write_nullable_strings`` is set (and
    anndata < 0.11 cannot read). Object arrays of str are written as every anndata version reads
    them. The AnnData is changed in place (same values, object dtype).
    """
    for axis in ("obs", "var"):
        frame = getattr(adata, axis)
        if isinstance(frame.index.dtype, pd.StringDtype):
            setattr(adata, f"{axis}_names", frame.index.astype(object))
        for column in frame.columns:
            if isinstance(frame[column].dtype, pd.StringDtype):
                frame[column] = frame[column].astype(object)
    adata.write_h5ad(path)


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """cohort.yaml, keys in the order of docs/design.md."""
    path.write_text(yaml.safe_dump(manifest, sort_keys=False, default_flow_style=None))

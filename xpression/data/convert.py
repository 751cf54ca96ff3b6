"""Resumable, streamed conversion of a TIFF / BigTIFF stack (or any readable volume) to OME-Zarr.

The source is read ``slab_depth`` z slices at a time (``chunk[0]`` rounded up to a multiple
of ``2**(levels-1)``), so memory stays bounded by one slab whatever the volume size. Finished
slabs are recorded in a small sidecar JSON inside the output group (replaced atomically after
each slab); an interrupted run is resumed by calling the function again with the same
arguments, and the result is identical to an uninterrupted run.

Command line: ``python -m xpression.data.convert STACK.tif OUT.ome.zarr --voxel-size-um 1.6``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from xpression.data.omezarr import OmeZarrWriter, _progress
from xpression.data.volume import VolumeError, _as_voxel_size, open_volume

__all__ = ["convert_tiff_to_omezarr", "convert_to_omezarr"]

PROGRESS_FILE = ".xpression_convert_progress.json"
ATTR_KEY = "xpression_conversion"

# Called as _AFTER_SLAB_HOOK(z0, z1) once a slab is written and recorded (tests use it to
# simulate an interruption).
_AFTER_SLAB_HOOK: Callable[[int, int], None] | None = None


def _record(src: Path, shape: Sequence[int], dtype: Any, voxel: Sequence[float], chunk: Sequence[int], levels: int) -> dict:
    st = src.stat()
    return {
        "source": str(src.resolve()),
        "source_bytes": int(st.st_size),
        "source_mtime_ns": int(st.st_mtime_ns),
        "shape": [int(s) for s in shape],
        "dtype": str(np.dtype(dtype)),
        "voxel_size_um": [float(v) for v in voxel],
        "chunk": [int(c) for c in chunk],
        "levels": int(levels),
    }


def _existing_record(out: Path) -> dict | None:
    try:
        meta = json.loads((out / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return (meta.get("attributes") or {}).get(ATTR_KEY)


def _read_done(out: Path) -> set[int]:
    try:
        return {int(z) for z in json.loads((out / PROGRESS_FILE).read_text())["done"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _write_done(out: Path, done: set[int]) -> None:
    tmp = out / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps({"done": sorted(done)}))
    os.replace(tmp, out / PROGRESS_FILE)


def convert_to_omezarr(
    src_path: str | os.PathLike,
    out_path: str | os.PathLike,
    voxel_size_um: Any = None,
    chunk: Sequence[int] = (64, 64, 64),
    levels: int = 3,
    overwrite: bool = False,
    progress: bool = True,
    name: str | None = None,
) -> Path:
    """Convert any volume :func:`open_volume` reads to OME-Zarr 0.5; see
    :func:`convert_tiff_to_omezarr` for the arguments and the resume rules."""
    src = Path(src_path)
    out = Path(out_path)
    a, b = src.resolve(), out.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise VolumeError(out, f"the output and the source {src} overlap; write the conversion elsewhere")
    vol = open_volume(src, voxel_size_um)
    try:
        voxel = _as_voxel_size(vol.voxel_size_um, src)
        record = _record(src, vol.shape, vol.dtype, voxel, chunk, levels)
        existing = _existing_record(out) if out.exists() else None
        same = existing is not None and {k: v for k, v in existing.items() if k != "complete"} == record
        if same and existing.get("complete"):
            return out
        if same:
            writer = OmeZarrWriter(out, vol.shape, vol.dtype, voxel, chunk, levels, open_existing=True)
            done = _read_done(out)
        else:
            if out.exists() and existing is None:  # not ours to delete, whatever overwrite says
                raise VolumeError(out, "output exists and is not a conversion written here; choose another output "
                                       "(nothing was changed)")
            if out.exists() and not overwrite:
                raise VolumeError(out, "output exists and holds a conversion of another source file or with other "
                                       "settings; pass overwrite (--overwrite) to replace it")
            attrs = {ATTR_KEY: dict(record, complete=False)}
            writer = OmeZarrWriter(out, vol.shape, vol.dtype, voxel, chunk, levels, name or src.name, True, attrs)
            done = set()
            _write_done(out, done)
        slabs = writer.slabs()
        bar = _progress(len(slabs), f"{src.name} -> {out.name}", progress)
        bar.update(sum(1 for z0, _ in slabs if z0 in done))
        try:
            for z0, z1 in slabs:
                if z0 in done:
                    continue
                writer.write_slab(z0, vol[z0:z1])
                done.add(z0)
                _write_done(out, done)
                bar.update(1)
                if _AFTER_SLAB_HOOK is not None:
                    _AFTER_SLAB_HOOK(z0, z1)
        finally:
            bar.close()
        writer.group.attrs.update({ATTR_KEY: dict(record, complete=True)})
        (out / PROGRESS_FILE).unlink(missing_ok=True)
        return out
    finally:
        vol.close()


def convert_tiff_to_omezarr(
    tiff_path: str | os.PathLike,
    out_path: str | os.PathLike,
    voxel_size_um: Any,
    chunk: Sequence[int] = (64, 64, 64),
    levels: int = 3,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a multi-page TIFF / BigTIFF z stack to an OME-Zarr 0.5 pyramid.

    ``voxel_size_um``: ``[z, y, x]`` of the stack in um (a scalar means isotropic).
    ``chunk``: zarr chunk shape in voxels; ``levels``: pyramid levels (2x mean each).
    Streamed one slab of ``chunk[0]`` slices at a time, with a progress bar (ETA) when
    ``progress``. If ``out_path`` holds an unfinished conversion of the same file with the same
    settings, the finished slabs are kept and the rest written; if it holds the finished
    result, nothing is done. Any other existing output raises :class:`VolumeError` unless
    ``overwrite=True``. Returns the output path.
    """
    return convert_to_omezarr(tiff_path, out_path, voxel_size_um, chunk, levels, overwrite, progress)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m xpression.data.convert",
                                description="Convert a TIFF/BigTIFF z stack to OME-Zarr 0.5 (resumable).")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--voxel-size-um", type=float, nargs="+", default=None,
                   help="z y x in um, or one value (default: what an OME-TIFF or a calibrated ImageJ stack records)")
    p.add_argument("--chunk", type=int, nargs=3, default=(64, 64, 64), help="zarr chunk, z y x voxels")
    p.add_argument("--levels", type=int, default=3, help="pyramid levels (each a 2x mean of the one before)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if a.voxel_size_um is not None and (len(a.voxel_size_um) not in (1, 3) or not all(v > 0 for v in a.voxel_size_um)):
        p.error(f"--voxel-size-um: give one or three positive numbers (z y x, um), got {a.voxel_size_um}")
    if not all(c > 0 for c in a.chunk):
        p.error(f"--chunk: give three positive voxel counts (z y x), got {a.chunk}")
    if a.levels < 1:
        p.error(f"--levels: must be at least 1, got {a.levels}")
    voxel = None if a.voxel_size_um is None else a.voxel_size_um[0] if len(a.voxel_size_um) == 1 else a.voxel_size_um
    try:
        print(convert_to_omezarr(a.src, a.out, voxel, a.chunk, a.levels, a.overwrite, progress=True))
    except VolumeError as err:
        p.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:
        p.exit(130, "\ninterrupted: the same command continues the conversion (the slabs written are kept)\n")


if __name__ == "__main__":
    main()

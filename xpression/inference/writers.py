"""Expression maps on disk: OME-Zarr 0.5 (zarr v3), one channel per target, plus exports.

``maps.ome.zarr`` is a group with axes ``c, z, y, x`` (channel; space in micrometer) and arrays
``"0", "1", ...``: level 0 is the sweep's output grid (scale = grid spacing in um, translation =
the physical position of grid point 0), each further level a 2x NaN-aware mean in z, y and x.
Values are float16 (about 3 significant digits, at most 65504 in magnitude), NaN outside the
tissue mask; a store with an unbounded channel (:data:`WIDE_CHANNELS`: the trust maps' ``ood``
distance, in training spreads, which can exceed 65504) is float32 throughout instead, and records
its ``dtype`` in the metadata. A value the store's dtype cannot hold is stored as +-inf with a
logged warning naming the channel and the count, never silently. Level-0 chunks are the sweep's tiles
(``(T, *tile_shape)``), so processes that own different tiles never write the same chunk.
The group's ``xpression`` attribute records the run identity (checkpoint hash, config), the
sweep settings, the grid, the target names and ``complete``; the ``omero`` block names the
channels so viewers (napari) label them. The resumption logs live in ``<store>/.xpression``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xpression.data.omezarr import remove_path, write_omezarr
from xpression.inference.grid import OutputGrid, Tile, Tiling
from xpression.inference.predictor import InferenceError
from xpression.inference.shards import DoneLog, wait_for

__all__ = ["MapStore", "WIDE_CHANNELS", "store_dtype", "cast_for_store", "downsample2_nanmean", "write_ct_preview",
           "export_bigtiff", "read_maps"]

log = logging.getLogger(__name__)

# Channels whose values are not bounded to float16's range (+-65504): a store holding one is float32.
WIDE_CHANNELS = ("ood",)
STORE_DTYPES = ("float16", "float32")

_COLORS = ["FF0000", "00FF00", "0000FF", "FFFF00", "FF00FF", "00FFFF", "FF8000", "8000FF", "FFFFFF"]


def downsample2_nanmean(block: np.ndarray) -> np.ndarray:
    """2x mean over the last three axes ignoring NaN (all-NaN cells stay NaN); odd edges
    average the cells that exist. Returns float32."""
    b = np.asarray(block, dtype=np.float32)
    lead = b.shape[:-3]
    pads = [(0, 0)] * len(lead) + [(0, s % 2) for s in b.shape[-3:]]
    b = np.pad(b, pads, constant_values=np.nan)
    nz, ny, nx = (s // 2 for s in b.shape[-3:])
    b = b.reshape(lead + (nz, 2, ny, 2, nx, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(b, axis=(-5, -3, -1))


def store_dtype(channels: Sequence[str]) -> str:
    """The dtype of a store of ``channels``: float32 when one is in :data:`WIDE_CHANNELS`
    (unbounded, e.g. ``ood``), else float16 (half the disk for bounded maps)."""
    return "float32" if any(c in WIDE_CHANNELS for c in channels) else "float16"


def cast_for_store(values: np.ndarray, dtype: Any, channels: Sequence[str], where: str = "") -> np.ndarray:
    """``(C, ...)`` ``values`` as ``dtype``, with a logged warning per channel holding infinite
    values after the cast (beyond the dtype's range, e.g. float16's 65504, or infinite already);
    ``where`` names the store in the warning."""
    with np.errstate(over="ignore"):  # numpy's unnamed overflow warning: said per channel below instead
        out = np.asarray(values).astype(dtype)
    infinite = np.isinf(out).reshape(len(out), -1).sum(axis=1)  # one pass over the tile
    for c in np.flatnonzero(infinite):
        name = channels[c] if c < len(channels) else f"channel {c}"
        log.warning("%s: %d value(s) of channel %r are infinite as %s (beyond +-%g, or infinite already)",
                    where or "maps store", int(infinite[c]), name, np.dtype(dtype).name, float(np.finfo(dtype).max))
    return out


def _ome_attrs(grid: OutputGrid, levels: int, targets: Sequence[str], name: str) -> dict:
    datasets = []
    for k in range(levels):
        f = 2.0**k
        scale = [1.0] + [float(s * f) for s in grid.spacing_um]
        shift = [0.0] + [float(o + s * (f - 1) / 2) for o, s in zip(grid.origin_um, grid.spacing_um)]
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": shift}]})
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    channels = [{"label": t, "color": _COLORS[i % len(_COLORS)], "active": i == 0,
                 "window": {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}} for i, t in enumerate(targets)]
    return {"ome": {"version": "0.5",
                    "multiscales": [{"name": name, "axes": axes, "datasets": datasets, "type": "nanmean"}],
                    "omero": {"name": name, "channels": channels, "rdefs": {"model": "color"}}}}


class MapStore:
    """A (possibly partly written) map store; use :meth:`open`."""

    def __init__(self, path: Path, group: Any, rank: int):
        self.path = path
        self.group = group
        self.meta: dict = dict(group.attrs["xpression"])
        self.grid = OutputGrid.from_dict(self.meta["grid"])
        self.tiling = Tiling(self.grid.shape, tuple(self.meta["tile_shape"]))  # type: ignore[arg-type]
        self.targets: list[str] = list(self.meta["targets"])
        self.levels = int(self.meta["levels"])
        self.log = DoneLog(path / ".xpression", rank)
        self.rank = rank

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        grid: OutputGrid,
        tile_shape: Sequence[int],
        targets: Sequence[str],
        identity: dict,
        settings: dict,
        metadata: dict | None = None,
        levels: int = 3,
        overwrite: bool = False,
        rank: int = 0,
        wait_s: float = 600.0,
        dtype: str | None = None,
    ) -> "MapStore":
        """Create the store, or reopen it to resume.

        ``identity``: what makes these maps a given run's (checkpoint hash, targets); a store
        holding another identity is an error unless ``overwrite``. ``settings``: how they were
        computed (grid, tiles, mode); a mismatch is an error too, as resuming would mix them.
        Process ``rank > 0`` never creates or deletes: it waits (``wait_s``) for rank 0's store.
        ``dtype``: ``float16`` or ``float32`` (default :func:`store_dtype` of ``targets``); a
        reopened store keeps the dtype it was created with.
        """
        import zarr

        dtype = dtype or store_dtype(targets)
        if dtype not in STORE_DTYPES:
            raise InferenceError(f"map store dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
        path = Path(path)
        levels = max(1, min(int(levels), 1 + int(math.log2(max(grid.shape))) if max(grid.shape) > 1 else 1))
        meta = {"identity": _plain(identity), "settings": _plain(settings), "grid": grid.to_dict(),
                "tile_shape": [int(t) for t in tile_shape], "targets": list(targets), "levels": levels,
                "dtype": dtype, "complete": False, "created": time.time(), **_plain(metadata or {})}
        if rank > 0:
            t_start = time.time() - 5.0

            def ready() -> bool:
                m = _read_meta(path)
                return m is not None and m.get("identity") == meta["identity"] and (
                    not overwrite or m.get("created", 0) >= t_start)

            wait_for(ready, wait_s, f"rank 0 to create {path}")
            store = cls(path, zarr.open_group(str(path), mode="r+"), rank)
            store._check(meta)
            return store
        if path.exists() and overwrite:
            remove_path(path)
        if path.exists():
            if _read_meta(path) is None:
                raise InferenceError(f"{path} exists and is not an X-Pression map store; choose another "
                                     "output or pass overwrite=true to replace it")
            store = cls(path, zarr.open_group(str(path), mode="r+"), rank)
            store._check(meta)
            return store
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        chunks = (len(targets),) + tuple(int(t) for t in tile_shape)
        shape = (len(targets),) + tuple(grid.shape)
        for k in range(levels):
            s = (shape[0],) + tuple(int(math.ceil(n / 2**k)) for n in shape[1:])
            group.create_array(str(k), shape=s, dtype=dtype, chunks=tuple(min(c, n) for c, n in zip(chunks, s)),
                               fill_value=np.nan, dimension_names=["c", "z", "y", "x"])
        attrs = _ome_attrs(grid, levels, targets, path.name)
        attrs["xpression"] = meta
        group.attrs.update(attrs)  # last: a store without these attributes is not finished being created
        return cls(path, group, rank)

    def _check(self, want: dict) -> None:
        have = self.meta
        if have.get("identity") != want["identity"]:
            diff = _diff(have.get("identity", {}), want["identity"])
            raise InferenceError(
                f"{self.path} holds maps of a different run ({diff}); choose another output folder or pass "
                "overwrite=true to replace them")
        for key in ("settings", "grid", "tile_shape", "targets"):
            if have.get(key) != want[key]:
                raise InferenceError(
                    f"{self.path} holds maps of this run computed with different {key} "
                    f"({_diff(have.get(key), want[key])}); pass overwrite=true to recompute them")

    # -- writing -------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def done(self) -> set[int]:
        return self.log.done()

    def write_tile(self, tile: Tile, values: np.ndarray) -> None:
        """Write one tile's ``(T, *tile.shape)`` values to level 0 (in the store's dtype, values
        beyond its range warned about: :func:`cast_for_store`), then record it as done."""
        level0 = self.group["0"]
        level0[(slice(None),) + tile.slices] = cast_for_store(values, level0.dtype, self.targets, f"{self.path} tile {tile.index}")
        self.log.mark(tile.index)

    def finalize(self, expected: Sequence[int], wait_s: float = 86400.0, extra: dict | None = None) -> None:
        """Rank 0: wait until every ``expected`` tile is done (by any process), build the
        pyramid and mark the store complete."""
        exp = set(int(i) for i in expected)
        wait_for(lambda: exp <= self.done(), wait_s, f"all {len(exp)} tiles of {self.path}")
        for k in range(1, self.levels):
            self._build_level(k)
        meta = dict(self.meta, complete=True, finished=time.time(), **_plain(extra or {}))
        self.group.attrs["xpression"] = meta
        self.meta = meta
        self.log.close()

    def _build_level(self, k: int) -> None:
        src, dst = self.group[str(k - 1)], self.group[str(k)]
        cz, cy, cx = dst.chunks[1:]
        for z0 in range(0, dst.shape[1], cz):
            for y0 in range(0, dst.shape[2], cy):
                for x0 in range(0, dst.shape[3], cx):
                    block = src[:, 2 * z0 : 2 * (z0 + cz), 2 * y0 : 2 * (y0 + cy), 2 * x0 : 2 * (x0 + cx)]
                    if np.isnan(block).all():
                        continue
                    dst[:, z0 : z0 + cz, y0 : y0 + cy, x0 : x0 + cx] = downsample2_nanmean(block).astype(dst.dtype)

    def read(self, level: int = 0) -> Any:
        """The zarr array of ``level`` (``(T, nz, ny, nx)``; slice it to read)."""
        return self.group[str(level)]


def read_maps(path: str | os.PathLike) -> tuple[Any, dict]:
    """``(level-0 zarr array (T, nz, ny, nx), xpression metadata)`` of a finished store."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return group["0"], dict(group.attrs["xpression"])


def _read_meta(path: Path) -> dict | None:
    meta = path / "zarr.json"
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get("xpression")
    except (OSError, ValueError):
        return None


def _plain(x: Any) -> Any:
    """JSON-able copy (tuples -> lists, numpy scalars -> python)."""
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return "; ".join(f"{k}: stored {a.get(k)!r} vs now {b.get(k)!r}" for k in keys[:4])
    return f"stored {a!r} vs now {b!r}"


def write_ct_preview(volume: Any, grid: OutputGrid, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """The CT sampled on the output grid (uint8, the volume's own values at the grid points)
    as a one-level OME-Zarr in the same physical frame as the maps, read plane by plane."""
    zs = grid.centres_vox(0)
    ys = grid.centres_vox(1)
    xs = grid.centres_vox(2)
    ysl = slice(int(ys[0]), int(ys[-1]) + 1, int(grid.step_vox[1]))
    xsl = slice(int(xs[0]), int(xs[-1]) + 1, int(grid.step_vox[2]))

    def planes():
        for z in zs:
            yield np.asarray(volume[int(z), ysl, xsl])

    out = Path(out)
    write_omezarr(planes(), out, grid.spacing_um, levels=1, overwrite=overwrite, name="ct_preview",
                  shape=grid.shape, dtype=volume.dtype, chunk=(16, 128, 128))
    import zarr

    g = zarr.open_group(str(out), mode="r+")
    attrs = dict(g.attrs)
    ds = attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    ds[1] = {"type": "translation", "translation": list(grid.origin_um)}
    g.attrs["ome"] = attrs["ome"]
    return out


def export_bigtiff(store_path: str | os.PathLike, out: str | os.PathLike, ct_preview: str | os.PathLike | None = None) -> Path:
    """Level 0 as an ImageJ-style BigTIFF (float32, ``ZCYX``; CT preview first when given),
    written one z plane at a time."""
    import tifffile
    import zarr

    arr, meta = read_maps(store_path)
    ct = zarr.open_group(str(ct_preview), mode="r")["0"] if ct_preview else None
    grid = OutputGrid.from_dict(meta["grid"])
    names = (["CT"] if ct is not None else []) + list(meta["targets"])
    nc = len(names)

    def pages():
        for z in range(arr.shape[1]):
            if ct is not None:
                yield np.asarray(ct[z], dtype=np.float32)
            for c in range(arr.shape[0]):
                yield np.asarray(arr[c, z], dtype=np.float32)

    out = Path(out)
    tifffile.imwrite(
        out, pages(), shape=(arr.shape[1], nc) + tuple(arr.shape[2:]), dtype=np.float32, bigtiff=True,
        imagej=False, metadata={"axes": "ZCYX", "Channel": {"Name": names},
                                "spacing_um": list(grid.spacing_um), "origin_um": list(grid.origin_um)})
    return out

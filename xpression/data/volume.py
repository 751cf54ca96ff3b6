"""Lazy access to micro-CT volumes: OME-Zarr / zarr v3 (and v2, bioformats2raw layout),
(Big)TIFF stacks (OME-TIFF, ImageJ, SubIFD pyramids) and ``.npy``.

Arrays are indexed ``(z, y, x)``; voxel sizes are in micrometres (um), ``[z, y, x]``. The
physical position of voxel index ``i`` is ``origin_um + i * voxel_size_um`` (voxel centres).
``origin_um`` is zero for level 0; coarser pyramid levels carry the OME translation that keeps
their voxel centres on the same physical frame.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xpression.data.zarr_chunks import ChunkReader, read_threads

__all__ = ["Volume", "VolumeError", "open_volume", "volume_kind", "TIFF_SUFFIXES", "ZARR_SUFFIXES"]

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
ZARR_SUFFIXES = (".zarr",)
_ATOL = 1e-6


class VolumeError(ValueError):
    """A volume file cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if path is not None else problem)


def _as_voxel_size(value: Any, path: Any) -> tuple[float, float, float]:
    try:
        arr = np.asarray(value, dtype=float).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise VolumeError(path, f"voxel_size_um {value!r} is not numeric") from exc
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise VolumeError(path, f"voxel_size_um must be 3 positive numbers (z, y, x) in um, got {value!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


# ---------------------------------------------------------------------------------------------
# Backends: each returns (array-like with shape/dtype/__getitem__, chunks, metadata dict).
# Metadata keys: "voxel_size_um" (level-0 voxel, or None), "levels" (list of
# (path, scale, translation)), "level_index".


def _squeeze_to_3d(shape: Sequence[int], path: Any) -> tuple[int, ...]:
    """Axes of size 1 to drop so the array is 3D (t, c or page-sample axes), leading first;
    the last two (y, x) axes are never dropped."""
    shape = tuple(int(s) for s in shape)
    drop: list[int] = []
    for ax in range(max(len(shape) - 2, 0)):
        if len(shape) - len(drop) <= 3:
            break
        if shape[ax] == 1:
            drop.append(ax)
    if len(shape) - len(drop) != 3:
        raise VolumeError(path, f"expected a 3D (z, y, x) array, got shape {shape}")
    return tuple(drop)


def _ome_multiscale(attrs: dict) -> dict | None:
    ome = attrs.get("ome")
    if isinstance(ome, dict) and ome.get("multiscales"):
        return ome["multiscales"][0]
    if attrs.get("multiscales"):  # OME-NGFF 0.4 layout, accepted for reading
        return attrs["multiscales"][0]
    return None


def _transform(transforms: list, kind: str, ndim: int) -> np.ndarray | None:
    for t in transforms or []:
        if t.get("type") == kind and kind in t:
            return np.asarray(t[kind], dtype=float)[-ndim:] if ndim else np.asarray(t[kind], float)
    return None


# Length units in um, case-sensitive ("Mm" is a megametre, "mm" a millimetre): the symbols of
# OME-XML's UnitsLength (OME-TIFF PhysicalSize*Unit), the UDUNITS-2 names NGFF 0.4 lists for
# "space" axes (OME-Zarr), and what ImageJ writes as `unit=` (it escapes the micro sign as
# "\u00B5m" and writes "micron" or "um" for micrometres).
_SI_PREFIX = {"yocto": ("y", -24), "zepto": ("z", -21), "atto": ("a", -18), "femto": ("f", -15), "pico": ("p", -12),
              "nano": ("n", -9), "micro": ("\u00b5", -6), "milli": ("m", -3), "centi": ("c", -2), "deci": ("d", -1),
              "": ("", 0), "deca": ("da", 1), "hecto": ("h", 2), "kilo": ("k", 3), "mega": ("M", 6), "giga": ("G", 9),
              "tera": ("T", 12), "peta": ("P", 15), "exa": ("E", 18), "zetta": ("Z", 21), "yotta": ("Y", 24)}
_UM_PER_UNIT: dict[str, float] = {}
for _name, (_sym, _exp) in _SI_PREFIX.items():  # 10 ** (exp + 6) um per unit, exact for the usual ones
    _UM_PER_UNIT[f"{_sym}m"] = _UM_PER_UNIT[f"{_name}meter"] = _UM_PER_UNIT[f"{_name}metre"] = 10.0 ** (_exp + 6)
_UM_PER_UNIT.update({
    "\u03bcm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "\\u00B5m": 1.0, "\\u03BCm": 1.0,
    "\u00c5": 1e-4, "\u212b": 1e-4, "angstrom": 1e-4, "in": 25400.0, "inch": 25400.0, "inches": 25400.0, "ft": 304800.0,
    "foot": 304800.0, "yd": 914400.0, "yard": 914400.0, "mi": 1609344000.0, "mile": 1609344000.0,
    "thou": 25.4, "li": 25400.0 / 12, "pt": 25400.0 / 72, "pc": 3.0856775814913673e22, "parsec": 3.0856775814913673e22,
})
# Spelled-out names are matched in any case ("Micrometer"); symbols only exactly ("mm" vs "Mm").
_UM_PER_UNIT_NAME = {k.lower(): v for k, v in _UM_PER_UNIT.items() if len(k) > 4 and k.isascii() and k.isalpha()}


def _um_per_unit(unit: Any) -> float | None:
    """um per ``unit`` (an OME-XML symbol, UDUNITS-2 name or ImageJ unit), None if not a known length."""
    text = str(unit).strip()
    return _UM_PER_UNIT.get(text, _UM_PER_UNIT_NAME.get(text.lower()))


def _axis_um_per_unit(ms: dict, path: Any) -> np.ndarray:
    """um per unit of the last three (z, y, x) axes of OME-Zarr ``multiscales`` ``axes``.

    Units are UDUNITS-2 names (NGFF 0.4 "axes": angstrom ... micrometer ... zettameter, foot,
    inch, yard, mile, parsec); an axis without ``unit`` is taken as micrometre. A spatial axis
    (``type`` "space", or named z/y/x) whose unit is not a known length is refused."""
    axes = [a if isinstance(a, dict) else {"name": a} for a in (ms.get("axes") or [])]  # NGFF 0.3: names only
    factors = []
    for a in axes:
        unit = a.get("unit")
        spatial = a.get("type") == "space" or (a.get("type") is None and a.get("name") in ("z", "y", "x"))
        if not spatial or unit is None:
            factors.append(1.0)
            continue
        factor = _um_per_unit(unit)
        if factor is None:
            raise VolumeError(path, f"spatial axis {a.get('name')!r} has unit {unit!r}, not a known length unit "
                                    "(expected a UDUNITS-2 length such as 'micrometer', 'millimeter' or 'nanometer')")
        factors.append(factor)
    out = np.ones(3)
    tail = factors[-3:]
    out[3 - len(tail):] = tail
    return out


def _ome_levels(ms: dict, path: Any) -> list[tuple[str, np.ndarray | None, np.ndarray]]:
    """(array path, voxel size um or None, origin um) of each level of an OME ``multiscales``."""
    um_per_unit = _axis_um_per_unit(ms, path)
    global_scale = _transform(ms.get("coordinateTransformations"), "scale", 3)
    global_shift = _transform(ms.get("coordinateTransformations"), "translation", 3)
    levels = []
    for ds in ms.get("datasets", []):
        scale = _transform(ds.get("coordinateTransformations"), "scale", 3)
        shift = _transform(ds.get("coordinateTransformations"), "translation", 3)
        shift = np.zeros(3) if shift is None else shift
        if scale is not None and global_scale is not None:
            scale = scale * global_scale
            shift = shift * global_scale
        if global_shift is not None:
            shift = shift + global_shift
        levels.append((str(ds["path"]), None if scale is None else scale * um_per_unit, shift * um_per_unit))
    if not levels:
        raise VolumeError(path, "OME-Zarr multiscales lists no datasets")
    return levels


def _ome_attr(attrs: dict, key: str) -> Any:
    """``key`` of OME-Zarr group attributes: under ``"ome"`` (NGFF 0.5, zarr v3) or top level (0.4)."""
    ome = attrs.get("ome")
    if isinstance(ome, dict) and key in ome:
        return ome[key]
    return attrs.get(key)


def _bf2raw_image(root: Any, path: Path) -> Any:
    """The image group of a bioformats2raw collection (NGFF 0.4 "bioformats2raw.layout" 3) when
    it holds exactly one image.

    The images are the paths listed in the ``OME`` group's ``series`` attribute or, without it,
    the groups ``0/``, ``1/``, ... numbered consecutively from 0 (the spec's lookup). Several
    images are refused with their list: the reader would otherwise pick one silently.
    """
    import zarr

    layout = _ome_attr(dict(root.attrs), "bioformats2raw.layout")
    if layout != 3:
        raise VolumeError(path, f"bioformats2raw.layout {layout!r} is not supported (only layout 3)")
    if _ome_attr(dict(root.attrs), "plate") is not None:
        raise VolumeError(path, "an HCS plate (bioformats2raw layout with plate metadata), not one volume; "
                                "point at one field's image group")

    def child(name: str) -> Any:
        try:
            return root[name]
        except (KeyError, FileNotFoundError, ValueError):
            return None

    ome = child("OME")
    series = _ome_attr(dict(ome.attrs), "series") if isinstance(ome, zarr.Group) else None
    if series is not None:
        if not isinstance(series, list) or not all(isinstance(p, str) for p in series):
            raise VolumeError(path, f"bioformats2raw OME/series must be a list of group paths, got {series!r}")
    else:
        series = []
        while isinstance(child(str(len(series))), zarr.Group):
            series.append(str(len(series)))
    if not series:
        raise VolumeError(path, "bioformats2raw layout holds no image group ('0/' missing and no OME/series list)")
    if len(series) > 1:
        shown = ", ".join(series[:10]) + (f", ... ({len(series)} in all)" if len(series) > 10 else "")
        raise VolumeError(path, f"bioformats2raw collection holds {len(series)} images ({shown}); "
                                f"open one of them as {path}/<name>, e.g. {path}/{series[0]}")
    image = child(series[0])
    if not isinstance(image, zarr.Group):
        raise VolumeError(path, f"bioformats2raw image group {series[0]!r} is missing")
    return image


def _open_zarr(path: Path, level: int) -> tuple[Any, dict]:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for unreadable stores
        raise VolumeError(path, f"cannot open as zarr: {exc}") from exc
    meta: dict = {"voxel_size_um": None, "origin_um": (0.0, 0.0, 0.0), "levels": ["0"]}
    if isinstance(node, zarr.Array):
        if level != 0:
            raise VolumeError(path, f"level {level} requested but the zarr array has a single level")
        return node, meta
    ms = _ome_multiscale(dict(node.attrs))
    if ms is None and _ome_attr(dict(node.attrs), "bioformats2raw.layout") is not None:
        node = _bf2raw_image(node, path)
        ms = _ome_multiscale(dict(node.attrs))
        if ms is None:
            raise VolumeError(path, f"bioformats2raw image group {node.path!r} has no OME multiscales metadata")
    if ms is not None:
        levels = _ome_levels(ms, path)
    else:
        names = sorted((k for k, _ in node.arrays() if k.isdigit()), key=int)
        if not names:
            raise VolumeError(path, "zarr group has no OME multiscales metadata and no array '0'")
        levels = [(n, None, np.zeros(3)) for n in names]
    if not 0 <= level < len(levels):
        raise VolumeError(path, f"level {level} out of range; the volume has {len(levels)} level(s)")
    name, scale, shift = levels[level]
    try:
        arr = node[name]
    except KeyError as exc:
        raise VolumeError(path, f"level array {name!r} listed in metadata is missing") from exc
    meta["levels"] = [lv[0] for lv in levels]
    if scale is not None:
        meta["voxel_size_um"] = tuple(float(s) for s in scale)
        meta["level0_voxel_size_um"] = (
            tuple(float(s) for s in levels[0][1]) if levels[0][1] is not None else None
        )
    else:
        meta["level_factor"] = 2.0**level
    meta["origin_um"] = tuple(float(s) for s in shift)
    return arr, meta


class _LogErrors:
    """Collect tifffile's logged errors (it logs, rather than raises, on bad page offsets)."""

    def __enter__(self) -> list[str]:
        import logging

        self.messages: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda rec: self.messages.append(rec.getMessage())  # type: ignore[method-assign]
        logging.getLogger("tifffile").addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc: Any) -> None:
        import logging

        logging.getLogger("tifffile").removeHandler(self.handler)


def _check_tiff(tif: Any, series: Any, path: Path) -> None:
    """Reject truncated files: all pages of the stack present, their data inside the file."""
    size = tif.filehandle.size
    if series.dataoffset is not None and series.dataoffset + series.nbytes > size:
        raise VolumeError(path, "corrupt or truncated TIFF: image data ends past end of file")
    n_pages = int(np.prod(series.shape[: -3 if series.pages and series.pages[0].samplesperpixel > 1 else -2]))
    if len(series.pages) != n_pages:
        raise VolumeError(path, f"corrupt or truncated TIFF: {len(series.pages)} of {n_pages} pages readable")
    for i, page in enumerate(series.pages):
        if page is None:
            raise VolumeError(path, f"corrupt or truncated TIFF: page {i} missing")
        for off, cnt in zip(page.dataoffsets or (), page.databytecounts or ()):
            if off + cnt > size:
                raise VolumeError(path, f"corrupt or truncated TIFF: page {i} data ends past end of file")


def _open_tiff(path: Path, level: int = 0) -> tuple[Any, Any, dict]:
    """The TIFF stack's pyramid level ``level`` as a zarr array, the open TiffFile, and metadata.

    A pyramidal (OME-)TIFF as bfconvert, QuPath or ``tifffile.TiffWriter.write(..., subifds=n)``
    write it keeps level 0 in the main IFDs and the reduced levels in SubIFDs; tifffile lists them
    as ``series.levels``, and level ``i`` is read as ``imread(path, level=i)`` reads it. A reduced
    level covers the same box as level 0: its voxel is level 0's times ``shape0 / shape_i`` per
    axis, and its voxel 0 is centred on the middle of the level-0 voxels it spans.
    """
    import tifffile
    import zarr

    tif = None
    try:
        with _LogErrors() as errors:
            tif = tifffile.TiffFile(str(path))
            if len(tif.pages) > 1 and tif.series and tif.series[0].ndim == 2:
                # Pages written one by one form separate "shaped" series; read them as one stack.
                tif.close()
                tif = tifffile.TiffFile(str(path), is_shaped=False, is_imagej=False)
            series = tif.series[0]
            n_levels = len(series.levels)
            if not 0 <= level < n_levels:
                raise VolumeError(path, f"level {level} out of range; the TIFF has {n_levels} level(s)")
            _check_tiff(tif, series.levels[level], path)
        if errors:
            raise VolumeError(path, f"corrupt or truncated TIFF: {errors[0]}")
        tif.filehandle.set_lock(True)
        arr = zarr.open(series.aszarr(level=level), mode="r")  # an Array: one level, not the pyramid's Group
        if not isinstance(arr, zarr.Array):
            raise VolumeError(path, f"tifffile gave a {type(arr).__name__} for level {level}, not an array")
        if len(tif.series) > 1 and len(series.shape) == 2:
            raise VolumeError(path, "TIFF holds several series of different shapes, not one z stack")
        voxel0 = tiff_voxel_size(tif, path)
        meta: dict = {"voxel_size_um": voxel0, "origin_um": (0.0, 0.0, 0.0), "levels": [str(i) for i in range(n_levels)]}
        if level:
            shape0 = tuple(int(n) for n in series.levels[0].shape)
            if len(arr.shape) != len(shape0):
                raise VolumeError(path, f"level {level} has shape {tuple(arr.shape)}, level 0 {shape0}: not one pyramid")
            kept = [ax for ax in range(len(shape0)) if ax not in _squeeze_to_3d(shape0, path)]
            factor = tuple(shape0[ax] / int(arr.shape[ax]) for ax in kept)  # z, y, x: level-0 voxels per voxel
            meta["level_factor"] = factor
            meta["origin_level0_vox"] = tuple((f - 1) / 2 for f in factor)
            if voxel0 is not None:
                meta["level0_voxel_size_um"] = voxel0
                meta["voxel_size_um"] = tuple(v * f for v, f in zip(voxel0, factor))
    except Exception as exc:
        if tif is not None:
            tif.close()
        if isinstance(exc, VolumeError):
            raise
        raise VolumeError(path, f"corrupt or unreadable TIFF: {exc}") from exc
    return arr, tif, meta


def _in_um(value: Any, unit: Any, path: Path, key: str) -> float:
    factor = _um_per_unit(unit)
    if factor is None:
        raise VolumeError(path, f"TIFF metadata {key}: unknown length unit {unit!r}")
    return float(value) * factor


def tiff_voxel_size(tif: Any, path: Path) -> tuple[float, float, float] | None:
    """The voxel size [z, y, x] um an OME-TIFF (``Pixels`` ``PhysicalSize{Z,Y,X}`` and their
    units, um by default) or an ImageJ hyperstack (``spacing``, the X/YResolution tags and
    ``unit``) records, as tifffile reads them; None when the file records none (a plain TIFF, or
    ImageJ's uncalibrated ``pixel`` unit).

    ImageJ leaves ``spacing`` out when the z spacing is 1.0 unit: ij/io/FileSaver.java
    getDescriptionString() writes ``if (fi.pixelDepth!=0.0 && fi.pixelDepth!=1.0)
    sb.append("spacing="+fi.pixelDepth)``, and on reading FileOpener.setCalibration() sets
    ``cal.pixelDepth = fi.pixelDepth`` whenever a unit is given, with FileInfo's default
    ``pixelDepth = 1.0``. So a calibrated stack (a ``unit`` other than ``pixel``) without
    ``spacing`` has a z spacing of 1.0 unit. ``yunit`` / ``zunit`` (written by newer ImageJ when
    they differ from ``unit``) give the y and z units.
    """
    import tifffile

    if tif.is_ome:
        image = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", {})
        pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})
        if all(f"PhysicalSize{a}" in pixels for a in "ZYX"):
            return tuple(_in_um(pixels[f"PhysicalSize{a}"], pixels.get(f"PhysicalSize{a}Unit", "µm"), path,
                                f"PhysicalSize{a}") for a in "ZYX")  # type: ignore[return-value]
        return None
    meta = tif.imagej_metadata if tif.is_imagej else None
    unit = str((meta or {}).get("unit", "")).strip()
    if unit in ("", "pixel", "pixels"):
        return None
    tags = tif.pages.first.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    y_unit, z_unit = (str(meta.get(k, unit)).strip() for k in ("yunit", "zunit"))  # type: ignore[union-attr]
    per_px = [tags[k].value for k in ("YResolution", "XResolution")]  # (numerator, denominator): pixels per unit
    y, x = (_in_um(den / num, u, path, name)
            for (num, den), u, name in zip(per_px, (y_unit, unit), ("YResolution", "XResolution")))
    spacing = meta.get("spacing", 1.0)  # type: ignore[union-attr]  # absent: ImageJ's default pixelDepth
    return (_in_um(spacing, z_unit, path, "spacing"), y, x)


def _open_npy(path: Path) -> tuple[Any, dict]:
    try:
        arr = np.load(str(path), mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise VolumeError(path, f"corrupt or unreadable .npy: {exc}") from exc
    return arr, {"voxel_size_um": None, "origin_um": (0.0, 0.0, 0.0), "levels": ["0"]}


_ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray")  # zarr v3; zarr v2 group / array


def volume_kind(path: str | os.PathLike) -> str | None:
    """``"npy"``, ``"tiff"`` or ``"zarr"``: how :func:`open_volume` would read ``path``; None for
    a path it does not read."""
    try:
        return _kind_of(Path(path))
    except VolumeError:
        return None


def _kind_of(path: Path) -> str:
    """"npy", "tiff" or "zarr": by suffix, or a directory holding zarr v3/v2 metadata (e.g. the
    series group ``<root>/0`` of a bioformats2raw layout)."""
    name = path.name.lower()
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(ZARR_SUFFIXES) or (path.is_dir() and any((path / m).exists() for m in _ZARR_METADATA)):
        return "zarr"
    raise VolumeError(
        path,
        "unsupported volume format; expected an OME-Zarr/zarr directory (.zarr), "
        f"a TIFF stack ({', '.join(TIFF_SUFFIXES)}) or a .npy file",
    )


def _refuse_non_finite(block: np.ndarray, path: Path) -> None:
    """Raise :class:`VolumeError` if a block read from a float volume holds NaN or inf.

    NaN has no agreed meaning in a CT (outside the reconstructed field, masked by another tool,
    a failed slice), and any fill value would shift the intensity normalisation and the tissue
    mask's threshold, so the volume is refused rather than guessed at.
    """
    finite = np.isfinite(block)
    if finite.all():
        return
    n_nan = int(np.isnan(block).sum())
    n_inf = int(block.size - finite.sum()) - n_nan
    found = " and ".join(f"{n:,} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "infinite")) if n)
    raise VolumeError(
        path,
        f"{found} voxel(s) among the {block.size:,} read (block {' x '.join(map(str, block.shape))}); "
        "the CT must hold finite intensities: replace them (e.g. with the background value) and save the volume again",
    )


# ---------------------------------------------------------------------------------------------


class Volume:
    """A lazily read 3D volume. Slicing reads only the requested voxels.

    Attributes: ``shape`` (z, y, x voxels), ``dtype``, ``voxel_size_um`` (z, y, x), ``origin_um``
    (physical position of voxel 0's centre), ``extent_um`` (physical box size,
    ``shape * voxel_size_um``), ``path``, ``chunks`` (storage chunk shape in voxels), ``levels``
    (names of the pyramid levels; one for non-pyramidal files), ``level_index``.
    """

    def __init__(self, path: str | os.PathLike, voxel_size_um: Any = None, level: int = 0):
        self.path = Path(path)
        self._requested_voxel = voxel_size_um
        self.level_index = int(level)
        self._open()

    # -- opening -------------------------------------------------------------------------------
    def _open(self) -> None:
        path = self.path
        if not path.exists():
            raise VolumeError(path, "file not found")
        kind = _kind_of(path)
        if path.is_file() and not os.access(path, os.R_OK):
            raise VolumeError(path, "file is not readable (permission denied)")
        self._tif = None
        if kind == "zarr":
            arr, meta = _open_zarr(path, self.level_index)
        elif kind == "tiff":
            arr, self._tif, meta = _open_tiff(path, self.level_index)
        else:
            if self.level_index != 0:
                raise VolumeError(path, f"level {self.level_index} requested but {kind} files have one level")
            arr, meta = _open_npy(path)
        self.kind = kind
        self._drop = _squeeze_to_3d(arr.shape, path)
        self._arr = arr
        self._chunk_reader = ChunkReader.for_array(arr) if kind == "zarr" else None
        if self._chunk_reader is not None:
            try:
                read_threads()  # a bad XPRESSION_READ_THREADS is an input error at open, not a traceback at the first read
            except ValueError as err:
                raise VolumeError(None, str(err)) from err
        self._pid = os.getpid()
        kept = [ax for ax in range(len(arr.shape)) if ax not in self._drop]
        self.shape: tuple[int, int, int] = tuple(int(arr.shape[ax]) for ax in kept)  # type: ignore[assignment]
        self.dtype = np.dtype(arr.dtype)
        self.levels: tuple[str, ...] = tuple(meta["levels"])
        self.voxel_size_um = self._resolve_voxel(meta)
        self.origin_um: tuple[float, float, float] = meta["origin_um"]
        if "origin_level0_vox" in meta:  # a TIFF pyramid level: the offset is known in level-0 voxels
            level0 = np.asarray(self.voxel_size_um) / np.asarray(meta["level_factor"])
            self.origin_um = tuple(float(o) for o in np.asarray(meta["origin_level0_vox"]) * level0)  # type: ignore[assignment]
        chunks = getattr(arr, "chunks", None)
        if kind == "npy" or chunks is None or len(chunks) != len(arr.shape):
            chunks = (1,) + self.shape[1:]  # whole planes: contiguous in C order
        else:
            chunks = tuple(chunks[ax] for ax in kept)
        self.chunks: tuple[int, int, int] = tuple(int(c) for c in chunks)  # type: ignore[assignment]

    def _resolve_voxel(self, meta: dict) -> tuple[float, float, float]:
        path = self.path
        given = None if self._requested_voxel is None else _as_voxel_size(self._requested_voxel, path)
        stored = meta.get("voxel_size_um")
        if stored is not None:
            stored = _as_voxel_size(stored, path)
            level0 = meta.get("level0_voxel_size_um") or stored
            if given is not None and not np.allclose(given, level0, rtol=1e-6, atol=_ATOL):
                raise VolumeError(
                    path,
                    f"voxel_size_um {list(given)} given but the file's metadata says {list(level0)} "
                    "(level 0); drop the argument or fix the metadata",
                )
            return stored
        if given is None:
            raise VolumeError(
                path,
                "missing voxel size: the file records neither OME metadata (OME-XML PhysicalSizeZ/Y/X, OME-Zarr "
                "scale) nor an ImageJ calibration (unit and X/YResolution); give voxel_size_um [z, y, x] in um "
                "(the manifest's voxel_size_um, or voxel_size_um= in Python)",
            )
        factor = np.broadcast_to(np.asarray(meta.get("level_factor", 1.0), dtype=float), (3,))
        return (given[0] * float(factor[0]), given[1] * float(factor[1]), given[2] * float(factor[2]))

    def _backend(self) -> Any:
        # A forked worker must not share the parent's TIFF file handle (shared file offset).
        if self._arr is None or (self._tif is not None and os.getpid() != self._pid):
            self._open()
        return self._arr

    def __getstate__(self) -> dict:
        return {"path": self.path, "voxel": self._requested_voxel, "level": self.level_index}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._requested_voxel = state["voxel"]
        self.level_index = state["level"]
        self._open()

    def close(self) -> None:
        """Release the TIFF file handle, if any; a later read reopens the file."""
        if self._tif is not None:
            self._tif.close()
            self._tif = None
            self._arr = None

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- geometry --------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return 3

    @property
    def extent_um(self) -> tuple[float, float, float]:
        """Physical size of the volume box in um, ``shape * voxel_size_um`` (z, y, x)."""
        return tuple(float(n * v) for n, v in zip(self.shape, self.voxel_size_um))  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def to_voxel(self, points_um: Any) -> np.ndarray:
        """Continuous voxel indices (N, 3) of physical points (N, 3) in um."""
        pts = np.asarray(points_um, dtype=float)
        return (pts - np.asarray(self.origin_um)) / np.asarray(self.voxel_size_um)

    def to_um(self, index_vox: Any) -> np.ndarray:
        """Physical positions in um of voxel indices (N, 3)."""
        idx = np.asarray(index_vox, dtype=float)
        return idx * np.asarray(self.voxel_size_um) + np.asarray(self.origin_um)

    def level(self, i: int) -> "Volume":
        """The pyramid level ``i`` of the same file as its own :class:`Volume`."""
        if i == self.level_index:
            return self
        return Volume(self.path, voxel_size_um=self._requested_voxel, level=i)

    # -- reading -------------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        for k in key:
            if not (isinstance(k, (slice, int, np.integer)) or k is Ellipsis):
                raise TypeError("Volume supports basic slicing only (ints, slices, Ellipsis)")
        if self._drop:
            if Ellipsis in key:
                i = key.index(Ellipsis)
                key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
            key = key + (slice(None),) * (3 - len(key))
            it = iter(key)
            key = tuple(0 if ax in self._drop else next(it) for ax in range(len(self._drop) + 3))
        block = np.asarray(self._backend()[key])
        if block.dtype.kind in "fc":
            _refuse_non_finite(block, self.path)
        return block

    def read_block(self, start_vox: Sequence[int], stop_vox: Sequence[int], fill: float = 0,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Read voxels ``[start, stop)`` per axis (z, y, x); parts outside the volume get ``fill``.

        The result always has shape ``stop - start`` and the volume's dtype. ``out``: an array of
        that shape and dtype to fill instead of a new one (e.g. pinned memory for a GPU copy).
        """
        start = np.asarray(start_vox, dtype=np.int64).reshape(3)
        stop = np.asarray(stop_vox, dtype=np.int64).reshape(3)
        if np.any(stop < start):
            raise ValueError(f"read_block: stop {stop.tolist()} is before start {start.tolist()}")
        shape = tuple(int(n) for n in stop - start)
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype:
            raise ValueError(f"read_block: out has shape {out.shape} and dtype {out.dtype}, expected {shape} {self.dtype}")
        if np.asarray(fill, dtype=self.dtype) != fill:
            raise ValueError(f"fill value {fill!r} is not representable in {self.dtype}")
        lo = np.maximum(start, 0)
        hi = np.minimum(stop, np.asarray(self.shape))
        inside = bool(np.all(hi > lo))
        if not inside or np.any(lo > start) or np.any(hi < stop):
            out[...] = fill  # only blocks reaching past the volume need the fill
        if inside:
            src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
            if self._chunk_reader is not None:  # chunks decoded on threads (zarr's own reads do not scale)
                self._read_chunks(lo, hi, out[dst])
            else:
                out[dst] = self[src]
        return out

    def _read_chunks(self, lo: np.ndarray, hi: np.ndarray, out: np.ndarray) -> None:
        """``[lo, hi)`` (inside the volume) into ``out`` through the chunk reader; singleton
        axes the volume drops (OME t, c) are read at index 0."""
        it = iter(zip(lo, hi))
        box = [(0, 1) if ax in self._drop else next(it) for ax in range(len(self._drop) + 3)]
        view = np.expand_dims(out, tuple(self._drop)) if self._drop else out
        self._chunk_reader.read_into([int(a) for a, _ in box], [int(b) for _, b in box], view)  # type: ignore[union-attr]
        if out.dtype.kind in "fc":
            _refuse_non_finite(out, self.path)

    def __repr__(self) -> str:
        return (
            f"Volume({str(self.path)!r}, kind={self.kind}, shape={self.shape}, dtype={self.dtype}, "
            f"voxel_size_um={self.voxel_size_um}, level={self.level_index}/{len(self.levels)})"
        )


def open_volume(path: str | os.PathLike, voxel_size_um: Any = None, level: int = 0) -> Volume:
    """Open a volume lazily (nothing but metadata is read).

    ``path``: an OME-Zarr / zarr v3 or v2 group or array (``level`` picks the pyramid level, "0"
    by default; a bioformats2raw collection opens its image when it holds one), a multi-page
    (Big)TIFF stack (a SubIFD pyramid's reduced levels are ``level`` 1, 2, ...), or a ``.npy``
    file (memory-mapped).
    ``voxel_size_um``: ``[z, y, x]`` in um (a scalar means isotropic). Required unless the file
    carries OME metadata or an ImageJ calibration; if both are present they must agree (for
    level 0), else :class:`VolumeError` is raised.
    """
    if isinstance(path, Volume):
        return path
    return Volume(path, voxel_size_um=voxel_size_um, level=level)

"""Maps of a mix of models: the weighted mean of several ``infer.py`` outputs, volume by volume.

``mix_maps([A, B], [0.5, 0.5], OUT)`` writes ``OUT/<volume_id>/maps.ome.zarr`` for every volume
that every source folder holds maps of. Each target channel is ``mu = sum_i w_i mu_i`` (weights
normalised to sum 1; NaN wherever a source is NaN, i.e. outside any source's tissue mask). Where
every source carries ``<target>_sd`` (an ensemble's or MC dropout's spread), the mixture's SD
``sqrt(sum_i w_i (sd_i^2 + mu_i^2) - mu^2)`` follows, in target units; otherwise there is no SD
channel. An ``ood`` channel is dropped: each is a distance from one model's own training
features, which a mix does not have. The store has the sources' grid (scale and translation in
um) and levels, is written one chunk at a time (memory bounded by a chunk per source, whatever
the volume's size), and records its sources and weights in its metadata (``mix``). Sources on
different grids are refused: of different spacings, or of one spacing but lying apart, most
often because each ``infer.py`` sweep lays its grid through its run's trained section of the
volume (``section_z_um`` in its ``summary.json``) and the runs trained on different sections.

Scoring a mix against a cohort's truth is the evaluation layer's (``python -m
xpression.evaluation.mix``, which calls this).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from xpression.inference.grid import OutputGrid
from xpression.inference.predictor import InferenceError
from xpression.inference.writers import MapStore, _read_meta, read_maps

__all__ = ["MixError", "MAPS", "mix_maps", "source_volumes", "normalised_weights"]

MAPS = "maps.ome.zarr"
OOD = "ood"


class MixError(InferenceError):
    """Maps that cannot be mixed, or an output that may not be written (one line)."""


@dataclass(frozen=True)
class _Source:
    """One source's store of one volume."""

    path: Path
    meta: dict

    @property
    def channels(self) -> list[str]:
        return list(self.meta["targets"])

    @property
    def targets(self) -> list[str]:
        """The mean channels: every channel but ``<target>_sd`` and ``ood``."""
        trust = self.meta.get("uncertainty") or {}
        if trust.get("targets"):
            return list(trust["targets"])
        return [c for c in self.channels if c != OOD and not (c.endswith("_sd") and c[:-3] in self.channels)]

    @property
    def grid(self) -> OutputGrid:
        return OutputGrid.from_dict(self.meta["grid"])


def source_volumes(folder: str | Path) -> dict[str, Path]:
    """``{volume_id: store}`` for the X-Pression map stores ``<folder>/<volume_id>/maps.ome.zarr``."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.parent.name: p for p in sorted(folder.glob(f"*/{MAPS}")) if _read_meta(p) is not None}


def normalised_weights(weights: Sequence[float], n: int) -> list[float]:
    """``weights`` divided by their sum; a :class:`MixError` unless there are ``n``, all finite and > 0."""
    w = [float(x) for x in weights]
    if len(w) != n:
        raise MixError(f"{len(w)} weight(s) for {n} sources: give one weight per source")
    if not all(math.isfinite(x) and x > 0 for x in w):
        raise MixError(f"weights must be positive numbers, got {w}")
    total = sum(w)
    return [x / total for x in w]


def _check_output(output: Path, sources: Sequence[Path], overwrite: bool) -> None:
    out = output.expanduser().resolve()
    for src in sources:
        s = src.expanduser().resolve()
        if out == s or out in s.parents or s in out.parents:
            raise MixError(f"output {output} and source {src} overlap: write the mix to a folder of its own")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise MixError(f"{output} exists; choose another output or pass --overwrite to replace the maps in it")


_NO_ANCHOR = object()  # a source's anchor is not recorded (no summary.json beside its maps)


def _anchor(src: _Source, vid: str) -> object:
    """The plane (z, um) the sweep laid its grid through: the trained section of this volume of
    the source's run (``section_z_um`` in the ``summary.json`` infer.py wrote beside the maps;
    None: no trained section, the grid centred), or ``_NO_ANCHOR`` when not recorded."""
    try:
        volume = json.loads((src.path.parent.parent / "summary.json").read_text())["volumes"][vid]
    except (OSError, ValueError, KeyError, TypeError):
        return _NO_ANCHOR
    z = volume.get("section_z_um", _NO_ANCHOR) if isinstance(volume, dict) else _NO_ANCHOR
    return z if z is None or z is _NO_ANCHOR else float(z)


def _shifted(vid: str, first: _Source, other: _Source) -> str:
    """The message for grids of one spacing that lie apart: most likely their anchors (each sweep's
    grid passes through its run's trained section) differ."""
    head = (f"volume {vid}: the grids differ in translation (um): {list(first.grid.origin_um)} in {first.path} against "
            f"{list(other.grid.origin_um)} in {other.path} at the same spacing")
    za, zb = _anchor(first, vid), _anchor(other, vid)
    fix = "maps mix on one grid: mix sweeps of runs trained on the same sections (data.sections)"
    if za is _NO_ANCHOR or zb is _NO_ANCHOR:
        return (f"{head}: likely their anchors differ (infer.py lays each grid through the trained section of its "
                f"run, so runs trained on different sections give shifted grids); {fix}")
    if za != zb:
        def plane(z: object) -> str:
            return "none (grid centred)" if z is None else f"z = {z:g} um"

        hint = fix
        if za is not None and zb is not None:  # both anchored: a z step dividing their distance puts both on one grid
            vox = first.grid.voxel_size_um[0]
            k = abs(round((za - first.grid.volume_origin_um[0]) / vox) - round((zb - other.grid.volume_origin_um[0]) / vox))
            hint = f"{fix}, or sweep both with a z spacing whose step divides the {k} voxels ({k * vox:g} um) between the two planes"
        return (f"{head}: their anchors differ, as infer.py lays each grid through the trained section of its run "
                f"({plane(za)} in {first.path.parent.parent}, {plane(zb)} in {other.path.parent.parent}); {hint}")
    return (f"{head} and through the same plane: the sources swept different images of this volume (their size, "
            "voxel size or origin differ); maps mix on one grid: sweep every source over the same image")


def _check_same(vid: str, first: _Source, other: _Source) -> None:
    """Grids (scale, translation, shape) and target channels of ``other`` against ``first``."""
    a, b = first.grid, other.grid
    for what, x, y in (("scale (um)", a.spacing_um, b.spacing_um), ("translation (um)", a.origin_um, b.origin_um),
                       ("shape", a.shape, b.shape)):
        if len(x) != len(y) or not np.allclose(x, y, rtol=1e-6, atol=1e-6):
            if what == "scale (um)":
                raise MixError(f"volume {vid}: the grids differ in {what}: {list(x)} in {first.path} against "
                               f"{list(y)} in {other.path}; maps mix on one grid: sweep every source with the same "
                               "spacing_um, one that no model rounds (infer.py's log notes each rounding)")
            if what == "shape":  # same spacing and grid point 0: the swept images differ in size
                raise MixError(f"volume {vid}: the grids differ in {what}: {list(x)} in {first.path} against "
                               f"{list(y)} in {other.path} at the same spacing and translation: the sources swept "
                               "images of this volume of different sizes; maps mix on one grid: sweep every source "
                               "over the same image")
            raise MixError(_shifted(vid, first, other))
    if first.targets != other.targets:
        raise MixError(f"volume {vid}: the target channels differ: {first.targets} in {first.path} against "
                       f"{other.targets} in {other.path}; only maps of the same targets, in the same order, mix")


def _plan(sources: Sequence[Path]) -> dict[str, list[_Source]]:
    """The sources' stores of every volume they all hold, checked against each other."""
    found = []
    for src in sources:
        vols = source_volumes(src)
        if not vols:
            raise MixError(f"{src} holds no maps (no <volume>/{MAPS}): give infer.py output folders")
        found.append(vols)
    common = [v for v in found[0] if all(v in f for f in found[1:])]
    if not common:
        have = "; ".join(f"{s}: {sorted(f)}" for s, f in zip(sources, found))
        raise MixError(f"no volume has maps in every source ({have})")
    plan: dict[str, list[_Source]] = {}
    for vid in common:
        stores = [_Source(f[vid], _read_meta(f[vid]) or {}) for f in found]
        for s in stores:
            if not s.meta.get("complete"):
                raise MixError(f"{s.path} is not complete (an interrupted sweep): finish it with infer.py first")
        for s in stores[1:]:
            _check_same(vid, stores[0], s)
        plan[vid] = stores
    return plan


def mix_maps(sources: Sequence[str | Path], weights: Sequence[float], output: str | Path, overwrite: bool = False,
             progress: bool = True) -> dict[str, Path]:
    """Write the weighted mean of the ``sources``' maps (``infer.py`` output folders) to
    ``<output>/<volume_id>/maps.ome.zarr`` for every volume they all hold (see the module doc);
    returns ``{volume_id: store}``. Every check runs before anything is written; an existing
    ``output`` (not an empty folder) is replaced, store by store, only with ``overwrite``."""
    from xpression.config import check_output_writable

    sources, output = [Path(s) for s in sources], Path(output)
    if len(sources) < 2:
        raise MixError(f"a mix needs two sources or more, got {len(sources)}")
    w = normalised_weights(weights, len(sources))
    _check_output(output, sources, overwrite)
    plan = _plan(sources)
    check_output_writable(output)
    return {vid: _mix_volume(vid, stores, w, output / vid / MAPS, overwrite, progress) for vid, stores in plan.items()}


def _mix_volume(vid: str, stores: list[_Source], w: list[float], path: Path, overwrite: bool, progress: bool) -> Path:
    first = stores[0]
    targets = first.targets
    with_sd = all(f"{t}_sd" in s.channels for s in stores for t in targets)
    sd_names = [f"{t}_sd" for t in targets] if with_sd else []
    dropped = sorted({c for s in stores for c in s.channels} - set(targets) - set(sd_names))
    mix = {"sources": [str(s.path.resolve()) for s in stores], "weights": w, "mean": "sum_i w_i mu_i",
           "sd": "sqrt(sum_i w_i (sd_i^2 + mu_i^2) - mu^2)" if with_sd else None, "dropped": dropped,
           "note": "ood dropped: a distance from one model's training features" if OOD in dropped else None}
    identity = {"mix": [dict(s.meta.get("identity") or {}, maps=str(s.path.resolve())) for s in stores], "weights": w,
                # the first source's run: its spots are the ones shown beside the maps and the baselines' labels
                "run_dir": (first.meta.get("identity") or {}).get("run_dir")}
    meta = {"volume_id": vid, "mix": mix, "target_kind": first.meta.get("target_kind"),
            "target_colors": first.meta.get("target_colors")}
    if with_sd:  # read by the evaluation's SD scores (xpression.evaluation.maps.score_uncertainty)
        meta["uncertainty"] = {"method": "mix", "targets": targets, "sd_channels": sd_names, "ood_channel": None,
                               "ood": None, "calibration": None}
    store = MapStore.open(path, first.grid, first.meta["tile_shape"], targets + sd_names, identity,
                          {"method": "weighted mean of maps", "weights": w}, meta,
                          levels=int(first.meta.get("levels", 1)), overwrite=overwrite)
    arrays = [read_maps(s.path)[0] for s in stores]
    mean_cols = [[s.channels.index(t) for t in targets] for s in stores]
    sd_cols = [[s.channels.index(n) for n in sd_names] for s in stores]
    written = []
    from rich.progress import track

    for tile in track(list(store.tiling), description=f"{vid}: mixing", disable=not progress, transient=True):
        blocks = [np.asarray(a[(slice(None),) + tile.slices], dtype=np.float64) for a in arrays]
        mus = [b[c] for b, c in zip(blocks, mean_cols)]
        mu = sum(wi * m for wi, m in zip(w, mus))
        if not np.isfinite(mu).any():
            continue  # outside every tissue mask: the store's NaN fill already says so
        values = [mu]
        if with_sd:
            # = sum w_i (sd_i^2 + mu_i^2) - mu^2 (the weights sum to 1), without its cancellation
            var = sum(wi * (b[c] ** 2 + (m - mu) ** 2) for wi, b, c, m in zip(w, blocks, sd_cols, mus))
            values.append(np.sqrt(var))
        store.write_tile(tile, np.concatenate(values))
        written.append(tile.index)
    store.finalize(written, extra={"tiles_tissue": len(written), "tiles_total": len(store.tiling)})
    return path

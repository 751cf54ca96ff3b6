"""Check a cohort's registration before training: `python -m xpression.data.check cohort.yaml [--out DIR]`.

Every section is read, registered as its manifest declares (landmark residuals, spot pitch, the
checks training runs first) and placed in its volume (spots inside the volume, inside the CT tissue
mask). One table goes to the terminal and one overlay PNG per section to ``--out`` (default
``runs/check/<date-time>``): the CT on the section plane, the spots coloured by their dominant target,
the landmarks with their residuals, a scale bar in um. From the CT only the cached tissue mask and
the one plane each overlay shows are read.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from xpression.data.geometry import DataError, Plane, SlabGrid
from xpression.data.manifest import Cohort, ManifestError, SectionEntry, load_manifest
from xpression.data.mask import tissue_mask
from xpression.data.patches import read_slab
from xpression.data.placement import placement_problem, spots_in_volume
from xpression.data.registration import SPOT_RADIUS_UM
from xpression.data.sections import Section, load_section
from xpression.data.targets import ObsmTarget, dominant_index
from xpression.data.volume import Volume, VolumeError, open_volume
from xpression.plotting import file_in_the_way, new_figure, save_figure

__all__ = ["SectionCheck", "check_cohort", "check_table", "draw_overlay", "main"]

log = logging.getLogger(__name__)


@dataclass
class SectionCheck:
    """What the check found for one section (``error`` set when it cannot be used)."""

    entry: SectionEntry
    section: Section | None = None
    in_volume: int | None = None
    in_mask: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    overlay: Path | None = None


def _mask_for(volume: Volume) -> tuple[Any, str | None]:
    try:
        return tissue_mask(volume), None
    except VolumeError as err:
        return None, f"no CT tissue mask ({err})"


def check_section(entry: SectionEntry, volume: Volume, mask: Any, max_residual_um: float = SPOT_RADIUS_UM,
                  max_drop_fraction: float = 0.5) -> SectionCheck:
    """Register one section (the checks training runs) and count where its spots fall.

    ``max_drop_fraction``: the largest share of the spots that may lie outside the volume, as
    training allows (``data.max_drop_fraction``); beyond it the section is an error, as
    ``train.py`` refuses it (training also drops spots whose patch, not only whose centre,
    leaves the volume, so it may refuse a section that passes here)."""
    result = SectionCheck(entry)
    try:
        section = load_section(entry, max_residual_um=max_residual_um, voxel_size_um=volume.voxel_size_um)
    except DataError as err:
        result.error = str(err)
        return result
    result.section = section
    result.notes.extend(section.registration.warnings)
    n = len(section.points_um)
    inside = spots_in_volume(volume, section.points_um)
    result.in_volume = int(inside.sum())
    if n - result.in_volume > max_drop_fraction * n:
        result.error = str(placement_problem(section, volume, inside, (0.0, 0.0, 0.0), max_drop_fraction))
    elif result.in_volume < n:
        result.notes.append(f"{n - result.in_volume} of {n} spots lie outside the volume")
    if mask is not None:
        result.in_mask = int((mask.contains(section.points_um) & inside).sum())
        if result.in_mask < 0.5 * n:
            result.notes.append(f"only {result.in_mask} of {n} spots fall on CT tissue: check the landmarks, their "
                                "declaration and z_um/plane against the overlay")
    return result


def _dominant(section: Section, obsm_key: str) -> tuple[np.ndarray | None, list[str]]:
    """Each spot's dominant target (index) and the target names, or (None, []) without them."""
    try:
        values, spec = ObsmTarget(key=obsm_key).compute({section.id: section.adata})
    except DataError:
        return None, []
    return dominant_index(values[section.id], spec.kind), list(spec.names)


def plane_image(volume: Volume, plane: Plane, lo_uv: np.ndarray, hi_uv: np.ndarray, max_px: int = 900) -> np.ndarray:
    """The CT on ``plane`` over the in-plane box ``lo_uv..hi_uv`` (um), at most ``max_px`` a side,
    read from the coarsest pyramid level fine enough; values scaled to about [0, 1] for display."""
    spacing = max(float(np.max(hi_uv - lo_uv)) / max_px, float(min(volume.voxel_size_um)))
    level = volume
    for i in range(1, len(volume.levels)):
        finer = volume.level(i)
        if max(finer.voxel_size_um) > spacing:
            break
        level = finer
    h, w = (int(math.ceil((hi_uv[k] - lo_uv[k]) / spacing)) + 1 for k in (1, 0))
    grid = SlabGrid(plane, (spacing, spacing, spacing), (float(lo_uv[0]), float(lo_uv[1])), (1, h, w), 0)
    scale = float(np.iinfo(level.dtype).max) if np.issubdtype(level.dtype, np.integer) else 1.0
    image = read_slab(level, grid, transform=lambda b: np.asarray(b, dtype=np.float32) / scale, dtype="float16")[0]
    image = image.astype(np.float32)
    finite = image[np.isfinite(image)]
    if finite.size:
        lo, hi = np.percentile(finite, [1.0, 99.5])
        image = np.clip((image - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return image


def _nice_length(width_um: float) -> float:
    raw = width_um / 5
    base = 10 ** math.floor(math.log10(raw))
    return max(m * base for m in (1, 2, 5) if m * base <= raw)


def draw_overlay(check: SectionCheck, volume: Volume, out: Path, obsm_key: str = "programs_true") -> Path:
    """One PNG: the CT on the section plane, spots coloured by dominant target, landmarks with
    residual arrows (exaggerated, factor in the legend), a scale bar in um."""
    from matplotlib.collections import EllipseCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    section = check.section
    reg = section.registration
    pts = np.vstack([section.uv_um, reg.ct_uv_um])
    margin = 3 * section.spot_radius_um + 50.0
    lo, hi = pts.min(axis=0) - margin, pts.max(axis=0) + margin
    image = plane_image(volume, section.plane, lo, hi)
    fig, ax = new_figure(figsize=(9.0, 7.0))
    ax.imshow(image, cmap="gray", extent=(lo[0], hi[0], hi[1], lo[1]), interpolation="nearest")
    dominant, names = _dominant(section, obsm_key)
    colours = [f"C{i % 10}" for i in range(max(len(names), 1))]
    faces = [colours[i] for i in dominant] if dominant is not None else "tab:cyan"
    d = 2 * section.spot_radius_um
    ax.add_collection(EllipseCollection(d, d, 0.0, units="xy", offsets=section.uv_um, offset_transform=ax.transData,
                                        facecolors=faces, edgecolors="none", alpha=0.55))
    mapped = reg.affine.apply(reg.st_px)
    arrows = mapped - reg.ct_uv_um
    longest = float(np.linalg.norm(arrows, axis=1).max())
    gain = max(1.0, round(0.04 * float(np.max(hi - lo)) / max(longest, 1e-9)))
    ax.quiver(reg.ct_uv_um[:, 0], reg.ct_uv_um[:, 1], gain * arrows[:, 0], gain * arrows[:, 1], angles="xy",
              scale_units="xy", scale=1.0, color="yellow", width=0.004)
    ax.plot(reg.ct_uv_um[:, 0], reg.ct_uv_um[:, 1], "+", color="yellow", ms=10, mew=2)
    for name, (u, v) in zip(reg.names, reg.ct_uv_um):
        ax.annotate(name, (u, v), xytext=(4, 4), textcoords="offset points", color="yellow", fontsize=7)
    length = _nice_length(float(hi[0] - lo[0]))
    ax.add_artist(AnchoredSizeBar(ax.transData, length, f"{length:g} µm", "lower right", color="white", frameon=False,
                                  size_vertical=(hi[1] - lo[1]) / 250))
    handles = [Patch(color=c, alpha=0.7, label=n) for c, n in zip(colours, names)] or [
        Patch(color="tab:cyan", alpha=0.7, label=f"spots (no obsm['{obsm_key}'] to colour them: --obsm KEY)")]
    handles.append(Line2D([], [], color="yellow", marker="+", ls="-", label=f"landmark (CT), residual x{gain:g}"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title="dominant target" if names else None, title_fontsize=8, alignment="left")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])
    axial = section.plane.is_axial
    ax.set_xlabel("x (µm)" if axial else "u (µm, in-plane)")
    ax.set_ylabel("y (µm)" if axial else "v (µm, in-plane)")
    worst, worst_um = reg.worst
    ax.set_title(f"{section.id} on {section.volume_id}, {_plane_text(check).replace(' um', ' µm')}\n{len(reg.names)} landmarks, RMS "
                 f"{reg.rms_um:.1f} µm, worst {worst} {worst_um:.1f} µm; spot pitch {_pitch_text(reg)} µm", fontsize=9)
    return save_figure(fig, out)


def _plane_text(check: SectionCheck) -> str:
    entry, section = check.entry, check.section
    if section is not None and section.registration.plane_from_landmarks:
        return f"tilt {section.registration.tilt_deg:.1f} deg (landmarks)"
    if entry.z_um is not None:
        return f"z = {entry.z_um:g} um"
    if section is not None:
        return f"tilt {section.registration.tilt_deg:.1f} deg"
    return "tilted" if entry.plane is not None else "from landmarks"


def _pitch_text(reg: Any) -> str:
    if reg.pitch_um is None:
        return "-"
    return f"{reg.pitch_um:.1f} / {reg.expected_pitch_um:g}"


def check_table(cohort: Cohort, results: list[SectionCheck]) -> Table:
    """One row per section: landmarks, residuals, spot pitch, spots placed, plane, status."""
    table = Table(title=f"registration check: cohort {cohort.name!r} ({cohort.path})", title_justify="left")
    columns = ("section", "volume", "spots", "landmarks", "RMS (um)", "worst landmark (um)", "pitch (um)",
               "in volume", "in tissue mask", "plane", "status")
    for c in columns:
        table.add_column(c, justify="right" if c in ("spots", "landmarks", "RMS (um)", "in volume", "in tissue mask") else "left",
                         no_wrap=c in ("plane", "pitch (um)"))
    for r in results:
        sec = r.section
        if sec is None:
            table.add_row(r.entry.id, r.entry.volume_id, "", "", "", "", "", "", "", _plane_text(r), "[red]error[/red]")
            continue
        reg = sec.registration
        n = len(sec.points_um)
        worst, worst_um = reg.worst
        status = "[red]error[/red]" if r.error else "[yellow]warning[/yellow]" if r.notes else "[green]ok[/green]"
        table.add_row(
            sec.id, sec.volume_id, str(n), f"{len(reg.names)}/{reg.n_rows}", f"{reg.rms_um:.1f}", f"{worst} {worst_um:.1f}",
            _pitch_text(reg), f"{r.in_volume}/{n}", "-" if r.in_mask is None else f"{r.in_mask}/{n}", _plane_text(r), status,
        )
    return table


def check_cohort(cohort: Cohort, out: Path | None = None, obsm_key: str = "programs_true",
                 max_residual_um: float = SPOT_RADIUS_UM, max_drop_fraction: float = 0.5) -> list[SectionCheck]:
    """Check every section of ``cohort`` (:func:`check_section`); with ``out``, write
    ``<out>/<section>_overlay.png`` each."""
    results = []
    for ventry in cohort.volumes:
        if not ventry.sections:
            continue
        try:
            volume = open_volume(ventry.image, ventry.voxel_size_um)
        except VolumeError as err:
            results.extend(SectionCheck(s, error=str(err)) for s in ventry.sections)
            continue
        mask, note = _mask_for(volume)
        for entry in ventry.sections:
            result = check_section(entry, volume, mask, max_residual_um, max_drop_fraction)
            if note and result.section is not None:
                result.notes.append(note)
            if out is not None and result.section is not None:
                result.overlay = draw_overlay(result, volume, out / f"{entry.id}_overlay.png", obsm_key)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpression.data.check", description=__doc__.split("\n")[0])
    parser.add_argument("manifest", type=Path, help="the cohort.yaml")
    parser.add_argument("--out", type=Path, default=None, help="folder for the overlays (default runs/check/<date-time>)")
    parser.add_argument("--obsm", default="programs_true", help="obsm key whose dominant column colours the spots")
    parser.add_argument("--max-residual-um", type=float, default=SPOT_RADIUS_UM, help="landmark residual bound (um)")
    parser.add_argument("--max-drop-fraction", type=float, default=0.5,
                        help="largest share of a section's spots that may lie outside its volume (train.py's "
                             "data.max_drop_fraction); more is an error")
    args = parser.parse_args(argv)
    if not math.isfinite(args.max_residual_um) or args.max_residual_um <= 0:
        parser.error(f"--max-residual-um must be a positive number of um, got {args.max_residual_um:g}")
    if not 0 <= args.max_drop_fraction <= 1:
        parser.error(f"--max-drop-fraction must be in [0, 1], got {args.max_drop_fraction:g}")
    blocker = None if args.out is None else file_in_the_way(args.out)
    if blocker is not None:
        parser.error(f"--out {args.out}: {blocker} is a file; give a folder for the overlays")
    console = Console(width=None if sys.stdout.isatty() else 160)
    logging.getLogger("xpression.data.registration").setLevel(logging.ERROR)  # its warnings are printed below the table
    try:
        cohort = load_manifest(args.manifest)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / "check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    taken = [out / f"{s.id}_overlay.png" for s in cohort.sections if (out / f"{s.id}_overlay.png").exists()]
    if taken:
        print(f"error: {taken[0]} exists; choose another --out (nothing is overwritten)", file=sys.stderr)
        return 2
    results = check_cohort(cohort, out, args.obsm, args.max_residual_um, args.max_drop_fraction)
    console.print(check_table(cohort, results))
    for r in results:
        for note in r.notes:
            console.print(f"{r.entry.id}: warning: {note}", markup=False, highlight=False)
    for r in results:
        if r.error:
            console.print(f"{r.entry.id}: error: {r.error}", markup=False, highlight=False)
    written = [r.overlay for r in results if r.overlay is not None]
    if written:
        console.print(f"overlays: {out} ({len(written)} PNG)", markup=False, highlight=False)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())

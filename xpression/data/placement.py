"""Where a registered section's spots sit in its volume, and which cause to name when they do
not fit: a patch larger than the volume, a plane outside it, or spots outside it in-plane."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from xpression.data.geometry import DataError

__all__ = ["volume_box_um", "spots_in_volume", "check_patch_fits", "placement_problem"]


def volume_box_um(volume: Any) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) corners (z, y, x) um of the volume's voxel footprints."""
    vs = np.asarray(volume.voxel_size_um, dtype=float)
    lo = np.asarray(getattr(volume, "origin_um", (0.0, 0.0, 0.0)), dtype=float) - vs / 2
    return lo, lo + np.asarray(volume.shape) * vs


def spots_in_volume(volume: Any, points_um: np.ndarray) -> np.ndarray:
    """(N,) whether each (z, y, x) um point lies inside the volume's box."""
    lo, hi = volume_box_um(volume)
    pts = np.asarray(points_um, dtype=float).reshape(-1, 3)
    return np.all((pts >= lo) & (pts <= hi), axis=1)


def check_patch_fits(volume: Any, patch_um: Sequence[float], volume_id: str) -> None:
    """Raise :class:`DataError` if the patch ``(depth, height, width)`` um exceeds the volume
    along (z, y, x): no spot of it could be used."""
    extent = np.asarray(volume.extent_um, dtype=float)
    too_big = [f"{axis} ({p:g} > {e:g} um)" for axis, p, e in zip("zyx", patch_um, extent) if p > e]
    if too_big:
        size = " x ".join(f"{p:g}" for p in patch_um)
        raise DataError(volume.path, f"the patch ({size} um, depth x height x width) is larger than volume {volume_id!r} "
                                     f"along {', '.join(too_big)}: set a smaller sampler.geometry.size_um")


def placement_problem(section: Any, volume: Any, patch_inside: np.ndarray, patch_um: Sequence[float], limit: float) -> DataError:
    """The error for a section of which too many patches leave the volume, naming the likeliest
    cause: the plane outside the volume (spot centres beyond its z range), spots outside it in-plane
    (a registration problem), or patches reaching past its faces although the centres are inside."""
    pts = section.points_um
    lo, hi = volume_box_um(volume)
    centre_in = spots_in_volume(volume, pts)
    off_z = (pts[:, 0] < lo[0]) | (pts[:, 0] > hi[0])
    off_yx = ~centre_in & ~off_z
    edge = centre_in & ~patch_inside
    n, lost = len(pts), int((~patch_inside).sum())
    head = f"section {section.id}: {lost} of {n} spots unusable (limit {limit:.0%})"
    box = ", ".join(f"{a} {round(l, 1):g}..{round(h, 1):g}" for a, l, h in zip("zyx", lo, hi))
    counts = {"z": int(off_z.sum()), "yx": int(off_yx.sum()), "edge": int(edge.sum())}
    cause = max(counts, key=counts.get)
    if cause == "z":
        where = "the landmarks' CT z" if getattr(section.registration, "plane_from_landmarks", False) else "z_um/plane"
        return DataError(section.adata_path, f"{head}: the section plane lies outside volume {volume.path.name} — "
                                             f"{counts['z']} spots at z {pts[:, 0].min():.1f}..{pts[:, 0].max():.1f} um, "
                                             f"the volume spans z {lo[0]:.1f}..{hi[0]:.1f} um; check {where}")
    if cause == "yx":
        span = ", ".join(f"{a} {pts[:, k].min():.0f}..{pts[:, k].max():.0f}" for k, a in ((1, "y"), (2, "x")))
        return DataError(section.adata_path, f"{head}: {counts['yx']} registered spots fall outside volume "
                                             f"{volume.path.name} in-plane (spots {span} um; volume {box} um); check the "
                                             "landmarks and their declaration (landmarks_moving, landmarks_st_space, "
                                             "landmarks_ct_units) and the volume's voxel_size_um")
    return DataError(section.adata_path, f"{head}: {counts['edge']} spots lie inside volume {volume.path.name} but their "
                                         f"patch ({' x '.join(f'{p:g}' for p in patch_um)} um) reaches past its faces "
                                         f"({box} um): the plane is within half a patch depth of the top or bottom, or the "
                                         "tissue touches the sides; use a smaller patch or raise max_drop_fraction")

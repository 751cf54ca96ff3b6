"""Analytic tissue structures: organ outline, airway/vessel trees, lesions.

Geometry functions take points (N, 3) in um, (z, y, x) order, and return approximate
signed distances in um (negative inside). Generators draw structure parameters from a
numpy Generator; the results are plain lists/dicts so they serialise into the spec JSON.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

# Segment rows: z0, y0, x0, z1, y1, x1, r0, r1, wall (um); r = lumen radius.
SEGMENT_FIELDS = ("z0", "y0", "x0", "z1", "y1", "x1", "r0", "r1", "wall")


def organ_sd(points: np.ndarray, organ: dict[str, Any]) -> np.ndarray:
    """Approximate signed distance (um) to the lobe outline; negative inside the organ."""
    p = np.asarray(points, np.float64)
    zc, yc, xc = organ["center"]
    ay, ax = organ["semi_um"]
    ca, sa = math.cos(organ["angle"]), math.sin(organ["angle"])
    dz = p[:, 0] - zc
    dy, dx = p[:, 1] - yc, p[:, 2] - xc
    ny = (ca * dy + sa * dx) / ay
    nx = (-sa * dy + ca * dx) / ax
    rho = np.hypot(ny, nx)
    theta = np.arctan2(ny, nx)
    radius = np.ones_like(rho)
    for k, amp, phase, zfreq in organ["harmonics"]:
        radius += amp * np.cos(k * theta + phase + zfreq * dz)
    taper = np.sqrt(np.clip(1.0 - (dz / organ["rz_um"]) ** 2, 0.05, 1.0))
    return ((rho - radius * taper) * math.sqrt(ay * ax)).astype(np.float32)


def capsule_sd(points: np.ndarray, segments: np.ndarray, reach: float,
               bbox: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Signed distances (um) to the union of tapered capsules: (lumen, outer wall surface).

    Values are clipped to at most `reach`; segments farther than that from the points'
    bounding box (lo, hi) are skipped.
    """
    p = np.asarray(points, np.float64)
    n = len(p)
    lumen = np.full(n, reach, np.float32)
    outer = np.full(n, reach, np.float32)
    segs = np.asarray(segments, np.float64).reshape(-1, 9)
    if n == 0 or len(segs) == 0:
        return lumen, outer
    lo, hi = bbox if bbox is not None else (p.min(axis=0), p.max(axis=0))
    grow = np.maximum(segs[:, 6], segs[:, 7]) + segs[:, 8] + reach
    smin = np.minimum(segs[:, 0:3], segs[:, 3:6]) - grow[:, None]
    smax = np.maximum(segs[:, 0:3], segs[:, 3:6]) + grow[:, None]
    keep = np.all((smin <= hi) & (smax >= lo), axis=1)
    if not keep.any():
        return lumen, outer
    segs = segs[keep]
    # Elementwise float32 arithmetic in absolute coordinates (no matmul, no batch-relative
    # origin): each point's value is bit-identical whatever batch it is evaluated in.
    f32 = np.float32
    a = segs[:, 0:3].astype(f32)
    e = (segs[:, 3:6] - segs[:, 0:3]).astype(f32)
    inv_l2 = (1.0 / (segs[:, 3:6] - segs[:, 0:3]).__pow__(2).sum(axis=1)).astype(f32)[:, None]
    r0 = segs[:, 6].astype(f32)[:, None]
    dr = (segs[:, 7] - segs[:, 6]).astype(f32)[:, None]
    wall = segs[:, 8].astype(f32)[:, None]
    q = [np.ascontiguousarray(p[:, k], dtype=f32)[None, :] for k in range(3)]
    step = max(1, 1_000_000 // len(segs))
    for i in range(0, n, step):
        diff = [q[k][:, i:i + step] - a[:, k:k + 1] for k in range(3)]  # (segments, points)
        t = diff[0] * e[:, 0:1]
        t += diff[1] * e[:, 1:2]
        t += diff[2] * e[:, 2:3]
        t *= inv_l2
        np.clip(t, 0.0, 1.0, out=t)
        d2 = np.zeros_like(t)
        for k in range(3):
            diff[k] -= t * e[:, k:k + 1]
            d2 += diff[k] * diff[k]
        d = np.sqrt(d2) - (r0 + t * dr)
        lumen[i:i + step] = d.min(axis=0)
        outer[i:i + step] = (d - wall).min(axis=0)
    np.minimum(lumen, reach, out=lumen)
    np.minimum(outer, reach, out=outer)
    return lumen, outer


def lesion_sd(points: np.ndarray, lesion: dict[str, Any]) -> np.ndarray:
    """Approximate signed distance (um) to a noisy ellipsoid lesion; negative inside."""
    p = np.asarray(points, np.float64) - np.asarray(lesion["center"])
    rot = np.asarray(lesion["rotation"])  # columns: the ellipsoid's axes in (z, y, x)
    radii = np.asarray(lesion["radii_um"], np.float64)
    # explicit sums instead of matmul keep results independent of the batch
    local = np.stack([p[:, 0] * rot[0, k] + p[:, 1] * rot[1, k] + p[:, 2] * rot[2, k] for k in range(3)])
    m = local / radii[:, None]
    q = np.sqrt(m[0] ** 2 + m[1] ** 2 + m[2] ** 2)
    m /= radii[:, None]
    grad = np.sqrt(m[0] ** 2 + m[1] ** 2 + m[2] ** 2) / np.maximum(q, 1e-9)
    wobble = np.zeros(len(p))
    for kz, ky, kx, phase in lesion["waves"]:
        wobble += np.sin(p[:, 0] * kz + p[:, 1] * ky + p[:, 2] * kx + phase)
    if lesion["waves"]:
        wobble *= lesion["noise_amp"] / math.sqrt(len(lesion["waves"]))
    return ((q - 1.0 - wobble) / np.maximum(grad, 1e-12)).astype(np.float32)


# ---------------------------------------------------------------- generators


def make_organ(rng: np.random.Generator, size_um: list[float]) -> dict[str, Any]:
    """A smooth lobe filling most of the block in-plane, tapering slowly along z."""
    z, y, x = size_um
    harmonics = [[k, float(rng.uniform(0.02, 0.06)), float(rng.uniform(0, 2 * math.pi)),
                  float(rng.uniform(-1.0, 1.0) / max(y, x))] for k in (2, 3, 4)]
    return {
        "center": [z / 2, y / 2 + float(rng.uniform(-0.02, 0.02)) * y,
                   x / 2 + float(rng.uniform(-0.02, 0.02)) * x],
        "semi_um": [float(rng.uniform(0.44, 0.47)) * y, float(rng.uniform(0.44, 0.47)) * x],
        "angle": float(rng.uniform(0, math.pi)),
        "rz_um": float(max(3.0 * z, 1.5 * max(y, x))),
        "harmonics": harmonics,
    }


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    v = rng.normal(size=3)
    return _unit(v - v.dot(d) * d)


def _rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    return Rotation.from_rotvec(axis * angle).apply(v)


def make_tree(rng: np.random.Generator, organ: dict[str, Any], size_um: list[float],
              root_radius: float, min_radius: float, wall_ratio: float, wall_min: float,
              z_damp: float, max_segments: int = 120) -> list[list[float]]:
    """Grow a bifurcating tree of tapered capsules from the organ's edge inwards.

    Segment length is 5-8 lumen radii; children take 0.70-0.86 of the parent's radius
    and turn 20-45 degrees in a random branching plane. Branches stop at min_radius, at
    max_segments, or where they would leave the organ.
    """
    z, y, x = size_um
    angle = rng.uniform(0, 2 * math.pi)
    zc, yc, xc = organ["center"]
    ay, ax = organ["semi_um"]
    start = np.array([rng.uniform(0.3, 0.7) * z, yc + 0.9 * ay * math.sin(angle),
                      xc + 0.9 * ax * math.cos(angle)])
    direction = _unit(np.array([0.0, yc - start[1], xc - start[2]]) + rng.normal(0, 0.2, 3) * [z_damp, 1, 1])
    segments: list[list[float]] = []
    stack = [(start, direction, root_radius)]
    while stack and len(segments) < max_segments:
        p0, d, r = stack.pop(0)
        length = r * rng.uniform(5.0, 8.0)
        end = None
        for _ in range(3):
            cand = p0 + d * length
            if organ_sd(cand[None], organ)[0] < -r:
                end = cand
                break
            length *= 0.5
        if end is None:
            continue
        r1 = r * 0.92
        segments.append([*map(float, p0), *map(float, end), float(r), float(r1),
                         float(max(wall_min, wall_ratio * r))])
        if r1 * 0.86 < min_radius:
            continue
        axis = _perpendicular(rng, d)
        for sign in (1.0, -1.0):
            turn = math.radians(rng.uniform(20, 45))
            cd = _rotate(d, axis, sign * turn)
            cd = _unit(cd * np.array([z_damp, 1.0, 1.0]))
            stack.append((end, cd, r1 * rng.uniform(0.70, 0.86)))
    return segments


LESION_KINDS = {
    # condition: (count range, radius range um at 2.5 mm in-plane, density, infection, immune, remodelling)
    "mock": ((1, 1), (40, 70), 0.35, 0.0, 0.5, 0.05),
    "infected": ((5, 8), (60, 350), 0.9, 1.0, 0.8, 0.6),
    "vaccinated": ((2, 3), (40, 150), 0.6, 0.25, 1.0, 0.3),
}


def make_lesion(rng: np.random.Generator, center: np.ndarray, radius: float, density: float,
                infection: float, immune: float, remodelling: float) -> dict[str, Any]:
    """A rotated ellipsoid (axes 0.7-1.3 x radius) with a sinusoidal boundary wobble."""
    radii = radius * rng.uniform(0.7, 1.3, 3)
    waves = []
    for _ in range(4):
        k = 2 * math.pi / (radius * rng.uniform(0.6, 1.5))
        waves.append([*map(float, _unit(rng.normal(size=3)) * k), float(rng.uniform(0, 2 * math.pi))])
    return {
        "center": [float(c) for c in center],
        "radii_um": [float(r) for r in radii],
        "rotation": Rotation.random(random_state=rng).as_matrix().tolist(),
        "noise_amp": 0.12,
        "waves": waves,
        "density": float(density * rng.uniform(0.85, 1.0)),
        "infection": float(infection),
        "immune": float(immune),
        "remodelling": float(remodelling),
    }


def make_lesions(rng: np.random.Generator, condition: str, organ: dict[str, Any],
                 size_um: list[float], section_z: list[float], off_plane: bool = True) -> list[dict[str, Any]]:
    """Lesions for a condition, centres uniform over the organ; with `off_plane` the first is
    centred 60-150 um away from every section (a lesion a 2D model cannot see)."""
    (nmin, nmax), (rmin, rmax), dens, inf, imm, rem = LESION_KINDS[condition]
    z, y, x = size_um
    scale = min(1.0, min(y, x) / 2500.0)
    out = []
    n = int(rng.integers(nmin, nmax + 1))
    for i in range(n):
        radius = max(30.0, rng.uniform(rmin, rmax) * scale)
        for _ in range(200):
            c = np.array([rng.uniform(0, z), rng.uniform(0, y), rng.uniform(0, x)])
            if i == 0 and off_plane:
                c[0] = _off_plane_z(rng, z, section_z)
            if organ_sd(c[None], organ)[0] < -0.5 * radius:
                break
        out.append(make_lesion(rng, c, radius, dens, inf, imm, rem))
    return out


def _off_plane_z(rng: np.random.Generator, z: float, section_z: list[float]) -> float:
    for _ in range(100):
        c = rng.uniform(0, z)
        if all(60.0 <= abs(c - s) <= 150.0 for s in section_z):
            return float(c)
    return float(min(z, section_z[0] + 80.0) if section_z[0] + 80.0 <= z else section_z[0] - 80.0)

"""Hashed lattice noise: any point's value depends only on the seed and the point.

Cellular (Worley) noise uses one feature point per cell of a cubic lattice, jittered by
a hash of the cell index, so a chunk is computable from the cells around it alone.
"""

from __future__ import annotations

import numpy as np

_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_P = (np.uint64(0x8CB92BA72F3D8DD7), np.uint64(0xD6E8FEB86659FD93), np.uint64(0xA0761D6478BD642F))
_BITS21 = np.uint64(0x1FFFFF)


def hash_u64(iz: np.ndarray, iy: np.ndarray, ix: np.ndarray, key: int) -> np.ndarray:
    """SplitMix64-style hash of integer lattice coordinates and a key (uint64 array)."""
    h = np.asarray(iz, np.int64).view(np.uint64) * _P[0]
    h ^= np.asarray(iy, np.int64).view(np.uint64) * _P[1]
    h ^= np.asarray(ix, np.int64).view(np.uint64) * _P[2]
    h ^= np.uint64((key * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    h ^= h >> np.uint64(30)
    h *= _M2
    h ^= h >> np.uint64(27)
    h *= _M3
    h ^= h >> np.uint64(31)
    return h


def worley_f2_minus_f1(points_um: np.ndarray, cell_um: float, key: int,
                       bbox: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Worley F2 - F1 (um) at points (N, 3) z, y, x, one jittered feature point per cell.

    Zero on the bisector between the two nearest feature points (a cell wall), growing
    towards a cell's centre. Uses the 27 surrounding cells. bbox: optional (lo, hi) um
    bounds of the points, to skip computing them.
    """
    g = np.asarray(points_um, np.float64) / cell_um
    ic = np.floor(g).astype(np.int64)
    if bbox is None:
        lo, hi = ic.min(axis=0) - 1, ic.max(axis=0) + 1
    else:
        lo = np.floor(np.asarray(bbox[0]) / cell_um).astype(np.int64) - 1
        hi = np.floor(np.asarray(bbox[1]) / cell_um).astype(np.int64) + 1
    dims = hi + 1 - lo
    cz, cy, cx = np.meshgrid(*(np.arange(lo[a], lo[a] + dims[a]) for a in range(3)), indexing="ij")
    h = hash_u64(cz.ravel(), cy.ravel(), cx.ravel(), key)
    del cz, cy, cx
    inv = 1.0 / float(1 << 21)
    # jitter in [0, 1) per cell, 21 bits: exact in float32, as are small integers plus it
    table = [(((h >> np.uint64(21 * a)) & _BITS21) * inv).astype(np.float32) for a in range(3)]
    # position within the own cell depends on the point only, so results do not depend on
    # which other points share the call
    frac = (g - ic).astype(np.float32)
    pz, py, px = (np.ascontiguousarray(frac[:, a]) for a in range(3))
    rel = ic - lo
    base = (rel[:, 0] * dims[1] + rel[:, 1]) * dims[2] + rel[:, 2]
    n = len(base)
    f1 = np.full(n, np.inf, np.float32)
    f2 = np.full(n, np.inf, np.float32)
    d = np.empty(n, np.float32)
    t = np.empty(n, np.float32)
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                idx = base + ((dz * dims[1] + dy) * dims[2] + dx)
                np.subtract(pz - np.float32(dz), table[0].take(idx), out=d)
                np.multiply(d, d, out=d)
                np.subtract(py - np.float32(dy), table[1].take(idx), out=t)
                d += t * t
                np.subtract(px - np.float32(dx), table[2].take(idx), out=t)
                d += t * t
                np.maximum(f1, d, out=t)
                np.minimum(f2, t, out=f2)
                np.minimum(f1, d, out=f1)
    return (np.sqrt(f2) - np.sqrt(f1)) * np.float32(cell_um)


def blockwise(points: np.ndarray, fn, block_um: float = 160.0) -> np.ndarray:
    """Apply fn to spatially coherent groups of points and reassemble in input order.

    Grouping keeps each call's bounding box small so structure culling stays effective.
    fn maps an (M, 3) array to an (M, ...) array.
    """
    points = np.asarray(points, np.float64)
    if len(points) == 0 or np.ptp(points, axis=0).max() <= block_um:
        return fn(points)
    keys = np.floor((points - points.min(axis=0)) / block_um).astype(np.int64)
    dims = keys.max(axis=0) + 1
    flat = (keys[:, 0] * dims[1] + keys[:, 1]) * dims[2] + keys[:, 2]
    order = np.argsort(flat, kind="stable")
    bounds = np.flatnonzero(np.diff(flat[order])) + 1
    out = None
    for grp in np.split(order, bounds):
        res = fn(points[grp])
        if out is None:
            out = np.empty((len(points),) + res.shape[1:], res.dtype)
        out[grp] = res
    return out

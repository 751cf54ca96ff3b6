"""Section planes, patch geometry and oblique sampling, all in micrometres.

Conventions (docs/design.md): 3D points are (z, y, x) in um; a section plane has a unit normal
``n`` (``n_z >= 0``) and an in-plane frame ``(u, v)``. A patch is a box of
``(depth, height, width)`` um laid along ``(n, v, u)``; for an axial section that is (z, y, x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "DataError",
    "Plane",
    "PatchGeometry",
    "SlabGrid",
    "sample_frame",
    "patch_boxes_overlap",
    "count_patch_overlaps",
]

PAPER_PATCH_UM = (34.0, 205.0, 205.0)


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and the problem."""

    def __init__(self, path: object, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


@dataclass(frozen=True)
class Plane:
    """A section plane: ``origin`` (um) and unit axes ``n``, ``v``, ``u`` as (z, y, x) vectors."""

    origin: np.ndarray
    n: np.ndarray
    v: np.ndarray
    u: np.ndarray

    @classmethod
    def axial(cls, z_um: float) -> "Plane":
        """The plane ``z = z_um``: ``u = x``, ``v = y``, origin ``(z_um, 0, 0)``."""
        return cls(
            origin=np.array([float(z_um), 0.0, 0.0]),
            n=np.array([1.0, 0.0, 0.0]),
            v=np.array([0.0, 1.0, 0.0]),
            u=np.array([0.0, 0.0, 1.0]),
        )

    @classmethod
    def from_points(cls, points_um: Sequence[Sequence[float]], where: object = None) -> "Plane":
        """Least-squares plane through 3 or more (z, y, x) points in um."""
        pts = np.asarray(points_um, dtype=float)
        if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < 3:
            raise DataError(where, f"a tilted plane needs 3 or more (z, y, x) points, got shape {pts.shape}")
        centre = pts.mean(axis=0)
        _, s, vt = np.linalg.svd(pts - centre)
        if s[1] <= 1e-9 * max(s[0], 1.0):
            raise DataError(where, "plane points are collinear (no unique plane)")
        n = vt[2] / np.linalg.norm(vt[2])
        if n[0] < 0 or (n[0] == 0 and (n[1] < 0 or (n[1] == 0 and n[2] < 0))):
            n = -n
        x_hat = np.array([0.0, 0.0, 1.0])
        u = x_hat - (x_hat @ n) * n
        if np.linalg.norm(u) < 1e-6:
            raise DataError(where, "plane is perpendicular to the x axis; the in-plane u axis is undefined")
        u /= np.linalg.norm(u)
        v = np.cross(n, u)
        if v[1] < 0:
            v = -v
        return cls(origin=(centre @ n) * n, n=n, v=v, u=u)

    @property
    def is_axial(self) -> bool:
        return bool(np.allclose(self.n, [1.0, 0.0, 0.0], atol=1e-12))

    @property
    def axes(self) -> np.ndarray:
        """Rows ``n, v, u``: the (depth, height, width) directions of a patch, (3, 3)."""
        return np.stack([self.n, self.v, self.u])

    def to_world(self, uv_um: np.ndarray, w_um: float | np.ndarray = 0.0) -> np.ndarray:
        """(N, 2) in-plane ``(u, v)`` um (+ offset ``w`` along ``n``) -> (N, 3) (z, y, x) um."""
        uv = np.asarray(uv_um, dtype=float).reshape(-1, 2)
        w = np.broadcast_to(np.asarray(w_um, dtype=float), (len(uv),))
        return self.origin + uv[:, :1] * self.u + uv[:, 1:2] * self.v + w[:, None] * self.n

    def to_uvw(self, points_um: np.ndarray) -> np.ndarray:
        """(N, 3) world um -> (N, 3) ``(u, v, w)`` um in the plane frame."""
        d = np.asarray(points_um, dtype=float).reshape(-1, 3) - self.origin
        return np.stack([d @ self.u, d @ self.v, d @ self.n], axis=1)


@dataclass(frozen=True)
class PatchGeometry:
    """Patch field of view in um, ``(depth, height, width)`` along ``(n, v, u)``.

    The default is the published field of view (21 x 128 x 128 px at 1.6 um).
    """

    size_um: tuple[float, float, float] = PAPER_PATCH_UM

    def __post_init__(self) -> None:
        size = np.asarray(self.size_um, dtype=float)
        if size.shape != (3,) or not np.all(np.isfinite(size)) or np.any(size <= 0):
            raise ValueError(f"patch size must be 3 positive numbers (depth, height, width) in um, got {list(self.size_um)}")

    def shape_vox(self, voxel_size_um: Sequence[float]) -> tuple[int, int, int]:
        """Odd voxel counts (D, H, W) nearest to ``size_um / voxel_size_um`` so the spot is the centre."""
        out = []
        for size, vs in zip(self.size_um, voxel_size_um):
            n = max(1, int(round(float(size) / float(vs))))
            if n % 2 == 0:
                n = n + 1 if (float(size) / float(vs)) >= n else n - 1
            out.append(max(1, n))
        return tuple(out)  # type: ignore[return-value]

    def extent_um(self, voxel_size_um: Sequence[float]) -> np.ndarray:
        """Physical size (um) actually covered by the voxel patch: ``shape * voxel_size``."""
        return np.asarray(self.shape_vox(voxel_size_um), dtype=float) * np.asarray(voxel_size_um, dtype=float)


@dataclass(frozen=True)
class SlabGrid:
    """A regular grid laid along a section's frame, around the plane.

    Grid index ``(d, h, w)`` is at world point
    ``plane.origin + (w0 + w*sx) u + (v0 + h*sy) v + ((d - centre_d) * sz) n`` (um), so index
    ``centre_d`` lies on the plane. ``spacing_um`` = ``(sz, sy, sx)``.
    """

    plane: Plane
    spacing_um: tuple[float, float, float]
    uv0_um: tuple[float, float]
    shape: tuple[int, int, int]
    centre_d: int

    @classmethod
    def around(
        cls,
        plane: Plane,
        uv_um: np.ndarray,
        patch_shape: Sequence[int],
        spacing_um: Sequence[float],
        margin_um: float | Sequence[float] = 0.0,
        anchor_uv_um: Sequence[float] = (0.0, 0.0),
    ) -> "SlabGrid":
        """The smallest grid holding every patch centred at ``uv_um`` plus ``margin_um``
        (scalar or (depth, height, width)) each side; in-plane grid points sit at
        ``anchor_uv_um + k * spacing`` (use the volume origin to align with its voxels)."""
        sz, sy, sx = (float(s) for s in spacing_um)
        uv = np.asarray(uv_um, dtype=float).reshape(-1, 2) - np.asarray(anchor_uv_um, dtype=float)
        pd, ph, pw = (int(p) // 2 for p in patch_shape)
        md, mh, mw = (int(np.ceil(m / s - 1e-9)) for m, s in zip(np.broadcast_to(margin_um, (3,)), (sz, sy, sx)))
        lo_w = int(np.floor(uv[:, 0].min() / sx)) - pw - mw
        hi_w = int(np.ceil(uv[:, 0].max() / sx)) + pw + mw
        lo_h = int(np.floor(uv[:, 1].min() / sy)) - ph - mh
        hi_h = int(np.ceil(uv[:, 1].max() / sy)) + ph + mh
        half_d = pd + md
        return cls(
            plane=plane,
            spacing_um=(sz, sy, sx),
            uv0_um=(lo_w * sx + float(anchor_uv_um[0]), lo_h * sy + float(anchor_uv_um[1])),
            shape=(2 * half_d + 1, hi_h - lo_h + 1, hi_w - lo_w + 1),
            centre_d=half_d,
        )

    def patch_corners(self, hw: np.ndarray, patch_shape: Sequence[int]) -> np.ndarray:
        """(N, 8, 3) world um of the outermost voxel centres of patches centred at grid ``(h, w)``."""
        hw = np.asarray(hw, dtype=float).reshape(-1, 2)
        half = np.array([int(p) // 2 for p in patch_shape], dtype=float)
        signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], dtype=float)
        centre = np.column_stack([np.full(len(hw), float(self.centre_d)), hw])
        idx = centre[:, None, :] + (signs * half)[None]
        return self.world(idx.reshape(-1, 3)).reshape(len(hw), 8, 3)

    def index_of(self, uv_um: np.ndarray) -> np.ndarray:
        """Nearest grid ``(h, w)`` (N, 2) int of in-plane points ``(u, v)`` um."""
        uv = np.asarray(uv_um, dtype=float).reshape(-1, 2)
        w = np.rint((uv[:, 0] - self.uv0_um[0]) / self.spacing_um[2])
        h = np.rint((uv[:, 1] - self.uv0_um[1]) / self.spacing_um[1])
        return np.stack([h, w], axis=1).astype(np.int64)

    def world(self, dhw: np.ndarray) -> np.ndarray:
        """(N, 3) grid indices (may be fractional) -> (N, 3) world um."""
        idx = np.asarray(dhw, dtype=float).reshape(-1, 3)
        sz, sy, sx = self.spacing_um
        u = self.uv0_um[0] + idx[:, 2] * sx
        v = self.uv0_um[1] + idx[:, 1] * sy
        w = (idx[:, 0] - self.centre_d) * sz
        return self.plane.to_world(np.stack([u, v], axis=1), w)


def sample_frame(
    block: np.ndarray,
    block_start_vox: Sequence[float],
    voxel_size_um: Sequence[float],
    origin_um: Sequence[float],
    axes: np.ndarray,
    spacing_um: Sequence[float],
    shape: Sequence[int],
    order: int = 1,
    cval: float = 0.0,
    volume_origin_um: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Trilinear (``order=1``) samples of ``block`` on an oriented grid.

    Output ``[i, j, k]`` is the value at world point
    ``origin_um + i*s0*axes[0] + j*s1*axes[1] + k*s2*axes[2]`` (um, z/y/x), where ``block``
    holds the volume voxels starting at ``block_start_vox`` and voxel ``idx`` sits at
    ``volume_origin_um + idx * voxel_size_um``. Computed one depth plane at a time to bound memory.
    """
    vs = np.asarray(voxel_size_um, dtype=float)
    start = np.asarray(block_start_vox, dtype=float) + np.asarray(volume_origin_um, dtype=float) / vs
    axes = np.asarray(axes, dtype=float)
    sp = np.asarray(spacing_um, dtype=float)
    d, h, w = (int(s) for s in shape)
    jj, kk = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    plane_pts = jj[..., None] * (sp[1] * axes[1]) + kk[..., None] * (sp[2] * axes[2])  # (h, w, 3)
    out = np.empty((d, h, w), dtype=np.float32)
    src = np.asarray(block, dtype=np.float32)
    for i in range(d):
        pts = np.asarray(origin_um, dtype=float) + i * sp[0] * axes[0] + plane_pts
        coords = (pts / vs - start).reshape(-1, 3).T
        out[i] = ndimage.map_coordinates(src, coords, order=order, mode="constant", cval=cval).reshape(h, w)
    return out


def patch_boxes_overlap(
    ca: np.ndarray, axes_a: np.ndarray, cb: np.ndarray, axes_b: np.ndarray, half_um: np.ndarray
) -> np.ndarray:
    """Whether oriented boxes intersect with positive volume (separating-axis test).

    ``ca`` (N, 3) and ``cb`` (N, 3) are paired centres in um; ``axes_a``/``axes_b`` (3, 3) rows
    are each box's (n, v, u); ``half_um`` (3,) the half extents along them. Touching faces do
    not count as overlap.
    """
    ca, cb = np.atleast_2d(ca), np.atleast_2d(cb)
    half = np.asarray(half_um, dtype=float)
    cand = [axes_a[i] for i in range(3)] + [axes_b[i] for i in range(3)]
    for i in range(3):
        for j in range(3):
            c = np.cross(axes_a[i], axes_b[j])
            if np.linalg.norm(c) > 1e-9:
                cand.append(c / np.linalg.norm(c))
    d = cb - ca
    separated = np.zeros(len(ca), dtype=bool)
    tol = 1e-6
    for axis in cand:
        ra = np.abs(axes_a @ axis) @ half
        rb = np.abs(axes_b @ axis) @ half
        separated |= np.abs(d @ axis) >= ra + rb - tol
    return ~separated


def count_patch_overlaps(
    centres_a: np.ndarray,
    axes_a: np.ndarray,
    centres_b: np.ndarray,
    axes_b: np.ndarray,
    size_um: Sequence[float],
    groups_a: np.ndarray | None = None,
    groups_b: np.ndarray | None = None,
) -> int:
    """Number of (a, b) pairs whose patch boxes intersect.

    ``centres_*`` (N, 3) um; ``axes_*`` (N, 3, 3) per-spot (n, v, u) rows; ``size_um`` the patch
    (depth, height, width) um; ``groups_*`` (e.g. volume ids) restrict pairs to the same group.
    """
    from scipy.spatial import cKDTree

    ca, cb = np.asarray(centres_a, float).reshape(-1, 3), np.asarray(centres_b, float).reshape(-1, 3)
    if len(ca) == 0 or len(cb) == 0:
        return 0
    half = np.asarray(size_um, dtype=float) / 2.0
    radius = 2.0 * float(np.linalg.norm(half))
    pairs = cKDTree(ca).query_ball_tree(cKDTree(cb), r=radius)
    ia = np.repeat(np.arange(len(ca)), [len(p) for p in pairs])
    ib = np.fromiter((j for p in pairs for j in p), dtype=np.int64, count=len(ia))
    if groups_a is not None and groups_b is not None:
        keep = np.asarray(groups_a)[ia] == np.asarray(groups_b)[ib]
        ia, ib = ia[keep], ib[keep]
    if len(ia) == 0:
        return 0
    aa, ab = np.asarray(axes_a, float), np.asarray(axes_b, float)
    total = 0
    # Pairs are grouped by their (orientation a, orientation b) so the SAT runs vectorised.
    key_a = np.unique(aa.reshape(len(aa), 9).round(9), axis=0, return_inverse=True)
    key_b = np.unique(ab.reshape(len(ab), 9).round(9), axis=0, return_inverse=True)
    inv_a, inv_b = np.asarray(key_a[1]).ravel(), np.asarray(key_b[1]).ravel()
    combo = inv_a[ia] * len(key_b[0]) + inv_b[ib]
    for c in np.unique(combo):
        sel = combo == c
        xa = key_a[0][c // len(key_b[0])].reshape(3, 3)
        xb = key_b[0][c % len(key_b[0])].reshape(3, 3)
        total += int(patch_boxes_overlap(ca[ia[sel]], xa, cb[ib[sel]], xb, half).sum())
    return total

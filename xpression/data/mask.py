"""Low-resolution tissue mask of a micro-CT volume.

Per axial slice, the intensity standard deviation (or, as in the original study, the mean) of
``window_um``-wide square windows is taken on a grid of ``stride_um`` (the original study: 128 px
windows at 16 px stride on 1.6 um voxels, about 205 um at 25.6 um); one Otsu threshold over all windows of the volume separates tissue from
background, and connected components under ``min_object_um2`` are removed slice by slice.
The result is a boolean grid whose voxel ``j`` is centred at ``origin_um + j * voxel_size_um``
in the volume's physical frame (um). Masks are cached next to the volume (or in
``cache_dir``) under a key of the parameters and the file's identity.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xpression.data.volume import Volume, VolumeError, open_volume

__all__ = ["TissueMask", "tissue_mask"]

_ALGO_VERSION = 2


@dataclass
class TissueMask:
    """Boolean tissue grid ``mask[z, y, x]`` with its own ``voxel_size_um`` and ``origin_um``."""

    mask: np.ndarray
    voxel_size_um: tuple[float, float, float]
    origin_um: tuple[float, float, float] = (0.0, 0.0, 0.0)
    threshold: float = float("nan")
    _sat: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mask.shape)  # type: ignore[return-value]

    @property
    def fraction(self) -> float:
        """Fraction of mask voxels that are tissue."""
        return float(self.mask.mean())

    def voxel_centres_um(self) -> np.ndarray:
        """Physical centres (N, 3) in um of all tissue voxels of the mask."""
        idx = np.argwhere(self.mask)
        return idx * np.asarray(self.voxel_size_um) + np.asarray(self.origin_um)

    def contains(self, points_um: Any) -> np.ndarray:
        """Whether each point (N, 3) in um falls in a tissue voxel (nearest mask voxel);
        points outside the grid are not tissue."""
        pts = np.atleast_2d(np.asarray(points_um, dtype=float))
        idx = np.rint((pts - np.asarray(self.origin_um)) / np.asarray(self.voxel_size_um)).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(self.shape)), axis=1)
        out = np.zeros(len(pts), dtype=bool)
        i = idx[inside]
        out[inside] = self.mask[i[:, 0], i[:, 1], i[:, 2]]
        return out

    def fraction_in_box(self, center_um: Any, size_um: Any) -> np.ndarray | float:
        """Tissue fraction of the mask voxels whose centres fall in an axis-aligned box.

        ``center_um``: (3,) or (N, 3) box centres in um; ``size_um``: box size (z, y, x) in um
        or a scalar. Mask voxels outside the grid count as background. Along an axis where
        the box is thinner than the mask voxel, the nearest voxel plane is used. Constant
        cost per box (summed-area table).
        """
        centres = np.asarray(center_um, dtype=float)
        single = centres.ndim == 1
        centres = np.atleast_2d(centres)
        size = np.broadcast_to(np.asarray(size_um, dtype=float), (3,))
        vox, org = np.asarray(self.voxel_size_um), np.asarray(self.origin_um)
        eps = 1e-9
        lo = np.ceil((centres - size / 2 - org) / vox - eps).astype(np.int64)
        hi = np.floor((centres + size / 2 - org) / vox + eps).astype(np.int64)
        near = np.rint((centres - org) / vox).astype(np.int64)
        thin = hi < lo
        lo[thin], hi[thin] = near[thin], near[thin]
        total = np.prod(hi - lo + 1, axis=1).astype(np.float64)
        n = np.asarray(self.shape)
        a = np.clip(lo, 0, n)
        b = np.clip(hi + 1, 0, n)
        b = np.maximum(a, b)
        s = self._summed_area()
        count = np.zeros(len(centres), dtype=np.int64)
        for corner in range(8):
            bits = [(corner >> k) & 1 for k in range(3)]
            iz, iy, ix = (np.where(bit, b[:, k], a[:, k]) for k, bit in enumerate(bits))
            sign = -1 if (3 - sum(bits)) % 2 else 1
            count += sign * s[iz, iy, ix]
        frac = count / total
        return float(frac[0]) if single else frac

    def _summed_area(self) -> np.ndarray:
        if self._sat is None:
            sat = np.zeros(tuple(s + 1 for s in self.shape), dtype=np.int64)
            sat[1:, 1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
            self._sat = sat
        return self._sat

    def save(self, path: str | os.PathLike, key: dict | None = None) -> None:
        """Write to ``.npz`` (with an optional cache ``key``), atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(
            tmp,
            mask=self.mask,
            voxel_size_um=np.asarray(self.voxel_size_um),
            origin_um=np.asarray(self.origin_um),
            threshold=np.float64(self.threshold),
            key=np.asarray(json.dumps(key or {}, sort_keys=True)),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["TissueMask", dict]:
        """Read a mask written by :meth:`save`; returns ``(mask, key)``."""
        with np.load(path, allow_pickle=False) as f:
            tm = cls(
                mask=f["mask"].astype(bool),
                voxel_size_um=tuple(float(v) for v in f["voxel_size_um"]),  # type: ignore[arg-type]
                origin_um=tuple(float(v) for v in f["origin_um"]),  # type: ignore[arg-type]
                threshold=float(f["threshold"]),
            )
            key = json.loads(str(f["key"]))
        return tm, key


# ---------------------------------------------------------------------------------------------


def _file_identity(path: Path) -> list:
    """Size and mtime of the file, or of the zarr metadata files of a directory store."""
    items = [path] if path.is_file() else [path, path / "zarr.json", path / "0", path / "0" / "zarr.json"]
    ident = []
    for p in items:
        try:
            st = p.stat()
            ident.append([p.name, int(st.st_size) if p.is_file() else 0, int(st.st_mtime_ns)])
        except OSError:
            ident.append([p.name, None, None])
    return ident


def _pick_level(vol: Volume, stride_um: Sequence[float]) -> Volume:
    """The coarsest pyramid level whose voxels are no larger than the mask's stride."""
    best = vol.level(0)
    for i in range(1, len(vol.levels)):
        lv = vol.level(i)
        if all(v <= s + 1e-9 for v, s in zip(lv.voxel_size_um, stride_um)):
            best = lv
        else:
            break
    return best


def _window_bounds(centres: np.ndarray, width: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    lo = np.rint(centres - width / 2).astype(np.int64)
    return np.clip(lo, 0, n), np.clip(lo + width, 0, n)


def _local_means(plane: np.ndarray, cy: np.ndarray, cx: np.ndarray, wy: int, wx: int) -> np.ndarray:
    """Mean of ``wy x wx`` windows centred at rows ``cy`` and columns ``cx`` (clipped to the plane)."""
    sat = np.zeros((plane.shape[0] + 1, plane.shape[1] + 1), dtype=np.float64)
    sat[1:, 1:] = plane.astype(np.float64).cumsum(0).cumsum(1)
    y0, y1 = _window_bounds(cy, wy, plane.shape[0])
    x0, x1 = _window_bounds(cx, wx, plane.shape[1])
    s = sat[y1][:, x1] - sat[y0][:, x1] - sat[y1][:, x0] + sat[y0][:, x0]
    area = np.outer(y1 - y0, x1 - x0).astype(np.float64)
    return s / np.maximum(area, 1)


def _local_feature(plane: np.ndarray, cy: np.ndarray, cx: np.ndarray, wy: int, wx: int, feature: str) -> np.ndarray:
    """Window mean (``"mean"``) or standard deviation (``"std"``) around each grid point."""
    mean = _local_means(plane, cy, cx, wy, wx)
    if feature == "mean":
        return mean
    square = _local_means(plane.astype(np.float64) ** 2, cy, cx, wy, wx)
    return np.sqrt(np.maximum(square - mean**2, 0.0))


def _remove_small(mask2d: np.ndarray, min_px: int) -> np.ndarray:
    from skimage.morphology import remove_small_objects

    if min_px <= 1:
        return mask2d
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return remove_small_objects(mask2d, max_size=min_px - 1)
        except TypeError:  # scikit-image < 0.26
            return remove_small_objects(mask2d, min_size=min_px)


def _compute(vol: Volume, window_um: float, stride: np.ndarray, min_object_um2: float,
             threshold: float | None, bright: bool, fill_holes: bool, feature: str = "std") -> TissueMask:
    from scipy.ndimage import binary_fill_holes
    from skimage.filters import threshold_otsu

    base = vol.level(0)
    src = _pick_level(base, stride)
    origin0 = np.asarray(base.origin_um)
    n_grid = np.floor((np.asarray(base.shape) - 1) * np.asarray(base.voxel_size_um) / stride + 1e-9).astype(int) + 1
    # Continuous index, in the chosen level, of each mask grid position.
    centres = [
        (np.arange(n) * s + origin0[k] - src.origin_um[k]) / src.voxel_size_um[k]
        for k, (n, s) in enumerate(zip(n_grid, stride))
    ]
    wy = max(1, int(round(window_um / src.voxel_size_um[1])))
    wx = max(1, int(round(window_um / src.voxel_size_um[2])))
    zs = np.clip(np.rint(centres[0]).astype(int), 0, src.shape[0] - 1)
    means = np.empty(tuple(n_grid), dtype=np.float32)
    for j, z in enumerate(zs):
        means[j] = _local_feature(src[int(z)], centres[1], centres[2], wy, wx, feature)
    thr = float(threshold) if threshold is not None else float(threshold_otsu(means))
    mask = means > thr if bright else means < thr
    min_px = int(math.ceil(min_object_um2 / (stride[1] * stride[2])))
    for j in range(mask.shape[0]):
        m = _remove_small(mask[j], min_px)
        mask[j] = binary_fill_holes(m) if fill_holes else m
    return TissueMask(mask, tuple(float(s) for s in stride), tuple(float(o) for o in origin0), thr)  # type: ignore[arg-type]


def tissue_mask(
    volume: Volume | str | os.PathLike,
    window_um: float = 102.4,
    stride_um: float | Sequence[float] = 25.6,
    min_object_um2: float = 1.0e5,
    feature: str = "std",
    threshold: float | None = None,
    bright: bool = True,
    fill_holes: bool = True,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    voxel_size_um: Any = None,
) -> TissueMask:
    """Low-resolution tissue mask of ``volume`` (a :class:`Volume` or a path).

    ``window_um``: side of the square in-plane window averaged per grid point (um).
    ``stride_um``: mask grid spacing, scalar or ``(z, y, x)`` (um). ``min_object_um2``: smaller
    connected tissue regions of a slice are dropped (um^2). ``feature``: what is thresholded,
    the window's standard deviation (``"std"``, default: tissue is textured, embedding medium is
    not, whatever their mean grey values) or its mean (``"mean"``, the original study's choice
    with 204.8 um windows, which fails where porous tissue averages to the medium's grey).
    ``threshold``: fixed threshold instead of Otsu; ``bright``: tissue has the higher feature; ``fill_holes``: count enclosed regions
    (airway lumens, homogeneous consolidated lesions) as tissue, slice by slice.
    The mask is cached in ``cache_dir`` (default: next to the volume, ``<name>.mask-<hash>.npz``)
    and recomputed if the parameters or the file change. Raises :class:`VolumeError` if no
    tissue is found.
    """
    vol = volume if isinstance(volume, Volume) else open_volume(volume, voxel_size_um)
    stride = np.broadcast_to(np.asarray(stride_um, dtype=float), (3,)).copy()
    if np.any(stride <= 0) or window_um <= 0:
        raise ValueError("tissue_mask: window_um and stride_um must be positive")
    if feature not in ("std", "mean"):
        raise ValueError(f"tissue_mask: feature must be 'std' or 'mean', got {feature!r}")
    params = {
        "version": _ALGO_VERSION,
        "window_um": float(window_um),
        "stride_um": stride.tolist(),
        "min_object_um2": float(min_object_um2),
        "feature": feature,
        "threshold": None if threshold is None else float(threshold),
        "bright": bool(bright),
        "fill_holes": bool(fill_holes),
    }
    base = vol.level(0)
    key = dict(
        params,
        path=str(base.path.resolve()),
        shape=list(base.shape),
        dtype=str(base.dtype),
        voxel_size_um=list(base.voxel_size_um),
        file=_file_identity(base.path),
    )
    cache_path = None
    if cache:
        digest = hashlib.sha1(json.dumps([params, key["path"]], sort_keys=True).encode()).hexdigest()[:12]
        folder = Path(cache_dir) if cache_dir is not None else base.path.parent
        cache_path = folder / f"{base.path.name}.mask-{digest}.npz"
        if cache_path.exists():
            try:
                tm, stored = TissueMask.load(cache_path)
                if stored == json.loads(json.dumps(key)):
                    return tm
            except Exception:  # unreadable cache: recompute
                pass
    tm = _compute(vol, float(window_um), stride, float(min_object_um2), threshold, bright, fill_holes, feature)
    if not tm.mask.any():
        raise VolumeError(
            base.path,
            f"tissue mask is empty (threshold {tm.threshold:.4g}, window {window_um} um, "
            f"min object {min_object_um2} um^2); check the volume or pass threshold=",
        )
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tm.save(cache_path, key)
        except OSError as exc:
            warnings.warn(f"could not cache the tissue mask at {cache_path}: {exc}", stacklevel=2)
    return tm

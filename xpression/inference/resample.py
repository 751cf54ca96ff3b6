"""A volume seen at another voxel size (trilinear), for models trained at a different one."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["ResampledVolume"]


class ResampledVolume:
    """``volume`` resampled on the fly to ``voxel_size_um`` (z, y, x), same physical frame.

    Voxel ``i`` of the view is at ``origin_um + i * voxel_size_um``; ``read_block`` reads the
    source block around the requested one and interpolates trilinearly, after a Gaussian
    low-pass when the view is coarser than the source (sigma = sqrt(f^2 - 1) / 2 source voxels).
    """

    def __init__(self, volume: Any, voxel_size_um: Sequence[float]):
        self.source = volume
        self.voxel_size_um = tuple(float(v) for v in np.broadcast_to(np.asarray(voxel_size_um, float), (3,)))
        self.origin_um = tuple(float(o) for o in getattr(volume, "origin_um", (0.0, 0.0, 0.0)))
        self._ratio = np.asarray(self.voxel_size_um) / np.asarray(volume.voxel_size_um)
        self.shape = tuple(int(np.floor((n - 1) / r)) + 1 for n, r in zip(volume.shape, self._ratio))
        self.chunks = tuple(max(1, int(round(c / r))) for c, r in zip(getattr(volume, "chunks", self.shape), self._ratio))
        self.dtype = volume.dtype
        self.path = getattr(volume, "path", None)
        self._sigma = np.sqrt(np.clip(self._ratio**2 - 1.0, 0.0, None)) / 2.0

    def read_block(self, start_vox: Sequence[int], stop_vox: Sequence[int], fill: float = 0) -> np.ndarray:
        start = np.asarray(start_vox, np.int64)
        stop = np.asarray(stop_vox, np.int64)
        src_lo = np.floor(start * self._ratio).astype(np.int64) - 2 - np.ceil(2 * self._sigma).astype(np.int64)
        src_hi = np.ceil((stop - 1) * self._ratio).astype(np.int64) + 3 + np.ceil(2 * self._sigma).astype(np.int64)
        block = self.source.read_block(src_lo, src_hi, fill=fill).astype(np.float32)
        if np.any(self._sigma > 0.1):
            block = ndimage.gaussian_filter(block, self._sigma, mode="nearest")
        axes = [np.arange(a, b) * r - lo for a, b, r, lo in zip(start, stop, self._ratio, src_lo)]
        coords = np.stack(np.meshgrid(*axes, indexing="ij"))
        out = ndimage.map_coordinates(block, coords, order=1, mode="nearest")
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(self.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        """Basic ``(z, y-slice, x-slice)`` / slice reads through :meth:`read_block`."""
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        start, stop, steps, squeeze = [], [], [], []
        for k, n in zip(key, self.shape):
            if isinstance(k, (int, np.integer)):
                start.append(int(k)), stop.append(int(k) + 1), steps.append(1), squeeze.append(True)
            else:
                a, b, s = k.indices(n)
                start.append(a), stop.append(max(b, a)), steps.append(s), squeeze.append(False)
        block = self.read_block(start, stop)[tuple(slice(None, None, s) for s in steps)]
        return block[tuple(0 if q else slice(None) for q in squeeze)]

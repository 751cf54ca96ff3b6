"""Is a scan as noisy as the scans a model was trained on?

A model's own uncertainty does not see every change of scanner: three times the noise lowered
both the ensemble's spread and its feature-space ood on the benchmark cohort while one animal's
map lost 0.13 r (README, "Unseen animals scanned differently"). The noise itself is easy to
measure on the input. :func:`scan_noise` estimates it from a bounded sample of small 3D blocks:
the residual of each voxel against the mean of its 6 face neighbours, whose spread for
independent noise of sd ``s`` is ``s * sqrt(7/6)``, read robustly (median absolute deviation, so
edges and tissue texture count little), in units of the volume's robust intensity range (the
0.5-99.5 % percentiles the default normaliser maps to [0, 1]). Tissue texture adds to it, so
compare scans of one kind of tissue and voxel size; :func:`noise_ratio` does, against the
training scans' range.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from xpression.data.intensity import robust_range

__all__ = ["NOISE_TOLERANCE", "scan_noise", "noise_ratio"]

NOISE_TOLERANCE = 1.5  # a scan whose noise lies this many times outside the training scans' range is flagged


def _block(volume: Any, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    if hasattr(volume, "read_block"):
        return np.asarray(volume.read_block(start, stop), np.float64)
    return np.asarray(volume[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))], np.float64)


def scan_noise(volume: Any, n_blocks: int = 32, block_vox: int = 16, seed: int = 0) -> float:
    """Noise sd of ``volume`` (a :class:`~xpression.data.volume.Volume` or a 3D array) as a
    fraction of its robust intensity range, from ``n_blocks`` blocks of up to ``block_vox``
    voxels per axis at ``seed``-ed places. NaN for a volume under 3 voxels along an axis or
    without intensity range."""
    shape = np.asarray(volume.shape[-3:], dtype=np.int64)
    if np.any(shape < 3):
        return math.nan
    size = np.minimum(int(block_vox), shape)
    rng = np.random.default_rng(seed)
    residuals = []
    for _ in range(int(n_blocks)):
        start = rng.integers(0, shape - size + 1)
        b = _block(volume, start, start + size)
        neighbours = (b[:-2, 1:-1, 1:-1] + b[2:, 1:-1, 1:-1] + b[1:-1, :-2, 1:-1] + b[1:-1, 2:, 1:-1]
                      + b[1:-1, 1:-1, :-2] + b[1:-1, 1:-1, 2:]) / 6.0
        residuals.append((b[1:-1, 1:-1, 1:-1] - neighbours).ravel())
    r = np.concatenate(residuals)
    mad = float(np.median(np.abs(r - np.median(r))))
    low, high = robust_range(volume)
    if not high > low:
        return math.nan
    return 1.4826 * mad / math.sqrt(7.0 / 6.0) / (high - low)


def noise_ratio(noise: float, training: Mapping[str, float]) -> float:
    """How far ``noise`` lies outside the training scans' range, as a factor: 1 inside it,
    ``noise / max`` above it, ``noise / min`` below it (NaN without a finite reference)."""
    ref = [float(v) for v in training.values() if np.isfinite(v) and v > 0]
    if not ref or not np.isfinite(noise) or noise <= 0:
        return math.nan
    lo, hi = min(ref), max(ref)
    return noise / hi if noise > hi else noise / lo if noise < lo else 1.0

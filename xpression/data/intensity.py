"""Intensity statistics and normalisation from bounded-cost voxel samples.

Samples are read from a fixed number of storage-chunk-aligned blocks chosen with a seeded
generator, each subsampled on a regular stride, so the cost does not grow with the volume.
All transforms act per block (patch), never on the whole volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from xpression.data.volume import Volume

__all__ = [
    "sample_voxels",
    "robust_range",
    "IntensityNormalizer",
    "HistogramMatcher",
    "histogram_match",
    "intensity_transform",
    "MatchedNormalizer",
    "SCALINGS",
    "has_torch_transform",
    "match_to_reference",
]

# How intensities reach ~[0, 1]: each volume's robust percentile range, or the 8-bit range
# (x / 255) as the original study did after its histogram matching.
SCALINGS = ("robust", "divide255")

VolumeLike = Any  # Volume or np.ndarray (any shape; a 1D array is taken as a sample)


def _stride_for(shape: Sequence[int], budget: int) -> tuple[int, ...]:
    n = int(np.prod(shape))
    if n <= budget:
        return (1,) * len(shape)
    big = [s > 1 for s in shape]
    s = int(math.ceil((n / max(budget, 1)) ** (1.0 / max(sum(big), 1))))
    return tuple(s if b else 1 for b in big)


def sample_voxels(volume: VolumeLike, max_voxels: int = 1_000_000, n_blocks: int = 128, seed: int = 0) -> np.ndarray:
    """A 1D sample of about ``max_voxels`` voxel values.

    For a :class:`Volume` no larger than ``max_voxels``: every voxel. Otherwise ``n_blocks`` in-plane blocks of up to 64 x 64 voxels spread over a
    few axial planes picked by a ``seed``-ed generator. Positions depend only on the volume's
    shape and the seed, never on how it is stored, so a TIFF stack and its OME-Zarr copy give
    the same sample (and the same normalisation); grouping blocks by plane keeps a TIFF read to
    a few pages. For an in-memory array: a regular strided subsample.
    """
    if not isinstance(volume, Volume):
        arr = np.asarray(volume)
        stride = _stride_for(arr.shape, max_voxels)
        return np.ascontiguousarray(arr[tuple(slice(None, None, s) for s in stride)]).reshape(-1)
    shape = np.asarray(volume.shape)
    if np.prod(shape) <= max_voxels:
        return np.asarray(volume[:, :, :]).reshape(-1)
    rng = np.random.default_rng(seed)
    n_planes = int(min(32, shape[0], n_blocks))
    planes = np.sort(rng.choice(int(shape[0]), size=n_planes, replace=False))
    block = np.minimum(64, shape[1:])
    per_plane = max(1, n_blocks // n_planes)
    per_block = max(1, max_voxels // (per_plane * n_planes))
    stride = _stride_for(tuple(int(b) for b in block), per_block)
    parts = []
    for z in planes:
        corners = rng.integers(0, shape[1:] - block + 1, size=(per_plane, 2))
        plane = volume[int(z), :, :] if per_plane * int(np.prod(block)) > 0.25 * np.prod(shape[1:]) else None
        for y0, x0 in corners:
            ys, xs = slice(int(y0), int(y0 + block[0]), stride[0]), slice(int(x0), int(x0 + block[1]), stride[1])
            values = plane[ys, xs] if plane is not None else volume[int(z), ys, xs]
            parts.append(np.asarray(values).reshape(-1))
    return np.concatenate(parts)


def robust_range(
    volume: VolumeLike,
    percentiles: Sequence[float] = (0.5, 99.5),
    sample: int | np.ndarray = 1_000_000,
    seed: int = 0,
) -> tuple[float, float]:
    """``(low, high)`` intensity percentiles estimated from a bounded sample.

    ``sample``: the sample size in voxels, or a precomputed sample (array) to use as is.
    """
    values = np.asarray(sample) if isinstance(sample, np.ndarray) else sample_voxels(volume, int(sample), seed=seed)
    if values.size == 0:
        raise ValueError("robust_range: empty sample")
    lo, hi = np.percentile(values.astype(np.float64, copy=False), list(percentiles))
    return float(lo), float(hi)


@dataclass(frozen=True)
class IntensityNormalizer:
    """Affine map of ``[low, high]`` (raw intensity units) to ``[0, 1]`` float32, clipped."""

    low: float
    high: float
    clip: bool = True

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)) or self.high <= self.low:
            raise ValueError(f"IntensityNormalizer needs finite low < high, got low={self.low}, high={self.high}")

    @classmethod
    def from_volume(
        cls, volume: VolumeLike, percentiles: Sequence[float] = (0.5, 99.5), sample: int = 1_000_000, seed: int = 0
    ) -> "IntensityNormalizer":
        return cls(*robust_range(volume, percentiles, sample, seed))

    def __call__(self, block: np.ndarray) -> np.ndarray:
        out = np.asarray(block, dtype=np.float32) - np.float32(self.low)
        out *= np.float32(1.0 / (self.high - self.low))
        if self.clip:
            np.clip(out, 0.0, 1.0, out=out)
        return out

    def apply_torch(self, block: Any) -> Any:
        """The same map on a torch tensor (any device), float32 arithmetic in the same order:
        the numbers equal ``self(block)`` exactly."""
        import torch

        out = block.to(torch.float32) - np.float32(self.low).item()
        out.mul_(np.float32(1.0 / (self.high - self.low)).item())
        return out.clamp_(0.0, 1.0) if self.clip else out

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "clip": self.clip}

    @classmethod
    def from_dict(cls, d: dict) -> "IntensityNormalizer":
        return cls(float(d["low"]), float(d["high"]), bool(d.get("clip", True)))


_LUT_DTYPES = (np.uint8, np.int8, np.uint16, np.int16)


@dataclass(frozen=True)
class HistogramMatcher:
    """Monotone map of a source volume's intensities onto a reference's (float32 output).

    Integer 8/16-bit sources use a lookup table over every representable value (``lut``,
    indexed by ``value - offset``); other dtypes interpolate between matched quantiles.
    """

    lut: np.ndarray | None = None
    offset: int = 0
    src_quantiles: np.ndarray | None = field(default=None, repr=False)
    ref_quantiles: np.ndarray | None = field(default=None, repr=False)

    def __call__(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block)
        if self.lut is not None:
            if block.dtype.kind not in "iu":
                raise TypeError(f"HistogramMatcher built for integer data got {block.dtype}")
            idx = block if self.offset == 0 and block.dtype.kind == "u" else block.astype(np.int64) - self.offset
            return self.lut[idx]
        return np.interp(block, self.src_quantiles, self.ref_quantiles).astype(np.float32)

    @property
    def has_torch(self) -> bool:
        """Whether :meth:`apply_torch` exists for this matcher (lookup tables only)."""
        return self.lut is not None

    def apply_torch(self, block: Any) -> Any:
        """The lookup table applied on ``block``'s device (8/16-bit integer sources only)."""
        import torch

        if self.lut is None:
            raise TypeError("HistogramMatcher.apply_torch needs a lookup table (8/16-bit integer source)")
        lut = torch.from_numpy(self.lut).to(block.device, non_blocking=True)
        return lut[block.to(torch.int64) - self.offset]


def histogram_match(
    volume_or_sample: VolumeLike,
    reference: VolumeLike,
    sample: int = 1_000_000,
    n_quantiles: int = 2001,
    seed: int = 0,
) -> HistogramMatcher:
    """Build a :class:`HistogramMatcher` mapping ``volume_or_sample``'s intensity distribution
    onto ``reference``'s (both sampled with bounded cost; arrays count as samples).

    Apply it per block: ``matcher(patch)`` gives float32 values in the reference's units.
    """
    ref = np.sort(sample_voxels(reference, sample, seed=seed).astype(np.float64))
    return match_to_reference(sample_voxels(volume_or_sample, sample, seed=seed), ref, n_quantiles)


def match_to_reference(src: np.ndarray, ref: np.ndarray, n_quantiles: int = 2001) -> HistogramMatcher:
    """The :class:`HistogramMatcher` of a source sample ``src`` onto a reference given by its
    sorted float64 sample ``ref`` (what a checkpoint keeps of its reference volume)."""
    if src.size == 0 or ref.size == 0:
        raise ValueError("histogram_match: empty sample")
    if src.dtype.type in _LUT_DTYPES:
        info = np.iinfo(src.dtype)
        offset = int(info.min)
        counts = np.bincount((src.astype(np.int64) - offset), minlength=int(info.max) - offset + 1)
        cdf = (np.cumsum(counts) - 0.5 * counts) / src.size  # mid-rank CDF, non-decreasing
        lut = np.quantile(ref, np.clip(cdf, 0.0, 1.0)).astype(np.float32)
        return HistogramMatcher(lut=lut, offset=offset)
    qs = np.linspace(0.0, 1.0, n_quantiles)
    src_q = np.quantile(src.astype(np.float64), qs)
    ref_q = np.quantile(ref, qs)
    return HistogramMatcher(src_quantiles=src_q, ref_quantiles=ref_q)


def intensity_transform(
    volume: VolumeLike,
    reference: VolumeLike | None = None,
    percentiles: Sequence[float] = (0.5, 99.5),
    sample: int = 1_000_000,
    seed: int = 0,
    scaling: str = "robust",
) -> Callable[[np.ndarray], np.ndarray]:
    """Per-block transform to about [0, 1] float32: robust-range normalisation of ``volume``,
    or, with a ``reference``, histogram matching onto it followed by the reference's range.

    ``scaling='divide255'`` maps [0, 255] to [0, 1] instead of the robust range (8-bit
    volumes only; with a reference, after matching onto it).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"intensity scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
    if scaling == "divide255":
        for v in (volume, reference):
            dtype = getattr(v, "dtype", None)
            if v is not None and dtype is not None and np.dtype(dtype) != np.uint8:
                raise ValueError(f"intensity scaling divide255 needs 8-bit volumes; "
                                 f"{getattr(v, 'path', 'the volume')} is {np.dtype(dtype)}")
    if reference is None:
        if scaling == "divide255":
            return IntensityNormalizer(0.0, 255.0)
        return IntensityNormalizer.from_volume(volume, percentiles, sample, seed)
    matcher = histogram_match(volume, reference, sample, seed=seed)
    if scaling == "divide255":
        return MatchedNormalizer(matcher, IntensityNormalizer(0.0, 255.0))
    norm = IntensityNormalizer.from_volume(reference, percentiles, sample, seed)
    return MatchedNormalizer(matcher, norm)


@dataclass(frozen=True)
class MatchedNormalizer:
    """Histogram matching onto a reference followed by the reference's normaliser (picklable)."""

    matcher: HistogramMatcher
    normalizer: IntensityNormalizer

    def __call__(self, block: np.ndarray) -> np.ndarray:
        return self.normalizer(self.matcher(block))

    @property
    def has_torch(self) -> bool:
        return self.matcher.has_torch

    def apply_torch(self, block: Any) -> Any:
        return self.normalizer.apply_torch(self.matcher.apply_torch(block))


def has_torch_transform(transform: Any) -> bool:
    """Whether ``transform`` can run on a torch tensor (``apply_torch``) with the same numbers,
    e.g. on the GPU next to the network."""
    return hasattr(transform, "apply_torch") and bool(getattr(transform, "has_torch", True))

"""The patch path: how CT voxels become what a network sees, one path for training, the
whole-volume sweep and the off-plane probe.

    open -> normalise -> resample -> quantise -> cut

- **open**: a lazily read :class:`~xpression.data.volume.Volume`.
- **normalise**: the run's intensity transform (``xpression.data.input_spec.IntensitySpec``:
  robust range, histogram matching to a reference, or /255) on the raw block, to float32 ~[0, 1].
  It comes before resampling because a histogram lookup table takes the volume's own integer
  levels; resampling raw levels first would have to round them back to integers.
- **resample** (:func:`read_slab`): a grid laid along the model's voxels. On the volume's own
  voxels (an axial grid at the volume's voxel size) it is a plain block read; otherwise the block
  is low-pass filtered (when the grid is coarser) and trilinearly sampled. This is the only
  resampler: training slabs, the probe and :class:`ResampledVolume` (the sweep at another voxel
  size) all read through it.
- **quantise** (:func:`quantise`, :func:`dequantise`): ``uint8`` levels ``round(255 x)`` or
  ``float16``, as the training cache holds them; :class:`Quantised` applies the same rounding to
  blocks the sweep reads, on the host or (``apply_torch``) on the GPU with the same numbers.
- **cut** (:func:`cut_patch`): a ``(D, H, W)`` box centred on a grid point.

A training patch and the sweep's patch at the same model-voxel grid point are then equal bit for
bit; tests/test_patch_path.py checks it per sampler and resampling case.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from xpression.data.geometry import Plane, SlabGrid, sample_frame
from xpression.data.intensity import has_torch_transform

__all__ = ["QUANTISATIONS", "Quantised", "ResampledVolume", "cut_patch", "dequantise", "image_to_float",
           "patches_inside", "quantise", "read_patches", "read_slab", "same_voxel_size", "slab_grid"]

# How normalised intensities are stored (the training cache) and rounded (the sweep, the probe).
QUANTISATIONS = ("uint8", "float16")
_LEVEL = np.float32(1.0 / 255.0)


def same_voxel_size(a: Sequence[float], b: Sequence[float], rtol: float = 1e-3) -> bool:
    """Whether two voxel sizes (um, z y x) are the same up to ``rtol`` (a model reads a volume
    of the same voxel size directly; any other is resampled)."""
    return bool(np.allclose(np.broadcast_to(np.asarray(a, float), (3,)), np.broadcast_to(np.asarray(b, float), (3,)), rtol=rtol))


def quantise(x: np.ndarray, dtype: str) -> np.ndarray:
    """Normalised float32 intensities as stored: ``uint8`` levels ``round(255 clip(x, 0, 1))``,
    ``float16``, or ``float32`` (unchanged)."""
    if dtype == "uint8":
        levels = np.clip(x, 0.0, 1.0)  # one float32 buffer for the steps below (same numbers)
        np.multiply(levels, np.float32(255.0), out=levels)
        return np.rint(levels, out=levels).astype(np.uint8)
    if dtype == "float16":
        return np.asarray(x, dtype=np.float16)
    if dtype == "float32":
        return np.asarray(x, dtype=np.float32)
    raise ValueError(f"quantisation must be one of {', '.join(QUANTISATIONS)} (or float32), got {dtype!r}")


def dequantise(stored: np.ndarray) -> np.ndarray:
    """Stored intensities back to float32 ``[0, 1]`` (``uint8`` level ``k`` -> ``k / 255``)."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) * _LEVEL
    return np.asarray(stored, dtype=np.float32)


def image_to_float(image: Any) -> Any:
    """:func:`dequantise` for torch tensors (loader batches), on the tensor's device; float32
    input is returned as is."""
    import torch

    if image.dtype == torch.uint8:
        return image.to(torch.float32).mul_(1.0 / 255.0)
    return image.to(torch.float32)


@dataclass(frozen=True)
class Quantised:
    """``transform`` (raw block -> float32 ~[0, 1]; None: the block is already normalised)
    followed by the rounding of a ``dtype`` cache, so the sweep's blocks equal training patches."""

    transform: Callable[[np.ndarray], np.ndarray] | None
    dtype: str = "uint8"

    def __post_init__(self) -> None:
        if self.dtype not in QUANTISATIONS + ("float32",):
            raise ValueError(f"quantisation must be one of {', '.join(QUANTISATIONS)} (or float32), got {self.dtype!r}")

    def __call__(self, block: np.ndarray) -> np.ndarray:
        x = np.asarray(block, dtype=np.float32) if self.transform is None else self.transform(block)
        return dequantise(quantise(x, self.dtype))

    @property
    def has_torch(self) -> bool:
        return self.transform is None or has_torch_transform(self.transform)

    def apply_torch(self, block: Any) -> Any:
        """The same numbers on a torch tensor (any device)."""
        import torch

        x = block.to(torch.float32) if self.transform is None else self.transform.apply_torch(block)  # type: ignore[union-attr]
        if self.dtype == "uint8":
            return x.clamp_(0.0, 1.0).mul_(255.0).round_().mul_(_LEVEL.item())
        if self.dtype == "float16":
            return x.to(torch.float16).to(torch.float32)
        return x

    def to_dict(self) -> dict:
        inner = {} if self.transform is None else (
            self.transform.to_dict() if hasattr(self.transform, "to_dict") else {"transform": repr(self.transform)})
        return {**inner, "quantised": self.dtype}


def _identity(block: np.ndarray) -> np.ndarray:
    return np.asarray(block, dtype=np.float32)


def _low_pass_sigma(grid: SlabGrid, voxel_size_um: np.ndarray, low_pass_um: Sequence[float] | None = None) -> np.ndarray:
    """Gaussian sigma per volume axis (voxels) before sampling ``grid``: ``sqrt(f^2 - 1) / 2`` for
    a grid step ``f`` times coarser than the voxels along that axis (the grid's axes projected on
    it, so a tilted grid counts its in-plane steps on z too); 0 where the grid is as fine.
    ``low_pass_um`` (per grid axis, um): filter as for a step this coarse where the grid is finer."""
    spacing = np.asarray(grid.spacing_um, float)
    if low_pass_um is not None:
        spacing = np.maximum(spacing, np.asarray(low_pass_um, float))
    steps = np.abs(grid.plane.axes) * spacing[:, None]  # (grid axis, volume axis)
    factor = steps.max(axis=0) / voxel_size_um
    return np.sqrt(np.clip(factor**2 - 1.0, 0.0, None)) / 2.0


def read_slab(volume: Any, grid: SlabGrid, transform: Callable[[np.ndarray], np.ndarray] | None = None,
              dtype: str = "float32", low_pass_um: Sequence[float] | None = None) -> np.ndarray:
    """``grid`` filled from ``volume`` (``voxel_size_um``, ``origin_um``, ``read_block``):
    intensities normalised by ``transform``, resampled, then stored as ``dtype`` (:func:`quantise`).
    ``low_pass_um`` (n, v, u um): low-pass filter as for a grid this coarse (a context view that
    keeps every k-th grid point, :mod:`xpression.data.context`); None = the grid's own spacing.

    A grid on the volume's own voxels (axial, the volume's voxel size, on its voxel lattice) is a
    plain block read. Anything else reads the one block it needs, with a margin wide enough that
    the low-pass filter never sees the block's edge (so every grid point's value is the same
    whatever block it was read in), filters it where the grid is coarser than the voxels, and
    samples it trilinearly.
    """
    vs = np.asarray(volume.voxel_size_um, dtype=float)
    vorigin = np.asarray(getattr(volume, "origin_um", (0.0, 0.0, 0.0)), dtype=float)
    origin = grid.world(np.zeros((1, 3)))[0]
    start_f = (origin - vorigin) / vs
    transform = transform or _identity
    sigma = _low_pass_sigma(grid, vs, low_pass_um)
    filtered = np.any(sigma > 0.1)
    aligned = (
        not filtered
        and grid.plane.is_axial
        and np.allclose(grid.spacing_um, vs, rtol=1e-6)
        and np.allclose(start_f, np.rint(start_f), atol=1e-4)
    )
    if aligned:
        start = np.rint(start_f).astype(np.int64)
        return quantise(transform(volume.read_block(start, start + np.asarray(grid.shape))), dtype)
    margin = 2 + (np.asarray([int(4.0 * s + 0.5) for s in sigma]) if filtered else 0)  # scipy's truncate=4 radius
    far = np.asarray(grid.shape, dtype=float) - 1
    corners = np.array([[a, b, c] for a in (0, far[0]) for b in (0, far[1]) for c in (0, far[2])])
    vox = (grid.world(corners) - vorigin) / vs
    lo = np.floor(vox.min(axis=0)).astype(np.int64) - margin
    hi = np.ceil(vox.max(axis=0)).astype(np.int64) + margin + 1
    block = transform(volume.read_block(lo, hi))
    if filtered:
        block = ndimage.gaussian_filter(block, sigma=sigma, mode="nearest")
    lattice = _lattice_start(grid, origin, vorigin)
    if lattice is not None:
        data = _sample_lattice(block, lo, lattice, np.asarray(grid.spacing_um, float) / vs, grid.shape)
    else:
        data = sample_frame(block, lo, vs, origin, grid.plane.axes, grid.spacing_um, grid.shape, volume_origin_um=vorigin)
    return quantise(data, dtype)


def _lattice_start(grid: SlabGrid, origin_um: np.ndarray, volume_origin_um: np.ndarray) -> np.ndarray | None:
    """For an axial grid on the model lattice (``volume origin + n * spacing``), the lattice index
    of its first point (z, y, x); else None."""
    if not grid.plane.is_axial or not np.allclose(grid.plane.axes, np.eye(3), atol=1e-12):
        return None
    n = (origin_um - volume_origin_um) / np.asarray(grid.spacing_um, float)
    return np.rint(n) if np.allclose(n, np.rint(n), atol=1e-6) else None


def _sample_lattice(block: np.ndarray, block_start: np.ndarray, lattice_start: np.ndarray, ratio: np.ndarray,
                    shape: Sequence[int]) -> np.ndarray:
    """Trilinear samples of ``block`` at model-lattice points ``lattice_start + (i, j, k)``: the
    source coordinate of lattice point ``n`` is ``n * ratio`` (model / source voxel size), the
    same number whichever block it is read from, so every read of a point gives the same value.

    On a lattice, trilinear interpolation is separable: each output depth plane blends two source
    planes, then rows, then columns (float64, as ``ndimage.map_coordinates(order=1)``, whose
    numbers it gives to within one float32 unit, 4-7x faster). Planes are spread over
    :func:`_threads` threads (numpy's loops release the GIL; each plane's numbers are its own)."""
    src = np.asarray(block, dtype=np.float32)
    coords = [(lattice_start[a] + np.arange(int(shape[a]))) * ratio[a] - block_start[a] for a in range(3)]
    if any(c.size and (c.min() < 0 or c.max() > n - 1) for c, n in zip(coords, src.shape)):
        raise ValueError(f"lattice points outside the block read for them ({list(src.shape)} voxels)")
    (z0, z1, tz), (y0, y1, ty), (x0, x1, tx) = (_linear_weights(c, n) for c, n in zip(coords, src.shape))
    ty, tx = ty[:, None], tx[None, :]
    out = np.empty(tuple(int(n) for n in shape), dtype=np.float32)

    def plane(i: int) -> None:
        p = src[z0[i]].astype(np.float64)
        if tz[i]:
            p = p * (1.0 - tz[i]) + src[z1[i]] * tz[i]
        rows = p[y0] * (1.0 - ty) + p[y1] * ty
        out[i] = rows[:, x0] * (1.0 - tx) + rows[:, x1] * tx

    threads = min(_threads(), len(out))
    if threads <= 1:
        for i in range(len(out)):
            plane(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(plane, range(len(out))))
    return out


def _linear_weights(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For source coordinates in ``[0, n - 1]`` along one axis: the lower and upper neighbour and
    the upper one's weight (the upper neighbour clamped at the last voxel, where its weight is 0)."""
    lower = np.floor(coords).astype(np.intp)
    return lower, np.minimum(lower + 1, n - 1), coords - lower


def _threads() -> int:
    """CPU threads for work split by hand: torch's setting (1 in loader workers)."""
    import torch

    return max(int(torch.get_num_threads()), 1)


def slab_grid(plane: Plane, volume: Any, uv_um: np.ndarray, patch_shape: Sequence[int],
              voxel_size_um: Sequence[float], margin_um: float | Sequence[float] = 0.0) -> SlabGrid:
    """The grid of model voxels (``voxel_size_um``) around patches centred at ``uv_um`` on
    ``plane``. An axial plane is moved to the nearest plane of the model's voxel lattice (the
    volume's origin plus whole model voxels), and in-plane points sit on that lattice too, so the
    grid's points are points the sweep predicts; at the volume's own voxel size the slab is then a
    plain block read."""
    spacing = np.asarray(voxel_size_um, float)
    origin = np.asarray(getattr(volume, "origin_um", (0.0, 0.0, 0.0)), float)
    anchor = (0.0, 0.0)
    if plane.is_axial:
        k = np.rint((plane.origin[0] - origin[0]) / spacing[0])
        plane, anchor = Plane.axial(origin[0] + k * spacing[0]), (origin[2], origin[1])
    return SlabGrid.around(plane, uv_um, patch_shape, spacing, margin_um, anchor)


def cut_patch(slab: np.ndarray, grid: SlabGrid, h: int, w: int, patch_shape: Sequence[int]) -> np.ndarray:
    """The ``patch_shape`` box of ``slab`` centred on grid point ``(grid.centre_d, h, w)`` (a view)."""
    hd, hh, hw = (int(p) // 2 for p in patch_shape)
    c = grid.centre_d
    return slab[c - hd : c + hd + 1, h - hh : h + hh + 1, w - hw : w + hw + 1]


def patches_inside(volume: Any, grid: SlabGrid, hw: np.ndarray, patch_shape: Sequence[int]) -> np.ndarray:
    """Whether each patch centred on grid point ``(grid.centre_d, h, w)`` lies inside ``volume``
    (its outermost voxel centres within the volume's), ``(N,)`` bool."""
    corners = grid.patch_corners(hw, patch_shape).reshape(-1, 3)
    vox = ((corners - np.asarray(getattr(volume, "origin_um", (0.0, 0.0, 0.0)))) / np.asarray(volume.voxel_size_um)).reshape(-1, 8, 3)
    hi = np.asarray(volume.shape, float) - 1
    return np.all((vox >= -1e-6) & (vox <= hi + 1e-6), axis=(1, 2))


def read_patches(volume: Any, plane: Plane, uv_um: np.ndarray, patch_shape: Sequence[int],
                 voxel_size_um: Sequence[float], transform: Callable[[np.ndarray], np.ndarray] | None,
                 dtype: str, stored: bool = False) -> np.ndarray:
    """``(N, D, H, W)`` float32 patches centred on the grid points nearest in-plane points
    ``uv_um`` of ``plane``, read as training reads them (:func:`slab_grid`, :func:`read_slab`,
    ``dtype`` rounding, :func:`cut_patch`). ``stored``: as the cache holds them instead (``dtype``:
    uint8 levels are a quarter of float32's memory; :func:`dequantise` gives the float32 patches).
    Raises ``ValueError`` when a patch leaves the volume."""
    uv = np.asarray(uv_um, float).reshape(-1, 2)
    grid = slab_grid(plane, volume, uv, patch_shape, voxel_size_um)
    hw = grid.index_of(uv)
    if not patches_inside(volume, grid, hw, patch_shape).all():
        raise ValueError(f"a patch of {list(patch_shape)} voxels leaves the volume {getattr(volume, 'path', '')} "
                         f"near plane {np.round(plane.origin, 1).tolist()} um")
    slab = read_slab(volume, grid, transform, dtype)
    out = np.empty((len(hw), *(int(p) for p in patch_shape)), slab.dtype if stored else np.float32)
    for i, (h, w) in enumerate(hw):
        out[i] = cut_patch(slab, grid, h, w, patch_shape)  # uint8 levels or float32: exact in float32
    if stored or slab.dtype != np.uint8:
        return out
    return np.multiply(out, _LEVEL, out=out)  # dequantise, all at once


class ResampledVolume:
    """``volume`` as the model sees it at another voxel size: normalised by ``transform`` and
    resampled (:func:`read_slab`, low-pass filtered for ``low_pass_um`` if given) on the lattice
    ``origin_um + i * voxel_size_um`` (z, y, x), same physical frame. ``read_block`` returns float32 normalised intensities (not quantised: the
    sweep's :class:`Quantised` does that, as for a volume read at its own voxel size)."""

    def __init__(self, volume: Any, voxel_size_um: Sequence[float], transform: Callable[[np.ndarray], np.ndarray] | None,
                 low_pass_um: Sequence[float] | None = None):
        self.source = volume
        self.transform = transform
        self.low_pass_um = low_pass_um
        self.voxel_size_um = tuple(float(v) for v in np.broadcast_to(np.asarray(voxel_size_um, float), (3,)))
        self.origin_um = tuple(float(o) for o in getattr(volume, "origin_um", (0.0, 0.0, 0.0)))
        ratio = np.asarray(self.voxel_size_um) / np.asarray(volume.voxel_size_um)
        self.shape = tuple(int(np.floor((n - 1) / r + 1e-9)) + 1 for n, r in zip(volume.shape, ratio))
        self.chunks = tuple(max(1, int(round(c / r))) for c, r in zip(getattr(volume, "chunks", self.shape), ratio))
        self.dtype = np.dtype(np.float32)
        self.path = getattr(volume, "path", None)

    def read_block(self, start_vox: Sequence[int], stop_vox: Sequence[int], fill: float = 0,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Normalised float32 model voxels ``[start, stop)`` per axis (z, y, x); outside the
        source volume its raw ``fill`` value, normalised."""
        start = np.asarray(start_vox, np.int64)
        stop = np.asarray(stop_vox, np.int64)
        vs = np.asarray(self.voxel_size_um)
        corner = np.asarray(self.origin_um) + start * vs
        grid = SlabGrid(Plane.axial(float(corner[0])), self.voxel_size_um, (float(corner[2]), float(corner[1])),
                        tuple(int(n) for n in stop - start), 0)  # type: ignore[arg-type]
        source = _Filled(self.source, fill) if fill != 0 else self.source
        data = read_slab(source, grid, self.transform, low_pass_um=self.low_pass_um)
        if out is None:
            return data
        out[...] = data
        return out

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


class _Filled:
    """A volume whose reads outside it give ``fill``."""

    def __init__(self, volume: Any, fill: float):
        self.volume, self.fill = volume, fill
        self.voxel_size_um, self.origin_um = volume.voxel_size_um, getattr(volume, "origin_um", (0.0, 0.0, 0.0))

    def read_block(self, start: Any, stop: Any) -> np.ndarray:
        return self.volume.read_block(start, stop, fill=self.fill)

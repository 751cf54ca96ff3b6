"""The context view of a multi-scale model: a wide, coarse view centred where the patch is.

The fine patch is ``(D, H, W)`` model voxels. The context view has the same shape but takes every
``stride``-th model voxel along each axis, from the volume low-pass filtered for that step
(:func:`~xpression.data.patches.read_slab` with ``low_pass_um``), so it covers about ``size_um``
(z, y, x) around the same centre voxel. Its points are model-lattice points, so a training view
(cut from a filtered slab of the section) and the probe's or the sweep's view at the same point are
equal bit for bit, like the fine patch; tests/test_context_view.py checks it.

The view may reach past the volume, the same way in training and inference, so no spot is dropped
for its context. What it sees there is ``edges``: ``"mirror"`` (the default) reads the volume
reflected at its faces (:class:`MirroredVolume`: a scan cut from a larger organ continues past its
faces; a view of air stays air), ``"fill"`` the volume's fill value (raw 0, normalised), which a
model reads as air above cut tissue and which shifted the multi-scale maps of the grid planes
within 45 um of a volume's z faces. Checkpoints written before ``edges`` existed read ``"fill"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from xpression.data.geometry import Plane, SlabGrid
from xpression.data.patches import dequantise, read_slab, slab_grid

__all__ = ["CONTEXT_EDGES", "ContextView", "MirroredVolume", "context_block_shape"]

CONTEXT_EDGES = ("mirror", "fill")


def context_block_shape(shape: Sequence[int], patch_shape: Sequence[int], stride: Sequence[int]) -> tuple[int, int, int]:
    """Voxels (per axis) of the context block holding the views of every patch inside a block of
    ``shape`` voxels: ``shape - P + span``, ``span = (P - 1) * stride + 1`` the view's extent."""
    return tuple(int(s) - int(p) + (int(p) - 1) * int(k) + 1 for s, p, k in zip(shape, patch_shape, stride))  # type: ignore[return-value]


class MirroredVolume:
    """``volume`` (``shape``, ``read_block``) reflected at its faces: voxel ``-1`` reads voxel 0,
    ``n`` reads ``n - 1`` (numpy's ``symmetric`` padding, repeated as far as asked). Every other
    attribute is the volume's."""

    def __init__(self, volume: Any) -> None:
        self.volume = volume

    def __getattr__(self, name: str) -> Any:
        return getattr(self.volume, name)

    def __getitem__(self, key: Any) -> Any:  # intensity statistics read the volume itself
        return self.volume[key]

    def read_block(self, start_vox: Sequence[int], stop_vox: Sequence[int], fill: float = 0,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Voxels ``[start, stop)`` per axis (z, y, x), reflected past the faces (``fill`` unused)."""
        start = [int(a) for a in start_vox]
        stop = [int(b) for b in stop_vox]
        shape = [int(n) for n in self.volume.shape]
        if all(0 <= a and b <= n for a, b, n in zip(start, stop, shape)):
            return self.volume.read_block(start, stop, out=out)
        lo = [min(max(a, 0), n) for a, n in zip(start, shape)]
        hi = [max(min(b, n), 0) for b, n in zip(stop, shape)]
        pads = [(l - a, b - h) for a, b, l, h in zip(start, stop, lo, hi)]
        if all(h - l > 0 and max(p) <= h - l for l, h, p in zip(lo, hi, pads)):
            # one reflection per face, within what is read: numpy pads it (no index arrays)
            block = np.pad(self.volume.read_block(lo, hi), pads, mode="symmetric")
        else:
            index = []
            for a, b, n in zip(start, stop, shape):
                i = np.mod(np.arange(a, b), 2 * n)
                index.append(np.where(i < n, i, 2 * n - 1 - i))
            first = [int(i.min()) if i.size else 0 for i in index]
            last = [int(i.max()) + 1 if i.size else 0 for i in index]
            block = self.volume.read_block(first, last)[np.ix_(*(i - o for i, o in zip(index, first)))]
        if out is None:
            return block
        out[...] = block
        return out


@dataclass(frozen=True)
class ContextView:
    """``size_um``: the requested field of view (z, y, x) um; ``patch_shape``: the fine patch
    (D, H, W) voxels, which the view shares; ``voxel_size_um``: the model voxel size (z, y, x);
    ``edges``: what the view sees past the volume's faces, ``"mirror"`` or ``"fill"`` (module doc)."""

    size_um: tuple[float, float, float]
    patch_shape: tuple[int, int, int]
    voxel_size_um: tuple[float, float, float]
    edges: str = "mirror"

    def __post_init__(self) -> None:
        if self.edges not in CONTEXT_EDGES:
            raise ValueError(f"patch.context_edges must be one of {', '.join(CONTEXT_EDGES)}, got {self.edges!r}")

    @classmethod
    def of(cls, size_um: Sequence[float], patch_size_um: Sequence[float], patch_shape: Sequence[int],
           voxel_size_um: Sequence[float], key: str = "patch.context_um", edges: str = "mirror") -> "ContextView":
        """The view of ``size_um`` around a ``patch_size_um`` patch; ``ValueError`` naming ``key``
        when it is not 3 positive numbers or is smaller than the patch along an axis."""
        size = np.asarray(size_um, float).ravel()
        if size.shape != (3,) or not np.all(np.isfinite(size)) or np.any(size <= 0):
            raise ValueError(f"{key} must be 3 positive numbers [z, y, x] in um, got {list(np.ravel(size_um))}")
        patch = np.broadcast_to(np.asarray(patch_size_um, float), (3,))
        small = [a for a, s, p in zip("zyx", size, patch) if s < p - 1e-6]
        if small:
            raise ValueError(f"{key} {size.tolist()} um is smaller than the patch {patch.tolist()} um along "
                             f"{', '.join(small)}; the context view must be at least as large as the patch")
        return cls(tuple(float(s) for s in size), tuple(int(n) for n in patch_shape),  # type: ignore[arg-type]
                   tuple(float(v) for v in np.broadcast_to(np.asarray(voxel_size_um, float), (3,))), str(edges))  # type: ignore[arg-type]

    @property
    def stride(self) -> tuple[int, int, int]:
        """Model voxels between neighbouring context voxels (z, y, x): the whole step nearest to
        ``size_um / (patch_shape x voxel_size_um)``, at least 1."""
        return tuple(max(1, int(round(s / (n * v)))) for s, n, v in zip(self.size_um, self.patch_shape, self.voxel_size_um))  # type: ignore[return-value]

    @property
    def step_um(self) -> tuple[float, float, float]:
        """The context view's voxel size (z, y, x) um."""
        return tuple(k * v for k, v in zip(self.stride, self.voxel_size_um))  # type: ignore[return-value]

    @property
    def extent_um(self) -> tuple[float, float, float]:
        """The field of view the context voxels actually cover (z, y, x) um."""
        return tuple(n * s for n, s in zip(self.patch_shape, self.step_um))  # type: ignore[return-value]

    @property
    def span_shape(self) -> tuple[int, int, int]:
        """Model voxels from the view's first voxel to its last, inclusive (D, H, W)."""
        return tuple((n - 1) * k + 1 for n, k in zip(self.patch_shape, self.stride))  # type: ignore[return-value]

    def grid(self, plane: Plane, volume: Any, uv_um: np.ndarray, margin_um: float | Sequence[float] = 0.0) -> SlabGrid:
        """The model-voxel grid holding the views centred at ``uv_um`` on ``plane`` (the fine
        patches' :func:`~xpression.data.patches.slab_grid`, as wide as the view)."""
        return slab_grid(plane, volume, uv_um, self.span_shape, self.voxel_size_um, margin_um)

    def source(self, volume: Any) -> Any:
        """``volume`` as the view reads it past its faces (:class:`MirroredVolume` or itself)."""
        return MirroredVolume(volume) if self.edges == "mirror" else volume

    def read_slab(self, volume: Any, grid: SlabGrid, transform: Callable[[np.ndarray], np.ndarray] | None,
                  dtype: str) -> np.ndarray:
        """``grid`` from ``volume``, normalised, low-pass filtered for the view's step, stored as ``dtype``."""
        return read_slab(self.source(volume), grid, transform, dtype, low_pass_um=self.step_um)

    def window(self, block: Any, centre: Sequence[int]) -> Any:
        """The ``patch_shape`` view of ``block`` (an array or tensor) centred on its voxel
        ``centre`` (d, h, w), every ``stride``-th voxel (a view, not a copy)."""
        c = np.asarray(centre, dtype=np.int64) - np.asarray(self.span_shape) // 2
        return block[tuple(slice(int(a), int(a) + (n - 1) * k + 1, k) for a, n, k in zip(c, self.patch_shape, self.stride))]

    def cut(self, slab: np.ndarray, grid: SlabGrid, h: int, w: int) -> np.ndarray:
        """The view of ``slab`` centred on grid point ``(grid.centre_d, h, w)`` (:meth:`window`)."""
        return self.window(slab, (grid.centre_d, h, w))

    def read(self, volume: Any, plane: Plane, uv_um: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None,
             dtype: str) -> np.ndarray:
        """``(N, D, H, W)`` float32 views centred on the model-lattice points nearest ``uv_um``
        (the fine patches' centres), read as training reads them."""
        uv = np.asarray(uv_um, float).reshape(-1, 2)
        grid = self.grid(plane, volume, uv)
        slab = self.read_slab(volume, grid, transform, dtype)
        return np.stack([dequantise(self.cut(slab, grid, h, w)) for h, w in grid.index_of(uv)])

    def to_dict(self) -> dict:
        """What the checkpoint's input spec records beside ``size_um`` (for readers and logs)."""
        return {"size_um": list(self.size_um), "stride": list(self.stride), "step_um": list(self.step_um),
                "extent_um": list(self.extent_um), "edges": self.edges}

"""The output grid of a sweep and its tiling, in voxels of the volume being swept.

Grid point ``(i, j, k)`` sits on voxel ``origin_vox + (i, j, k) * step_vox`` (z, y, x), i.e. at
``volume_origin_um + voxel index * voxel_size_um`` in um (voxel centres, docs/design.md). The
patch answering a grid point is centred on that voxel: it spans voxels
``[c - P // 2, c - P // 2 + P)`` per axis for a patch of ``P`` voxels (patch sizes are odd, so
``c`` is the middle voxel).

A :class:`Tiling` cuts the grid into boxes of ``tile_shape`` grid points; the last box per
axis may be smaller. Tiles are the unit of compute, of storage (one output chunk each), of
resumption and of sharding.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np

__all__ = ["GridError", "OutputGrid", "Tile", "Tiling", "make_grid", "PAPER_SPACING_UM", "choose_tile_shape"]

# The original study: every 21st slice and every 16th pixel in-plane at 1.6 um voxels.
PAPER_SPACING_UM = (33.6, 25.6, 25.6)

Triple = tuple[int, int, int]


class GridError(ValueError):
    """An output grid that the model or the volume cannot produce."""


@dataclass(frozen=True)
class OutputGrid:
    """A regular grid of output points over a volume (all indices ``(z, y, x)``).

    ``origin_vox``: voxel of grid point 0; ``step_vox``: voxels between grid points;
    ``shape``: grid points per axis; ``voxel_size_um``: the volume's voxel size (um);
    ``volume_origin_um``: physical centre of the volume's voxel 0 (um).
    """

    origin_vox: Triple
    step_vox: Triple
    shape: Triple
    voxel_size_um: tuple[float, float, float]
    volume_origin_um: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def spacing_um(self) -> tuple[float, float, float]:
        """Distance between neighbouring grid points per axis (um)."""
        return tuple(float(s * v) for s, v in zip(self.step_vox, self.voxel_size_um))  # type: ignore[return-value]

    @property
    def origin_um(self) -> tuple[float, float, float]:
        """Physical position of grid point 0 (um)."""
        return tuple(float(o + i * v) for o, i, v in zip(self.volume_origin_um, self.origin_vox, self.voxel_size_um))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def centres_vox(self, axis: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Voxel indices along ``axis`` of grid points ``start .. stop``."""
        stop = self.shape[axis] if stop is None else stop
        return self.origin_vox[axis] + np.arange(start, stop, dtype=np.int64) * self.step_vox[axis]

    def axis_um(self, axis: int) -> np.ndarray:
        """Physical coordinates (um) of all grid points along ``axis``."""
        return self.origin_um[axis] + np.arange(self.shape[axis]) * self.spacing_um[axis]

    def points_um(self, start: Sequence[int] = (0, 0, 0), stop: Sequence[int] | None = None) -> np.ndarray:
        """Physical positions ``(N, 3)`` in um of the grid points in the box ``[start, stop)``,
        in C order of ``(z, y, x)``."""
        stop = self.shape if stop is None else stop
        axes = [self.origin_um[a] + np.arange(start[a], stop[a]) * self.spacing_um[a] for a in range(3)]
        zz, yy, xx = np.meshgrid(*axes, indexing="ij")
        return np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)

    def index_of_um(self, value_um: float, axis: int) -> int:
        """Nearest grid index along ``axis`` to the physical coordinate ``value_um``, clipped."""
        i = int(round((value_um - self.origin_um[axis]) / self.spacing_um[axis]))
        return int(np.clip(i, 0, self.shape[axis] - 1))

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "OutputGrid":
        return cls(
            origin_vox=tuple(int(v) for v in d["origin_vox"]),  # type: ignore[arg-type]
            step_vox=tuple(int(v) for v in d["step_vox"]),  # type: ignore[arg-type]
            shape=tuple(int(v) for v in d["shape"]),  # type: ignore[arg-type]
            voxel_size_um=tuple(float(v) for v in d["voxel_size_um"]),  # type: ignore[arg-type]
            volume_origin_um=tuple(float(v) for v in d.get("volume_origin_um", (0, 0, 0))),  # type: ignore[arg-type]
        )


def make_grid(
    volume_shape: Sequence[int],
    voxel_size_um: Sequence[float],
    spacing_um: Sequence[float] | float = PAPER_SPACING_UM,
    multiple_of: Sequence[int] = (1, 1, 1),
    anchor_um: Sequence[float | None] | None = None,
    volume_origin_um: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[OutputGrid, list[str]]:
    """Lay a regular grid over a volume; returns the grid and notes on every rounding made.

    ``spacing_um``: wanted distance between output points per axis (um), a scalar or (z, y, x).
    It is rounded to a whole number of voxels that is a multiple of ``multiple_of`` (the
    model's output stride along axes it sweeps densely, 1 elsewhere). A spacing below one
    such multiple raises :class:`GridError`. ``anchor_um``: per axis a coordinate (um) that a
    grid plane must pass through (e.g. the trained section's ``z``) or ``None`` to centre the
    grid in the volume.
    """
    shape = np.asarray(volume_shape, dtype=np.int64)
    vox = np.asarray(voxel_size_um, dtype=float)
    want = np.broadcast_to(np.asarray(spacing_um, dtype=float), (3,))
    mult = np.asarray(multiple_of, dtype=np.int64)
    anchor = [None, None, None] if anchor_um is None else list(anchor_um)
    notes: list[str] = []
    origin, step, n = [], [], []
    for a, name in enumerate("zyx"):
        ideal = want[a] / vox[a]
        # Below one voxel rounds up with a note; below one output stride (dense axes) is an error.
        coarsest_error = 0.5 if mult[a] == 1 else mult[a] * (1 - 1e-6)
        if ideal < coarsest_error:
            finest = mult[a] * vox[a]
            raise GridError(
                f"grid spacing {want[a]:g} um along {name} is finer than the model can produce: one value "
                f"every {mult[a]} voxel(s) = {finest:g} um at {vox[a]:g} um voxels; use spacing >= {finest:g} um"
                + (" or mode=patch" if mult[a] > 1 else "")
            )
        s = int(max(1, round(ideal / mult[a])) * mult[a])
        if abs(s * vox[a] - want[a]) > 1e-6 * max(1.0, want[a]):
            notes.append(
                f"{name}: spacing {want[a]:g} um -> {s * vox[a]:g} um ({s} voxels of {vox[a]:g} um"
                + (f", a multiple of the output stride {mult[a]}" if mult[a] > 1 else "")
                + ")"
            )
        count = int((shape[a] - 1) // s + 1)
        if anchor[a] is None:
            o = int((shape[a] - 1 - (count - 1) * s) // 2)
        else:
            c = int(round((float(anchor[a]) - float(volume_origin_um[a])) / vox[a]))
            o = c % s
            count = int((shape[a] - 1 - o) // s + 1) if o < shape[a] else 0
        origin.append(o)
        step.append(s)
        n.append(count)
    if min(n) < 1:
        raise GridError(f"the grid over a volume of {tuple(shape.tolist())} voxels is empty")
    grid = OutputGrid(
        tuple(origin), tuple(step), tuple(n),  # type: ignore[arg-type]
        tuple(float(v) for v in vox), tuple(float(o) for o in volume_origin_um),  # type: ignore[arg-type]
    )
    return grid, notes


@dataclass(frozen=True)
class Tile:
    """Grid points ``[start, stop)`` (z, y, x grid indices); ``index`` in its :class:`Tiling`."""

    index: int
    start: Triple
    stop: Triple

    @property
    def shape(self) -> Triple:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]


@dataclass(frozen=True)
class Tiling:
    """Boxes of ``tile_shape`` grid points covering a grid of ``grid_shape``, in C order."""

    grid_shape: Triple
    tile_shape: Triple

    @property
    def counts(self) -> Triple:
        return tuple(math.ceil(g / t) for g, t in zip(self.grid_shape, self.tile_shape))  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(np.prod(self.counts))

    def tile(self, index: int) -> Tile:
        if not 0 <= index < len(self):
            raise IndexError(f"tile {index} out of range ({len(self)} tiles)")
        pos = np.unravel_index(index, self.counts)
        start = tuple(int(p * t) for p, t in zip(pos, self.tile_shape))
        stop = tuple(min(s + t, g) for s, t, g in zip(start, self.tile_shape, self.grid_shape))
        return Tile(int(index), start, stop)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Tile]:
        return (self.tile(i) for i in range(len(self)))

    def positions(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(range(c) for c in self.counts))


def choose_tile_shape(
    grid: OutputGrid,
    tile_vox: Sequence[int],
    chunks: Sequence[int] | None = None,
) -> Triple:
    """Grid points per tile for tiles of about ``tile_vox`` voxels (z, y, x).

    Where the grid step allows, the tile's extent in voxels is made a multiple of the
    volume's storage ``chunks`` so the reads of neighbouring tiles share few chunks.
    """
    out = []
    for a in range(3):
        step = grid.step_vox[a]
        n = max(1, int(round(tile_vox[a] / step)))
        if chunks is not None and chunks[a] > 1:
            period = math.lcm(step, int(chunks[a])) // step  # grid points per aligned unit
            if period <= n:
                n = max(period, (n // period) * period)
        out.append(min(n, grid.shape[a]))
    return tuple(out)  # type: ignore[return-value]

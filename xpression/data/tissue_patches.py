"""Unlabelled CT patches at random points inside a volume's tissue mask, for self-supervised
pretraining (``xpression.pretrain``): no section, no label, every volume of a cohort.

Points are drawn on axial planes of the model's voxel lattice (one slab read per plane), at
random tissue voxels of the mask (:func:`~xpression.data.mask.tissue_mask`) with a uniform
offset inside the mask voxel; each patch is then read through the one patch path
(:func:`~xpression.data.patches.read_patches`: normalise, resample, quantise, cut), so a
pretraining patch is what training and the sweep would read at that point.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from xpression.data.geometry import Plane
from xpression.data.mask import TissueMask
from xpression.data.patches import patches_inside, read_patches, slab_grid

__all__ = ["tissue_patches"]


def tissue_patches(volume: Any, mask: TissueMask, n: int, patch_shape: Sequence[int],
                   voxel_size_um: Sequence[float], transform: Callable[[np.ndarray], np.ndarray] | None,
                   dtype: str, rng: np.random.Generator, n_planes: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``(n, D, H, W)`` patches of ``volume`` stored as ``dtype`` (``uint8`` levels or ``float16``)
    at random points inside ``mask``'s tissue, spread over up to ``n_planes`` axial planes, and
    the ``(n, 3)`` points drawn (z, y, x um): patch ``i`` is ``read_patches`` on the axial plane
    ``z = points[i, 0]`` at ``(x, y)`` (the grid point nearest it on the model's lattice).

    ``patch_shape``: voxels at the model's ``voxel_size_um`` (z, y, x um). Only points whose whole
    patch lies inside the volume are kept. Raises ``ValueError`` when no tissue point has room for
    a patch (a volume thinner than the patch, or a mask with no tissue away from the border).
    """
    vs = np.asarray(voxel_size_um, float)
    tissue = np.argwhere(mask.mask)
    if not len(tissue):
        raise ValueError(f"the tissue mask of {getattr(volume, 'path', 'the volume')} is empty")
    mvs, morigin = np.asarray(mask.voxel_size_um), np.asarray(mask.origin_um)
    out: list[np.ndarray] = []
    points: list[np.ndarray] = []
    want = int(n)
    per_plane = max(1, -(-want // int(n_planes)))
    for _ in range(4 * int(n_planes)):
        if sum(len(p) for p in out) >= want:
            break
        # a plane through a random tissue voxel, then points among that mask slice's tissue voxels
        k = tissue[rng.integers(len(tissue))][0]
        z_um = morigin[0] + (k + rng.uniform(-0.5, 0.5)) * mvs[0]
        in_slice = tissue[tissue[:, 0] == k]
        pick = in_slice[rng.integers(len(in_slice), size=2 * per_plane)]
        yx = morigin[1:] + (pick[:, 1:] + rng.uniform(-0.5, 0.5, size=(len(pick), 2))) * mvs[1:]
        uv = yx[:, ::-1]  # an axial plane's u is x, v is y
        plane = Plane.axial(float(z_um))
        grid = slab_grid(plane, volume, uv, patch_shape, vs)
        inside = patches_inside(volume, grid, grid.index_of(uv), patch_shape)
        uv = uv[inside][:per_plane]
        if len(uv):
            out.append(read_patches(volume, plane, uv, patch_shape, vs, transform, dtype, stored=True))
            points.append(np.column_stack([np.full(len(uv), z_um), uv[:, 1], uv[:, 0]]))
    if not out:
        raise ValueError(f"no tissue point of {getattr(volume, 'path', 'the volume')} has room for a patch of "
                         f"{list(patch_shape)} voxels at {vs.tolist()} um")
    keep = rng.permutation(sum(len(p) for p in out))[:want]
    return np.concatenate(out)[keep], np.concatenate(points)[keep]

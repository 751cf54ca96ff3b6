"""The pretraining patches: every volume of a cohort (or the ones named), no labels.

Each volume is normalised as a training run would normalise it (the data config's ``intensity``
and ``intensity_reference``), its tissue mask computed (or read from its cache), and a fixed pool
of patches drawn inside the mask (:func:`xpression.data.tissue_patches.tissue_patches`), held as
the training cache holds patches (``uint8`` levels or ``float16``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from xpression.data.geometry import DataError, PatchGeometry
from xpression.data.input_spec import IntensitySpec, resolve_reference
from xpression.data.manifest import Cohort, load_manifest
from xpression.data.mask import tissue_mask
from xpression.data.placement import check_patch_fits
from xpression.data.tissue_patches import tissue_patches
from xpression.data.volume import Volume, VolumeError, open_volume

__all__ = ["PretrainData", "open_cohort_volumes", "draw_pool"]

log = logging.getLogger(__name__)


@dataclass
class PretrainData:
    """The opened volumes and the patch geometry, checked before any voxel is read."""

    cohort: Cohort
    volumes: dict[str, Volume]
    voxel_size_um: tuple[float, float, float]
    patch_shape: tuple[int, int, int]
    patch_size_um: tuple[float, float, float]
    intensity: IntensitySpec

    def describe(self) -> dict:
        """What an encoder checkpoint records about its data."""
        return {"manifest": str(self.cohort.path), "volumes": list(self.volumes), "voxel_size_um": list(self.voxel_size_um),
                "patch_size_um": list(self.patch_size_um), "intensity": self.intensity.describe()}


def open_cohort_volumes(manifest: str | Path, volume_ids: Sequence[str] | None, patch_size_um: Sequence[float],
                        voxel_size_um: Any, intensity: str = "robust", intensity_reference: str | None = None,
                        seed: int = 0) -> PretrainData:
    """Open the cohort's volumes (all, or ``volume_ids``) and fix the patch: ``patch_size_um``
    (depth, height, width) at ``voxel_size_um`` (null: the first volume's), as the data module
    does. Bad ids, unreadable volumes and a patch larger than a volume fail here, in one line."""
    cohort = load_manifest(manifest)
    ids = [v.id for v in cohort.volumes]
    if volume_ids is not None:
        unknown = sorted(set(volume_ids) - set(ids))
        if unknown:
            raise DataError(cohort.path, f"unknown volume ids {unknown}; volumes: {ids}")
        ids = [i for i in ids if i in set(volume_ids)]
    if not ids:
        raise DataError(cohort.path, "no volumes to pretrain on")
    volumes = {}
    for vid in ids:
        entry = cohort.volume(vid)
        try:
            volumes[vid] = open_volume(entry.image, entry.voxel_size_um)
        except VolumeError as err:
            raise DataError(err.path or entry.image, err.problem) from err
    first = volumes[ids[0]].voxel_size_um
    vs = tuple(float(v) for v in (first if voxel_size_um is None else np.broadcast_to(np.asarray(voxel_size_um, float), (3,))))
    geometry = PatchGeometry(tuple(float(s) for s in patch_size_um))  # type: ignore[arg-type]
    shape = geometry.shape_vox(vs)
    size = tuple(float(n * v) for n, v in zip(shape, vs))
    for vid, volume in volumes.items():
        check_patch_fits(volume, size, vid)
    ref = resolve_reference(intensity_reference, cohort)
    try:
        spec = IntensitySpec.fit(intensity, *(ref or (None, None)), seed=seed)
    except ValueError as err:
        raise DataError(cohort.path, str(err)) from err
    return PretrainData(cohort, volumes, vs, shape, size, spec)  # type: ignore[arg-type]


def draw_pool(data: PretrainData, per_volume: int, dtype: str, seed: int, n_planes: int = 32) -> torch.Tensor:
    """``(N, 1, D, H, W)`` patches (``dtype`` levels), ``per_volume`` from each volume at random
    tissue points (seeded by ``seed``)."""
    rng = np.random.default_rng(seed)
    pools = []
    for vid, volume in data.volumes.items():
        try:
            mask = tissue_mask(volume)
            patches, _ = tissue_patches(volume, mask, per_volume, data.patch_shape, data.voxel_size_um,
                                     data.intensity.transform_for(volume), dtype, rng, n_planes)
        except (VolumeError, ValueError) as err:
            raise DataError(volume.path, f"volume {vid!r}: {err}") from err
        log.info("volume %s: %d patches of %s voxels inside the tissue mask", vid, len(patches), list(data.patch_shape))
        pools.append(patches)
    return torch.from_numpy(np.concatenate(pools)[:, None])

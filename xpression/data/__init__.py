"""Everything between files on disk and batches of (CT patch, expression target) tensors.

The public entry is :class:`XPressionDataModule`; the pieces it is built from are exported too.
Heavy modules (torch, scanpy) load on first use, so `load_manifest` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from xpression.data.manifest import Cohort, ManifestError, SectionEntry, TruthEntry, VolumeEntry, load_manifest

_LAZY = {
    "xpression.data.volume": ["Volume", "VolumeError", "open_volume"],
    "xpression.data.omezarr": ["write_omezarr"],
    "xpression.data.convert": ["convert_tiff_to_omezarr", "convert_to_omezarr"],
    "xpression.data.intensity": ["IntensityNormalizer", "HistogramMatcher", "histogram_match", "intensity_transform", "robust_range"],
    "xpression.data.mask": ["TissueMask", "tissue_mask"],
    "xpression.data.geometry": ["DataError", "Plane", "PatchGeometry", "SlabGrid", "count_patch_overlaps"],
    "xpression.data.bigwarp": ["BigWarpLandmarks", "read_landmarks"],
    "xpression.data.registration": ["AffineFit", "Declaration", "Registration", "fit_affine", "register_landmarks",
                                    "register_section", "spot_pitch_um"],
    "xpression.data.sections": ["Section", "load_section", "read_adata"],
    "xpression.data.spaceranger": ["read_spaceranger"],
    "xpression.data.targets": ["TargetSpec", "ObsmTarget", "GenesTarget", "ProgramsTarget"],
    "xpression.data.sampling": ["SpotSampler", "StratifiedSampler", "JitterSampler", "SpotEpochSampler"],
    "xpression.data.splits": ["SpatialBlocksSplit", "StratifiedRandomSplit", "LeaveSectionOut", "VolumesSplit", "patch_overlap"],
    "xpression.data.augment": ["Augment", "dihedral"],
    "xpression.data.datamodule": ["XPressionDataModule", "PatchDataset"],
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["Cohort", "ManifestError", "SectionEntry", "TruthEntry", "VolumeEntry", "load_manifest", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'xpression.data' has no attribute {name!r}")

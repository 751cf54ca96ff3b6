"""Everything between files on disk and batches of (CT patch, expression target) tensors."""

from xpression.data.manifest import Cohort, ManifestError, SectionEntry, TruthEntry, VolumeEntry, load_manifest

__all__ = ["Cohort", "ManifestError", "SectionEntry", "TruthEntry", "VolumeEntry", "load_manifest"]

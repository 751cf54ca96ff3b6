"""Config resolvers shared by `train.py` and `infer.py`.

`${phantom:DIR,PRESET}` is the `cohort.yaml` of the synthetic cohort in DIR, generated with
that preset (seed 0) the first time it is needed, so `python train.py debug=smoke` works on a
fresh clone without a separate generation step. An existing cohort is never regenerated.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["ensure_phantom", "register_resolvers"]

log = logging.getLogger(__name__)


def ensure_phantom(out_dir: str, preset: str = "tiny", seed: int = 0) -> str:
    """Path of `out_dir/cohort.yaml`, generating the phantom cohort there if it is missing."""
    manifest = Path(out_dir) / "cohort.yaml"
    if not manifest.exists():
        from xpression.phantom import generate_cohort

        log.info("generating the %r phantom cohort in %s (once)", preset, out_dir)
        generate_cohort(out_dir, preset=preset, seed=int(seed))
    return str(manifest)


def register_resolvers() -> None:
    """Register the resolvers above with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("phantom"):
        OmegaConf.register_new_resolver("phantom", ensure_phantom, use_cache=True)

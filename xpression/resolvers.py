"""Config resolvers shared by `train.py` and `infer.py`.

`${phantom:DIR,PRESET}` is the `cohort.yaml` of the synthetic cohort in DIR, generated with
that preset (seed 0) the first time it is needed, so `python train.py debug=smoke` works on a
fresh clone without a separate generation step. An existing cohort is never regenerated.
`${run_dir:RESUME,DEFAULT}` and `${hydra_output_subdir:DIR,RESUME}` place Hydra's run folder and its
saved config (conf/hydra/default.yaml) so that a resumed run continues in, and never
overwrites, its folder. `${scale:VALUES,K}` multiplies a list of numbers (a multi-scale model's
context view: 3 x the patch, conf/patch/context/x3.yaml). The entry points (train.py, infer.py) call :func:`register_resolvers`
before Hydra composes; importing ``xpression`` registers nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import ListConfig, OmegaConf

__all__ = ["ensure_phantom", "hydra_output_subdir", "register_resolvers", "run_dir", "scale"]

log = logging.getLogger(__name__)


def ensure_phantom(out_dir: str, preset: str = "tiny", seed: int = 0) -> str:
    """Path of `out_dir/cohort.yaml`, generating the phantom cohort there if it is missing."""
    manifest = Path(out_dir) / "cohort.yaml"
    if not manifest.exists():
        from xpression.phantom import generate_cohort

        log.info("generating the %r phantom cohort in %s (once)", preset, out_dir)
        generate_cohort(out_dir, preset=preset, seed=int(seed))
    return str(manifest)


def run_dir(resume: str | None, default: str) -> str:
    """Hydra's run folder: the run being continued (`resume=RUN`), else `default`."""
    return str(resume) if resume else default


def hydra_output_subdir(output_dir: str, resume: str | None = None) -> str | None:
    """Where Hydra saves the composed config in a run folder: `.hydra`, or nowhere (None) when
    the run is resumed (its own config is restored, not the composed one) or the folder already
    holds a run (`config.yaml`, written by train.py when training starts)."""
    return None if resume or (Path(output_dir) / "config.yaml").exists() else ".hydra"


def scale(values: Any, factor: Any) -> ListConfig:
    """``${scale:${patch.size_um},3}``: every number of ``values`` times ``factor``;
    ``${scale:${patch.size_um},[7,4,4]}``: one factor per number. A ``ListConfig``, not a list,
    so ``OmegaConf.resolve`` (``train.py --cfg job --resolve``) can store it."""
    factors = [float(factor)] * len(values) if isinstance(factor, (int, float, str)) else [float(f) for f in factor]
    if len(factors) != len(values):
        raise ValueError(f"scale: {len(factors)} factors for {len(values)} values ({list(values)})")
    return ListConfig([float(v) * f for v, f in zip(values, factors)])


def register_resolvers() -> None:
    """Register the resolvers above with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("phantom"):
        OmegaConf.register_new_resolver("phantom", ensure_phantom, use_cache=True)
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", run_dir)
    if not OmegaConf.has_resolver("hydra_output_subdir"):
        OmegaConf.register_new_resolver("hydra_output_subdir", hydra_output_subdir)
    if not OmegaConf.has_resolver("scale"):
        OmegaConf.register_new_resolver("scale", scale)

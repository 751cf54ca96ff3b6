"""The layout of a training run folder and of its checkpoints, shared by training and inference.

A run folder holds ``config.yaml`` (the resolved config; Hydra's own in ``.hydra/``), one
``config.resumed-<n>.yaml`` per restart, ``checkpoints/{best,last}.ckpt``, ``metrics.json``,
``predictions.csv`` and ``figures/``. Every checkpoint records the run's config under
:data:`RUN_CONFIG_KEY` and the model's input contract under
``xpression.data.input_spec.INPUT_SPEC_KEY``, so a checkpoint alone is enough to sweep.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RUN_CONFIG_KEY", "RUN_OUTPUTS", "run_config_path"]

RUN_CONFIG_KEY = "xpression_run_config"  # where a checkpoint records its run's resolved config

# What a training run writes into its folder (besides Hydra's ``.hydra/`` and the log): a fresh
# run refuses a folder that already holds any of them, so nothing there is overwritten.
RUN_OUTPUTS = ("config.yaml", "checkpoints", "metrics.json", "predictions.csv", "probe_points.csv", "figures",
               "ood_fit.npz", "csv")


def run_config_path(run_dir: Path) -> Path:
    """The config a run folder last trained with: its latest ``config.resumed-<n>.yaml``, else
    ``config.yaml``, else Hydra's ``.hydra/config.yaml`` (returned even if missing)."""
    restarts = [p for p in run_dir.glob("config.resumed-*.yaml") if p.stem.rpartition("-")[2].isdigit()]
    if restarts:
        return max(restarts, key=lambda p: int(p.stem.rpartition("-")[2]))
    return run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else run_dir / ".hydra" / "config.yaml"

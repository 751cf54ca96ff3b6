"""The post-fit steps that score a training run against its truth, as Lightning callbacks
attached by config (``conf/evaluation/``), after ``xpression.callbacks.SpotPredictions``:

- ``RunScores``: per-volume scores of the best weights beside the baselines without CT, the
  features + ridge baseline on the run's own patch and, with an ``off_plane`` probe, planes away
  from the trained section (``evaluate_run``); the table printed, the final metrics sent to every
  logger (``final/<split>/<metric>``, ``final/<where>/<volume>/<predictor>/<metric>``).
- ``RunFigures``: truth vs prediction on every section and the training curves, written to
  ``figures/`` and sent to every logger that keeps images (TensorBoard, wandb).
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from xpression.callbacks import PostFit, SpotPredictions
from xpression.config import ConfigError, schema_problems
from xpression.evaluation.baselines import KNN_K

__all__ = ["RunScores", "RunFigures", "final_metrics", "split_summary"]

log = logging.getLogger(__name__)

_LOGGED_SCORES = ("pearson_mean", "r2_mean")


def split_summary(metrics: Mapping[str, Any], per_target: bool = False) -> dict[str, float]:
    """Every split's numbers as ``final/<split>/<metric>``: the means over targets (a fixed few
    per split) and, with ``per_target``, each target's own (``<metric>/<target>``)."""
    out: dict[str, float] = {}
    for split, values in (metrics.get("splits") or {}).items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (per_target or "/" not in name):
                out[f"final/{split}/{name}"] = float(value)
    return out


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of ``evaluate_run``'s metrics as flat logger keys: every split metric as
    ``final/<split>/<metric>`` and each score row's mean r and R^2 as
    ``final/<where>[ <distance> um]/<volume>/<predictor>/<metric>``."""
    out = split_summary(metrics, per_target=True)
    for row in metrics.get("scores") or []:
        where = str(row["where"])
        d = row.get("distance_um")
        if not where.endswith("spots") and where != "volume" and d is not None and not math.isnan(float(d)):
            where = f"{where} {float(d):g} um"
        for name in _LOGGED_SCORES:
            value = row.get(name)
            if value is not None:
                out[f"final/{where}/{row['volume_id']}/{row['predictor']}/{name}"] = float(value)
    return out


class RunScores(PostFit):
    """Scores the run after fit (``evaluate_run``) and reports it: the metrics and the baselines'
    spot predictions join the run record, the per-volume table is printed, the final metrics go
    to every logger, and the split metrics (``final/<split>/<metric>``) to
    ``trainer.callback_metrics``.

    Args:
        ridge: also fit and score the features + ridge baseline on the run's patch.
        knn_k: neighbours of the kNN baseline.
        off_plane: probe settings (``conf/off_plane/probe.yaml``) or None for held-out spots only.
    """

    def __init__(self, ridge: bool = True, knn_k: int = KNN_K, off_plane: Mapping[str, Any] | None = None):
        from xpression.evaluation.generalisation import OffPlaneProbe

        self.ridge, self.knn_k = bool(ridge), int(knn_k)
        probe = OmegaConf.to_container(off_plane, resolve=True) if OmegaConf.is_config(off_plane) else off_plane
        problems = schema_problems(dict(probe), OffPlaneProbe, "off_plane") if probe is not None else []
        if problems:
            raise ConfigError(problems, "training config")
        self.off_plane = probe
        self._table: Any = None

    def check(self, datamodule: Any) -> None:
        if self.off_plane is not None:  # a patch larger than the probe set allows fails now, not after training
            from xpression.evaluation.generalisation import OffPlaneProbe

            OffPlaneProbe.of(self.off_plane).check_patch(datamodule.patch_shape_vox, datamodule.voxel_size_um)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        from xpression.evaluation.run_scores import evaluate_run
        from xpression.evaluation.scores import scores_table

        state = SpotPredictions.of(trainer)
        metrics, state.predictions, state.probe_points = evaluate_run(
            state.model, state.datamodule, state.predictions, off_plane=self.off_plane, ridge=self.ridge, k=self.knn_k,
            return_points=True)
        state.metrics.update(metrics)
        self._table = scores_table(metrics["scores"], f"held-out accuracy per volume ({state.weights}; baselines beside the model)")
        final = final_metrics(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)
            logger.save()
        # callback_metrics gets the split means alone, a count that does not grow with volumes or
        # targets: a spawn-based strategy sends them to the main process through a pipe it reads only
        # once its workers have exited, so hundreds of scores would fill it and hang ddp_spawn.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in split_summary(metrics).items()})

    def teardown(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        """Print the table once the progress bar has closed."""
        table, self._table = self._table, None
        if table is not None:
            from rich.console import Console

            Console(width=None if sys.stdout.isatty() else 160).print(table)


class RunFigures(PostFit):
    """Truth vs prediction on every section (``figures/section_<id>.png``) and the training
    curves of the CSV log (``figures/training_curves.png``), sent to every logger that keeps
    images. ``enabled: false`` (``figures=false``) skips them."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        from pathlib import Path

        from xpression.evaluation.figures import plot_section_maps, plot_training_curves
        from xpression.plotting import log_figure

        state = SpotPredictions.of(trainer)
        spec = state.datamodule.target_spec
        figures = state.out_dir / "figures"
        written = list(plot_section_maps(state.predictions, list(spec.names), figures, colors=spec.colors))
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.CSVLogger):
                logger.save()
                csv = Path(logger.log_dir) / "metrics.csv"
                curves = plot_training_curves(csv, figures / "training_curves.png") if csv.exists() else None
                written += [curves] if curves is not None else []
        for logger in trainer.loggers:
            for png in written:
                log_figure(logger, f"figures/{png.stem}", png, trainer.global_step)

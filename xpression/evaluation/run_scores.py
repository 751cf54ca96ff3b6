"""Everything a training run is scored on, in one call: ``evaluate_run``.

Held-out spots of the trained sections and, with a probe, planes away from them and volumes
without a training section; per volume, the model beside the baselines without CT and the
features + ridge baseline fitted on the run's own patch, split and training spots (so every
comparison with it is paired).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from xpression.data.manifest import Cohort, load_manifest
from xpression.evaluation.baselines import KNN_K
from xpression.evaluation.generalisation import evaluate_off_plane
from xpression.evaluation.scores import evaluate_spots, spot_baselines
from xpression.models.ridge import RidgeBaseline

__all__ = ["evaluate_run", "fit_ridge_baseline"]

log = logging.getLogger(__name__)


def _run_ridge(datamodule: Any) -> RidgeBaseline:
    """The (unfitted) features + ridge baseline on the data module's patch."""
    spec = datamodule.input_spec()
    return RidgeBaseline(spec.target_spec, spec.patch_shape_vox, input_spec=spec)


def fit_ridge_baseline(datamodule: Any) -> Any:
    """The features + ridge baseline on the data module's patch and training spots."""
    return _run_ridge(datamodule).fit(datamodule)


def _ridge_columns(ridge: Any, datamodule: Any, table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a fitted ridge's ``ridge/<target>`` prediction of every spot."""
    pred = np.full((len(table), len(datamodule.target_spec.names)), np.nan)
    for batch in datamodule.predict_dataloader():
        pred[batch["index"].numpy()] = ridge(batch["image"]).numpy()  # the loader's uint8 levels -> [0, 1] first
    return _with_ridge(table, pred, datamodule.target_spec.names)


def _fit_ridge_columns(datamodule: Any, table: pd.DataFrame) -> tuple[Any, pd.DataFrame]:
    """:func:`fit_ridge_baseline` and :func:`_ridge_columns` from one pass over the spots' patches
    (features computed once per spot; the same numbers). ``table``'s rows are the data module's
    spots, in order (``predict_spots``' table)."""
    ridge = _run_ridge(datamodule)
    every = ridge.fit_predict(datamodule)
    if len(every) != len(table):
        raise ValueError(f"the spot table has {len(table)} rows for the data module's {len(every)} spots")
    return ridge, _with_ridge(table, every.astype(np.float64), datamodule.target_spec.names)  # as _ridge_columns stores them


def _with_ridge(table: pd.DataFrame, pred: np.ndarray, names: Any) -> pd.DataFrame:
    out = table.copy()
    for j, n in enumerate(names):
        out[f"ridge/{n}"] = pred[:, j]
    return out


def evaluate_run(model: Any, datamodule: Any, predictions: pd.DataFrame, off_plane: Any = None,
                 ridge: bool = True, k: int = KNN_K, return_points: bool = False) -> tuple:
    """Per-volume scores of a trained ``model`` and its baselines.

    Args:
        predictions: ``predict_spots``' table (every spot, its split, ``true/`` and ``pred/``).
        off_plane: probe settings (``OffPlaneProbe`` or its dict) or None for spots only.
        ridge: also fit and score the features + ridge baseline on this run's patch (skipped
            when the model is that baseline).
        k: neighbours of the kNN baseline.

    Returns:
        The metrics (``evaluate_spots``' keys; ``scores`` also holds the probe rows and
        ``off_plane`` the probe's counts and exclusions) and the spot table with every
        baseline's prediction added (``ridge/``, ``extrusion/``, ``knn/``, ... columns); with
        ``return_points`` also the probe's points (one row each: place in um, ``true/``, ``model/``
        and every baseline's answer; None without a probe).
    """
    spec = datamodule.target_spec
    names = list(spec.names)
    cohort = datamodule.manifest if isinstance(datamodule.manifest, Cohort) else load_manifest(datamodule.manifest)
    conditions = {v.id: v.condition for v in cohort.volumes}
    ridge_model = None
    if ridge and not isinstance(model, RidgeBaseline):
        ridge_model, predictions = _fit_ridge_columns(datamodule, predictions)
    metrics = evaluate_spots(predictions, names, spec.kind, k=k, conditions=conditions)
    points = None
    if off_plane is not None:
        off = evaluate_off_plane(model, datamodule, predictions, off_plane, ridge=ridge_model, k=k)
        metrics["scores"] += off.pop("scores", [])
        points = off.pop("points", None)
        metrics["off_plane"] = off
    table = spot_baselines(predictions, names, k)
    return (metrics, table, points) if return_points else (metrics, table)

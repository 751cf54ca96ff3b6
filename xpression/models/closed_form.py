"""Models fitted once on the training spots, without epochs (``model=ridge``, ``model=forest``).

A closed-form model is an ``nn.Module`` so the training, evaluation and inference code treat it
like a network: ``forward`` takes the ``(B, C, D, H, W)`` batch (the patch and, for a model that
reads one, its context view) and it has a ``patch_shape``. Subclasses say how a batch of views
becomes features (:meth:`ClosedFormModel.features`), how they are fitted
(:meth:`ClosedFormModel.fit_arrays`) and read (:meth:`ClosedFormModel.predict_features`); the
fitted numbers are tensors of the state dict, so :meth:`ClosedFormModel.save_checkpoint` writes a
checkpoint with the :class:`~xpression.data.input_spec.InputSpec` that ``infer.py`` sweeps
(``mode=patch``) like any other model's.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from xpression.data.input_spec import INPUT_SPEC_KEY, InputSpec
from xpression.data.kinds import get_kind
from xpression.data.patches import dequantise
from xpression.models.targets import as_target_spec
from xpression.runfolder import RUN_CONFIG_KEY

__all__ = ["ClosedFormModel", "feature_spread", "map_rows", "one_blas_thread", "rounding_spread"]

log = logging.getLogger(__name__)

_BLAS: Any = None


def one_blas_thread() -> Any:
    """A context in which numpy's BLAS runs on one thread. The fitted models' matrix products are
    small (a batch of views times a few kernels); BLAS threads left spinning beside torch's and
    the sweep's reader cost more than they bring (on 2 cores a forest's sweep with ``ood`` took
    1.5x the plain one; on one BLAS thread both take the same)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


_ROW_POOL: ThreadPoolExecutor | None = None
_ROW_POOL_SIZE = 0
_ROW_POOL_LOCK = threading.Lock()
_ROW_THREAD = "xpression-rows"
MIN_ROWS_PER_THREAD = 8  # fewer rows than this per thread: not worth a hand-over


def _reset_row_pool() -> None:  # a forked process has none of the pool's threads
    global _ROW_POOL, _ROW_POOL_SIZE, _ROW_POOL_LOCK
    _ROW_POOL, _ROW_POOL_SIZE, _ROW_POOL_LOCK = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_reset_row_pool)


def map_rows(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``fn(x)`` for an ``fn`` whose every output row depends on its input row alone, computed on
    ``threads`` blocks of rows at once (default: torch's CPU threads) and concatenated: the same
    numbers as one call. numpy releases the GIL in its loops and BLAS calls, so a fitted model's
    features and trees use every core a sweep gives it (``torch.set_num_threads``; one under
    ``torchrun``, which sets ``OMP_NUM_THREADS=1``)."""
    global _ROW_POOL, _ROW_POOL_SIZE
    threads = torch.get_num_threads() if threads is None else int(threads)
    blocks = min(threads, len(x) // MIN_ROWS_PER_THREAD)
    if blocks <= 1 or threading.current_thread().name.startswith(_ROW_THREAD):  # no nesting in the pool
        return fn(x)
    with _ROW_POOL_LOCK:
        if _ROW_POOL is None or _ROW_POOL_SIZE < blocks:  # grown when torch is given more threads
            _ROW_POOL_SIZE = max(blocks, threads)
            _ROW_POOL = ThreadPoolExecutor(_ROW_POOL_SIZE, thread_name_prefix=_ROW_THREAD)
        pool = _ROW_POOL
    cuts = np.linspace(0, len(x), blocks + 1).astype(int)
    return np.concatenate(list(pool.map(fn, [x[a:b] for a, b in zip(cuts[:-1], cuts[1:])])))


def rounding_spread(center: np.ndarray) -> np.ndarray:
    """The ``(F,)`` spreads (each feature's own units) at or below which a feature of mean
    ``center`` is constant over the training spots up to rounding: 1e-9 of its size (at least 1e-9)."""
    return 1e-9 * np.maximum(1.0, np.abs(np.asarray(center, float)))


def feature_spread(features: np.ndarray) -> np.ndarray:
    """The ``(F,)`` standard deviations of ``(N, F)`` training features that standardise them for
    the ood score, 1 for a feature constant over the training spots: a spread at rounding level
    (:func:`rounding_spread`) counts as constant, since dividing by it would put ordinary tissue
    1e13 spreads away."""
    spread = features.std(axis=0)
    return np.where(spread > rounding_spread(features.mean(axis=0)), spread, 1.0)


class ClosedFormModel(nn.Module):
    """Base of the models fitted in one pass over the training spots (no augmentation).

    Args:
        target_spec: names and kind of the targets (predictions are made valid for the kind).
        patch_shape: ``(D, H, W)`` voxels of every view.
        input_spec: the data's input contract (voxel size, context view); default: the data
            module's, taken by :meth:`fit`.
    """

    family = "closed_form"
    views = 1  # input channels read: the patch; a subclass reading the context view too says 2
    dense_equivalent = False
    output_stride = None

    def __init__(self, target_spec: Any, patch_shape: Sequence[int], input_spec: InputSpec | dict | None = None) -> None:
        super().__init__()
        self.target_spec = as_target_spec(target_spec)
        self.patch_shape = tuple(int(s) for s in patch_shape)
        self.input_spec = InputSpec.from_dict(input_spec) if isinstance(input_spec, dict) else input_spec
        # the training spots' feature mean and sd: the units of the ood distance (xpression.inference.ood)
        self.register_buffer("feature_center", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("feature_spread", torch.zeros(0, dtype=torch.float64))
        self.training_features: np.ndarray | None = None  # (N, F) of the last fit (not saved)

    # -- what a subclass provides -----------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        raise NotImplementedError

    def features(self, views: np.ndarray) -> np.ndarray:
        """``(B, C, D, H, W)`` normalised views ([0, 1]; :meth:`as_views` of what the caller
        gave) -> ``(B, F)``."""
        raise NotImplementedError

    def fit_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        """Fit on the training spots' features ``(N, F)`` and targets ``(N, T)``."""
        raise NotImplementedError

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """``(B, F)`` features -> ``(B, T)`` raw predictions (before the kind's activation)."""
        raise NotImplementedError

    def hyper_parameters(self) -> dict:
        """The constructor arguments a checkpoint rebuilds the model with."""
        return {"target_spec": self.target_spec.to_dict(), "patch_shape": list(self.patch_shape)}

    def model_record(self) -> dict:
        """What the input spec records about this model beside its class and family."""
        return {}

    def restore_record(self, record: dict) -> None:
        """Read back :meth:`model_record` from a checkpoint's input spec."""

    # -- shared --------------------------------------------------------------------------------------
    ROWS_PER_THREAD_BATCH = 256  # views per CPU thread in one sweep batch: a thread's work outweighs its hand-over

    @property
    def patch_batch_size(self) -> int:
        """Views per call a patch sweep gives this model by default: 256 per CPU thread (its rows
        are split over torch's threads, :func:`map_rows`; larger calls also spread the per-call
        cost of the features and trees)."""
        return self.ROWS_PER_THREAD_BATCH * max(1, torch.get_num_threads())

    @property
    def voxel_size_um(self) -> tuple[float, float, float]:
        if self.input_spec is None:
            raise RuntimeError(f"{type(self).__name__} has no input spec (voxel size); call fit(datamodule) or pass input_spec")
        return self.input_spec.voxel_size_um

    def as_views(self, patches: np.ndarray) -> np.ndarray:
        """``(B, D, H, W)`` patches or ``(B, C, D, H, W)`` views (float intensities, or the
        cache's uint8 levels) -> ``(B, C, D, H, W)`` float intensities."""
        patches = np.asarray(patches)
        patches = dequantise(patches) if patches.dtype in (np.uint8, np.float16) else patches
        return patches[:, None] if patches.ndim == 4 else patches

    def fit(self, datamodule: Any) -> "ClosedFormModel":
        """Fit on the data module's training spots (one pass over them, no augmentation)."""
        self._fit_pass(datamodule, keep=False)
        return self

    def fit_predict(self, datamodule: Any) -> np.ndarray:
        """:meth:`fit`, then predictions for every spot of the data module, from the same single
        pass over its patches (each patch's features computed once): ``(N, T)`` float32 in the
        data module's spot order, the numbers ``self(batch["image"])`` gives per loader batch."""
        batches = self._fit_pass(datamodule, keep=True)
        out = np.full((len(datamodule.spots), len(self.target_spec.names)), np.nan, np.float32)
        for index, feats in batches:
            out[index] = self.predict_from_features(feats)
        return out

    def _fit_pass(self, datamodule: Any, keep: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """Fit on the training spots of one pass over the predict loader; with ``keep``, the
        features of every spot too, per loader batch: ``[(spot indices, (B, F) features)]``.
        Features are per patch, so a batch's training rows get the numbers they get alone."""
        if self.input_spec is None:
            self.input_spec = datamodule.input_spec()
        datamodule.setup("fit")
        train = datamodule.spots["split"].to_numpy() == "train"
        feats, targets, batches = [], [], []
        for batch in datamodule.predict_dataloader():
            index = batch["index"].numpy()
            rows = train[index]
            if keep:
                every = self.views_features(batch["image"].numpy())
                batches.append((index, every))
                if rows.any():
                    feats.append(every[rows])
            elif rows.any():
                feats.append(self.views_features(batch["image"][rows].numpy()))
            if rows.any():
                targets.append(batch["target"][rows].numpy())
        if not feats:
            raise ValueError(f"{type(self).__name__}: the data module has no training spots to fit on")
        self.training_features = np.concatenate(feats)
        self.fit_arrays(self.training_features, np.concatenate(targets))
        self.feature_center = torch.as_tensor(self.training_features.mean(axis=0), dtype=torch.float64)
        self.feature_spread = torch.as_tensor(feature_spread(self.training_features), dtype=torch.float64)
        return batches

    def predict_from_features(self, feats: np.ndarray) -> np.ndarray:
        """``(B, F)`` features -> ``(B, T)`` float32 predictions, valid for the target kind."""
        return self.valid(self.predict_features(feats).reshape(len(feats), -1))

    def valid(self, raw: np.ndarray) -> np.ndarray:
        """``(N, T)`` raw predictions made valid for the target kind, float32."""
        return get_kind(self.target_spec.kind).activate_numpy(raw).astype(np.float32)

    def predict_patches(self, patches: np.ndarray) -> np.ndarray:
        """``(B, D, H, W)`` patches or ``(B, C, D, H, W)`` views, normalised -> ``(B, T)``
        float32 predictions, valid for the target kind."""
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(datamodule) first")
        return self.predict_from_features(self.views_features(patches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` (float intensities, or a loader's uint8 levels) -> ``(B, T)``."""
        return torch.from_numpy(self.predict_patches(x.detach().cpu().numpy()))

    # -- the feature space of the ood distance --------------------------------------------------------
    @property
    def has_ood_features(self) -> bool:
        """Whether the fit kept its features' spread (checkpoints written before it was kept did not)."""
        return self.feature_spread.numel() > 0

    def standardised(self, feats: np.ndarray) -> np.ndarray:
        """``(B, F)`` features -> float32 in units of the training spots' spread, ``(f - mean) / sd``:
        what the ood distance is measured in (raw features mix um, shares and grey levels)."""
        if not self.has_ood_features:
            raise RuntimeError(f"{type(self).__name__} was fitted before its features' spread was kept; fit it again")
        return ((feats - self.feature_center.cpu().numpy()) / self.feature_spread.cpu().numpy()).astype(np.float32)

    def ood_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` views -> ``(B, F)`` float32 standardised features (:meth:`standardised`)."""
        return torch.from_numpy(self.standardised(self.tensor_features(x)))

    def predict_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(x)`` and :meth:`ood_features` from one computation of the features."""
        feats = self.tensor_features(x)
        return torch.from_numpy(self.predict_from_features(feats)), torch.from_numpy(self.standardised(feats))

    def tensor_features(self, x: torch.Tensor) -> np.ndarray:
        """``(B, C, D, H, W)`` views (float intensities, or a loader's uint8 levels) of a fitted
        model -> ``(B, F)`` features."""
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(datamodule) first")
        return self.views_features(x.detach().cpu().numpy())

    def views_features(self, patches: np.ndarray) -> np.ndarray:
        """:meth:`features` of ``(B, D, H, W)`` patches or ``(B, C, D, H, W)`` views, with numpy's
        BLAS on one thread (:func:`one_blas_thread`) and the rows on torch's CPU threads
        (:func:`map_rows`)."""
        views = self.as_views(patches)
        with one_blas_thread():
            return map_rows(self.features, views)

    def save_checkpoint(self, path: str | Path, run_config: dict | None = None) -> Path:
        """A checkpoint ``infer.py`` loads like a network's: the fitted tensors, constructor
        arguments, the input spec (with this model recorded) and, when given, the run's config."""
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; nothing to save")
        spec = self.input_spec.with_model(**{"class": f"{type(self).__module__}.{type(self).__qualname__}",
                                             "family": self.family, "dense_equivalent": False, "output_stride": None,
                                             **self.model_record()})
        ckpt = {"state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                "hyper_parameters": self.hyper_parameters(), INPUT_SPEC_KEY: spec.to_dict()}
        if run_config is not None:
            ckpt[RUN_CONFIG_KEY] = run_config
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)
        return path

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "ClosedFormModel":
        """The fitted model a :meth:`save_checkpoint` dict holds."""
        spec = ckpt.get(INPUT_SPEC_KEY)
        model = cls(**ckpt["hyper_parameters"], input_spec=None if spec is None else InputSpec.from_dict(spec))
        for name, value in ckpt["state_dict"].items():
            if isinstance(getattr(model, name, None), nn.Parameter):
                setattr(model, name, nn.Parameter(value, requires_grad=False))
            else:
                setattr(model, name, value)  # a registered buffer
        model.restore_record((spec or {}).get("model", {}))
        return model

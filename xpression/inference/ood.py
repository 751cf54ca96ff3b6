"""How far an input lies from the training patches, in the feature space of the network.

The features are those entering the target head (``net.forward_features``, or the backbone's
``dense_features`` in a dense sweep, one vector per output position), fitted on the run's
*training* spots. Two scores (``infer.py ood_method=``):

- ``mahalanobis`` (the default): ``sqrt((f - mean)^T cov^-1 (f - mean))`` with the training
  features' mean and a Ledoit-Wolf shrinkage covariance, in units of their spread (a training
  spot scores about ``sqrt(F)``, ``F`` the feature count).
- ``knn`` (Deep kNN, Sun et al. 2022): the Euclidean distance of the L2-normalised feature
  vector to its ``k``-th nearest L2-normalised training feature (0 to 2). It reads the direction
  of the features only: on the benchmark cohort it ranked the map's errors better than
  ``mahalanobis`` within every volume, but a patch of white noise scored as low as tissue
  (Mahalanobis: five times the training median), so it is no guard against a broken input.

Closed-form models (forest, ridge) give their filter-bank features divided by each feature's
spread over the training spots (``ood_features``), so Mahalanobis' shrinkage no longer bounds a
feature that barely varies there: with a few training spots a feature constant up to rounding
(spread ~1e-16) made the ood of ordinary tissue 1e8-1e15 training spreads (a network's head
features are not rescaled per feature: about ``sqrt(F)``). Such a feature is now divided by 1
(:func:`~xpression.models.closed_form.feature_spread`); a model fitted before that is named in one
logged warning (:func:`warn_constant_features`). A feature that merely varies little still
scales the score, which ranks points but does not compare across runs; the map store keeps it in
float32 (float16 ends at 65504).

The fit keeps both, and per score the 99th percentile of the training spots' own scores (for
``knn`` each spot's distance to the others, itself left out), the threshold the evaluation
reports against.

Where the fit comes from (:func:`ood_fit_for_run`): ``train.py`` writes ``RUN/ood_fit.npz`` for
the weights it scores (the best checkpoint) (seconds: one pass over the training spots it has in memory); a run
without one, or used with another checkpoint, is fitted at inference from its training spots
(the run's DataModule rebuilt from its config: the sections and their patches are read again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from xpression.inference.predictor import InferenceError

__all__ = ["OOD_FILE", "OOD_METHODS", "KNN_K", "OODFit", "fit_ood", "mahalanobis", "knn_distance", "spot_features", "features_of", "fit_training_spots", "ood_fit_for_run", "require_features", "run_datamodule",
           "constant_features", "warn_constant_features",
           "weights_digest"]

log = logging.getLogger(__name__)

OOD_FILE = "ood_fit.npz"
OOD_METHODS = ("knn", "mahalanobis")
KNN_K = 10  # the neighbour whose distance is the score (Sun et al. 2022 used 1-1000; 5-20 scored alike here)


@dataclass
class OODFit:
    """``mean`` ``(F,)`` and ``whiten`` ``(F, F)`` with ``cov^-1 = whiten @ whiten.T``;
    ``train_p99``: 99th percentile of the training spots' Mahalanobis scores; ``shrinkage``:
    Ledoit-Wolf's weight on the scaled identity; ``weights_sha256``: the weights the features came
    from; ``bank`` ``(N, F)``: the training features, L2-normalised (None in fits saved before
    ``knn`` existed); ``knn_train_p99``: 99th percentile of their leave-one-out ``knn`` scores;
    ``method``: which score :meth:`score` and :attr:`threshold` give."""

    mean: np.ndarray
    whiten: np.ndarray
    train_p99: float
    n_spots: int
    shrinkage: float
    weights_sha256: str = ""
    bank: np.ndarray | None = None
    knn_train_p99: float = float("nan")
    k: int = KNN_K
    method: str = "mahalanobis"

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])

    @property
    def threshold(self) -> float:
        """The training spots' 99th percentile of the chosen score."""
        return self.knn_train_p99 if self.method == "knn" else self.train_p99

    def using(self, method: str) -> "OODFit":
        """This fit scoring with ``method`` (``knn`` needs the bank)."""
        if method not in OOD_METHODS:
            raise InferenceError(f"ood_method must be one of {', '.join(OOD_METHODS)}, got {method!r}")
        if method == "knn" and self.bank is None:
            raise InferenceError("this out-of-distribution fit holds no training features for ood_method=knn; fit it again")
        return replace(self, method=method)

    def score(self, features: np.ndarray) -> np.ndarray:
        """``(N, F)`` features -> ``(N,)`` scores (float64) of :attr:`method`."""
        if self.method == "knn":
            return knn_distance(torch.as_tensor(np.asarray(features, np.float64)), torch.as_tensor(self.bank), self.k,
                                dim=1).numpy()
        z = (np.asarray(features, np.float64) - self.mean) @ self.whiten
        return np.sqrt(np.sum(z * z, axis=1))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        extra = {} if self.bank is None else {"bank": self.bank, "knn_train_p99": self.knn_train_p99, "k": self.k}
        np.savez(path, mean=self.mean, whiten=self.whiten, train_p99=self.train_p99, n_spots=self.n_spots,
                 shrinkage=self.shrinkage, weights_sha256=np.array(self.weights_sha256), **extra)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "OODFit":
        with np.load(path, allow_pickle=False) as z:
            digest = str(z["weights_sha256"]) if "weights_sha256" in z.files else ""  # none: refitted
            knn = {"bank": z["bank"], "knn_train_p99": float(z["knn_train_p99"]), "k": int(z["k"])} if "bank" in z.files else {}
            return cls(z["mean"], z["whiten"], float(z["train_p99"]), int(z["n_spots"]), float(z["shrinkage"]), digest, **knn)

    def to_dict(self) -> dict:
        """What the map metadata records (not the matrices)."""
        return {"method": self.method, "features": self.num_features, "n_spots": self.n_spots,
                "shrinkage": round(self.shrinkage, 6), "train_p99": self.train_p99,
                "knn_k": self.k if self.bank is not None else None,
                "knn_train_p99": self.knn_train_p99 if self.bank is not None else None,
                "weights_sha256": self.weights_sha256}


def weights_digest(net: torch.nn.Module) -> str:
    """sha256 of a network's tensors (names, shapes, values; memory layout ignored)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fit_ood(features: np.ndarray, weights_sha256: str = "") -> OODFit:
    """Mean and Ledoit-Wolf shrinkage covariance of ``(N, F)`` training features (N >= 2), and
    the features L2-normalised for ``knn`` (``k`` = :data:`KNN_K`, at most ``N - 1``).

    Shrinkage keeps the inverse finite when ``N`` is near ``F`` or features are constant
    (ReLU features that never fire): those directions get the average variance."""
    from sklearn.covariance import ledoit_wolf

    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise InferenceError(f"the out-of-distribution fit needs at least 2 training spots' features, got shape {x.shape}")
    mean = x.mean(axis=0)
    cov, shrinkage = ledoit_wolf(x - mean, assume_centered=True)
    # a floor for all-constant features (cov = 0): distances then measure any departure from them
    lam, vec = np.linalg.eigh(cov)
    lam = np.maximum(lam, max(float(lam.max()), 1.0) * 1e-9)
    whiten = vec / np.sqrt(lam)
    bank = _unit_rows(x)
    fit = OODFit(mean, whiten, 0.0, len(x), float(shrinkage), weights_sha256, bank, float("nan"), min(KNN_K, len(x) - 1))
    fit.train_p99 = float(np.percentile(fit.score(x), 99))
    # leave-one-out: each training spot against the others (its own distance 0 is the 1st neighbour)
    loo = knn_distance(torch.as_tensor(bank), torch.as_tensor(bank), fit.k + 1, dim=1).numpy()
    fit.knn_train_p99 = float(np.percentile(loo, 99))
    return fit


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Distances of feature vectors along ``dim`` (``(B, F)`` or ``(B, F, *spatial)``) in float32,
    that axis removed; ``mean``/``whiten`` as in :class:`OODFit`, on the features' device."""
    f = torch.movedim(features.float(), dim, -1) - mean
    z = f @ whiten
    # |z| scaled by its largest entry first: the sum of squares overflows float32 from |z| ~ 1.8e19
    top = torch.clamp(z.abs().amax(-1, keepdim=True), min=torch.finfo(z.dtype).tiny)
    return top.squeeze(-1) * torch.sqrt(((z / top) ** 2).sum(-1))


def knn_distance(features: torch.Tensor, bank: torch.Tensor, k: int, dim: int = 1, chunk: int = 65536) -> torch.Tensor:
    """Distances of feature vectors along ``dim`` (``(B, F)`` or ``(B, F, *spatial)``), each
    L2-normalised, to their ``k``-th nearest row of ``bank`` ``(N, F)`` (unit rows), that axis
    removed; ``k`` is capped at ``N``. In the features' dtype (float32 in a sweep), ``chunk``
    vectors at a time so memory stays ``chunk x N``."""
    f = torch.movedim(features, dim, -1)
    shape = f.shape[:-1]
    f = torch.nn.functional.normalize(f.reshape(-1, f.shape[-1]), dim=1)
    bank = bank.to(device=f.device, dtype=f.dtype)
    k = min(int(k), bank.shape[0])
    out = []
    for part in torch.split(f, chunk):
        d2 = torch.clamp(2.0 - 2.0 * part @ bank.T, min=0)  # |a - b|^2 of unit vectors
        out.append(torch.sqrt(torch.topk(d2, k, dim=1, largest=False).values[:, -1]))
    return torch.cat(out).reshape(shape) if out else f.new_zeros(shape)


def spot_features(net: torch.nn.Module, batches: Iterable[dict], device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``(index (N,), features (N, F))`` of every spot in ``batches`` (the DataModule's
    ``{"image", "index"}`` batches), with :func:`features_of` ``net`` in eval mode."""
    from xpression.data.datamodule import image_to_float

    net = net.to(device).eval()
    index, feats = [], []
    with torch.inference_mode():
        for batch in batches:
            index.append(batch["index"].numpy())
            feats.append(features_of(net)(image_to_float(batch["image"].to(device))).float().cpu().numpy())
    return np.concatenate(index), np.concatenate(feats)


def fit_training_spots(net: torch.nn.Module, datamodule: Any, device: torch.device | str = "cpu") -> OODFit:
    """:func:`fit_ood` on ``net``'s features of ``datamodule``'s training spots (split ``train``)."""
    datamodule.setup("predict")
    index, feats = spot_features(net, datamodule.predict_dataloader(), device)
    split = np.asarray(datamodule.spots["split"].reset_index(drop=True))[index]
    return fit_ood(feats[split == "train"], weights_digest(net))


def features_of(net: torch.nn.Module) -> Any:
    """The function giving the features the ood distance is measured in: a network's
    ``forward_features`` (what enters its head), a closed-form model's ``ood_features`` (its
    features in units of the training spots' spread)."""
    return getattr(net, "ood_features", None) or net.forward_features


def require_features(nets: Iterable[torch.nn.Module], where: str = "") -> None:
    """An :class:`InferenceError` naming the models among ``nets`` without features to measure an
    ood distance in (a closed-form model fitted before its features' spread was kept); ``where``
    is added to the name (e.g. the run)."""
    bare = sorted({type(n).__name__ for n in nets
                   if not (hasattr(n, "forward_features") or getattr(n, "has_ood_features", False))})
    if bare:
        raise InferenceError(f"ood: {', '.join(bare)}{where} has no features to measure the distance in (a closed-form "
                             "model fitted before its features' spread was kept: fit it again); pass ood=false")


def constant_features(net: torch.nn.Module) -> list[tuple[str, float]]:
    """``(name, sd)`` of the features of a closed-form ``net`` whose divisor in :meth:`standardised`
    (``feature_spread``, in the feature's own units: um, shares, grey levels) is a spread at
    rounding level (:func:`~xpression.models.closed_form.rounding_spread`): features constant on
    the training spots up to rounding, kept as divisors by models fitted before such spreads were
    replaced by 1. A tissue point where one varies by ``d`` scores about ``d / sd`` training
    spreads, so the ood magnitude is set by rounding. Networks, and models fitted since: []."""
    from xpression.models.closed_form import rounding_spread

    spread = getattr(net, "feature_spread", None)
    if spread is None or spread.numel() == 0:
        return []
    sd = spread.detach().cpu().double().numpy()
    center = getattr(net, "feature_center", None)
    center = center.detach().cpu().double().numpy() if center is not None and center.numel() == sd.size else np.zeros_like(sd)
    bank = getattr(net, "bank", None) if getattr(net, "input_spec", None) is not None else None
    names = list(getattr(bank, "names", []) or [])
    return [(names[i] if i < len(names) else f"feature {i}", float(sd[i]))
            for i in np.flatnonzero(sd <= rounding_spread(center))]


def warn_constant_features(net: torch.nn.Module, where: str = "") -> list[tuple[str, float]]:
    """One logged warning when ``net`` has :func:`constant_features`; returns them."""
    bad = constant_features(net)
    if bad:
        worst = min(bad, key=lambda b: b[1])
        log.warning("ood%s: %d of %d features are constant on the training spots up to rounding (e.g. %s, sd %.3g): "
                    "points where one varies score ~1/sd training spreads, so the ood channel ranks points but "
                    "its magnitude is set by rounding (fit the model again: such features now count as constant)",
                    where, len(bad), int(net.feature_spread.numel()), worst[0], worst[1])
    return bad


def ood_fit_for_run(info: Any, net: torch.nn.Module, device: torch.device | str = "cpu",
                    method: str = "mahalanobis") -> OODFit:
    """The fit for ``net`` (``info``'s network), scoring with ``method``: ``RUN/ood_fit.npz``
    when it was made from these weights (and, for ``knn``, holds the training features), else
    fitted now from the run's training spots (the DataModule rebuilt from ``info.config``, as
    ``train.py`` built it)."""
    require_features([net], f" (run {info.run_dir})")
    warn_constant_features(net, f" (run {info.run_dir})")
    path = Path(info.run_dir) / OOD_FILE
    if path.is_file():
        fit = OODFit.load(path)
        if fit.weights_sha256 == weights_digest(net) and (method != "knn" or fit.bank is not None):
            return fit.using(method)
        log.info("%s was fitted for other weights than %s or without the training features; fitting again from the "
                 "training spots", path, info.checkpoint)
    log.info("fitting the out-of-distribution score on the training spots of %s", info.run_dir)
    return fit_training_spots(net, run_datamodule(info, f"ood=true: run {info.run_dir} has no {OOD_FILE} for "
                                                        f"{Path(info.checkpoint).name} and", "pass ood=false"),
                              device).using(method)


def run_datamodule(info: Any, why: str = "", fix: str = "") -> Any:
    """The DataModule ``train.py`` built for run ``info`` (rebuilt from its config: cohort,
    target, sampler, split and seed), with no worker processes. ``why`` starts the error, ``fix`` ends it."""
    cfg = info.config
    missing = [k for k in ("data", "target", "sampler", "split") if not isinstance(cfg.get(k), dict) or
               (k != "split" and "_target_" not in cfg[k])]
    if missing:
        raise InferenceError(f"{why or f'run {info.run_dir}:'} its config lacks {missing} to rebuild its training spots" + (f"; {fix}" if fix else ""))
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = OmegaConf.create(cfg)
    return instantiate(conf.data, target=conf.target, sampler=conf.sampler, split=conf.split, seed=conf.get("seed", 0),
                       _recursive_=False, num_workers=0, persistent_workers=False, pin_memory=False)

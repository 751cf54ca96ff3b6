"""How far an input lies from the training patches: Mahalanobis distance in feature space.

The features are those entering the target head (``net.forward_features``, or the backbone's
``dense_features`` in a dense sweep, one vector per output position). Their mean and a
Ledoit-Wolf shrinkage covariance are fitted on the run's *training* spots; the score of an input
is ``sqrt((f - mean)^T cov^-1 (f - mean))``, in units of the training features' spread (a
training spot scores about ``sqrt(F)``, ``F`` the feature count). The fit also keeps the 99th
percentile of the training spots' own scores, the threshold the evaluation reports against.

Where the fit comes from (:func:`ood_fit_for_run`): ``train.py`` writes ``RUN/ood_fit.npz`` for
the weights it scores (the best checkpoint) (seconds: one pass over the training spots it has in memory); a run
without one, or used with another checkpoint, is fitted at inference from its training spots
(the run's DataModule rebuilt from its config: the sections and their patches are read again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from xpression.inference.predictor import InferenceError

__all__ = ["OOD_FILE", "OODFit", "fit_ood", "mahalanobis", "spot_features", "fit_training_spots", "ood_fit_for_run",
           "weights_digest"]

log = logging.getLogger(__name__)

OOD_FILE = "ood_fit.npz"


@dataclass
class OODFit:
    """``mean`` ``(F,)`` and ``whiten`` ``(F, F)`` with ``cov^-1 = whiten @ whiten.T``;
    ``train_p99``: 99th percentile of the training spots' scores; ``shrinkage``: Ledoit-Wolf's
    weight on the scaled identity; ``weights_sha256``: the weights the features came from."""

    mean: np.ndarray
    whiten: np.ndarray
    train_p99: float
    n_spots: int
    shrinkage: float
    weights_sha256: str = ""

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])

    def score(self, features: np.ndarray) -> np.ndarray:
        """``(N, F)`` features -> ``(N,)`` Mahalanobis distances (float64)."""
        z = (np.asarray(features, np.float64) - self.mean) @ self.whiten
        return np.sqrt(np.sum(z * z, axis=1))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez(path, mean=self.mean, whiten=self.whiten, train_p99=self.train_p99, n_spots=self.n_spots,
                 shrinkage=self.shrinkage, weights_sha256=np.array(self.weights_sha256))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "OODFit":
        with np.load(path, allow_pickle=False) as z:
            digest = str(z["weights_sha256"]) if "weights_sha256" in z.files else ""  # none: refitted
            return cls(z["mean"], z["whiten"], float(z["train_p99"]), int(z["n_spots"]), float(z["shrinkage"]), digest)

    def to_dict(self) -> dict:
        """What the map metadata records (not the matrices)."""
        return {"features": self.num_features, "n_spots": self.n_spots, "shrinkage": round(self.shrinkage, 6),
                "train_p99": self.train_p99, "weights_sha256": self.weights_sha256}


def weights_digest(net: torch.nn.Module) -> str:
    """sha256 of a network's tensors (names, shapes, values; memory layout ignored)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fit_ood(features: np.ndarray, weights_sha256: str = "") -> OODFit:
    """Mean and Ledoit-Wolf shrinkage covariance of ``(N, F)`` training features (N >= 2).

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
    fit = OODFit(mean, whiten, 0.0, len(x), float(shrinkage), weights_sha256)
    fit.train_p99 = float(np.percentile(fit.score(x), 99))
    return fit


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Distances of feature vectors along ``dim`` (``(B, F)`` or ``(B, F, *spatial)``) in float32,
    that axis removed; ``mean``/``whiten`` as in :class:`OODFit`, on the features' device."""
    f = torch.movedim(features.float(), dim, -1) - mean
    z = f @ whiten
    return torch.sqrt((z * z).sum(-1))


def spot_features(net: torch.nn.Module, batches: Iterable[dict], device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``(index (N,), features (N, F))`` of every spot in ``batches`` (the DataModule's
    ``{"image", "index"}`` batches), with ``net.forward_features`` in eval mode."""
    from xpression.data.datamodule import image_to_float

    net = net.to(device).eval()
    index, feats = [], []
    with torch.inference_mode():
        for batch in batches:
            index.append(batch["index"].numpy())
            feats.append(net.forward_features(image_to_float(batch["image"].to(device))).float().cpu().numpy())
    return np.concatenate(index), np.concatenate(feats)


def fit_training_spots(net: torch.nn.Module, datamodule: Any, device: torch.device | str = "cpu") -> OODFit:
    """:func:`fit_ood` on ``net``'s features of ``datamodule``'s training spots (split ``train``)."""
    datamodule.setup("predict")
    index, feats = spot_features(net, datamodule.predict_dataloader(), device)
    split = np.asarray(datamodule.spots["split"].reset_index(drop=True))[index]
    return fit_ood(feats[split == "train"], weights_digest(net))


def ood_fit_for_run(info: Any, net: torch.nn.Module, device: torch.device | str = "cpu") -> OODFit:
    """The fit for ``net`` (``info``'s network): ``RUN/ood_fit.npz`` when it was made from these
    weights, else fitted now from the run's training spots (the DataModule rebuilt from
    ``info.config``, as ``train.py`` built it)."""
    path = Path(info.run_dir) / OOD_FILE
    if path.is_file():
        fit = OODFit.load(path)
        if fit.weights_sha256 == weights_digest(net):
            return fit
        log.info("%s was fitted for other weights than %s; fitting again from the training spots", path, info.checkpoint)
    cfg = info.config
    missing = [k for k in ("data", "target", "sampler", "split") if not isinstance(cfg.get(k), dict) or
               (k != "split" and "_target_" not in cfg[k])]
    if missing:
        raise InferenceError(
            f"ood=true: run {info.run_dir} has no {OOD_FILE} for {Path(info.checkpoint).name} and its config lacks "
            f"{missing} to rebuild its training spots; pass ood=false")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = OmegaConf.create(cfg)
    log.info("fitting the out-of-distribution score on the training spots of %s", info.run_dir)
    datamodule = instantiate(conf.data, target=conf.target, sampler=conf.sampler, split=conf.split,
                             seed=conf.get("seed", 0), _recursive_=False, num_workers=0, persistent_workers=False,
                             pin_memory=False)
    return fit_training_spots(net, datamodule, device)

"""The features + ridge baseline (``model=ridge``): what a deep model must beat.

Hand-made features of the same CT patch a network sees, in 2D (the central slice) and in 3D
(the whole patch depth): intensity statistics, the local air fraction in discs/cylinders of
several radii around the spot, gradient magnitude, and texture (Laplacian energy, local
standard deviation). Features are standardised and a ridge regression per target (scikit-learn
``RidgeCV``, its penalty chosen by efficient leave-one-out on the training spots) maps them to
the targets. It is fitted once on the training spots (no augmentation, no epochs) and evaluated
by the same code as the networks (``xpression.training.train``).

It is an ``nn.Module`` so the training, evaluation and inference code treat it like a network:
``forward`` takes the ``(B, 1, D, H, W)`` batch tensor and it has a ``patch_shape``; the scaler
and the ridge coefficients are frozen tensors. :meth:`RidgeBaseline.save_checkpoint` writes a
checkpoint with its :class:`~xpression.data.input_spec.InputSpec`, which ``infer.py`` sweeps
(``mode=patch``) like any other model's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from xpression.data.input_spec import INPUT_SPEC_KEY, InputSpec
from xpression.data.kinds import get_kind
from xpression.data.patches import image_to_float
from xpression.data.registration import SPOT_RADIUS_UM
from xpression.models.targets import as_target_spec
from xpression.runfolder import RUN_CONFIG_KEY

__all__ = ["RidgeBaseline", "patch_features"]

log = logging.getLogger(__name__)


def _disc(hw: tuple[int, int], radius_vox: float) -> np.ndarray:
    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    return (yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= radius_vox**2


def _stats(x: np.ndarray) -> list[np.ndarray]:
    """Mean, sd and the 10/50/90th percentiles over all but the first axis."""
    flat = x.reshape(len(x), -1)
    return [flat.mean(1), flat.std(1), *np.percentile(flat, [10, 50, 90], axis=1)]


def patch_features(patches: np.ndarray, voxel_size_um: Sequence[float], radii_um: Sequence[float],
                   air_threshold: float) -> np.ndarray:
    """``(B, D, H, W)`` normalised patches ([0, 1]) -> ``(B, F)`` features.

    ``voxel_size_um``: (z, y, x) voxel size (um) of the patches; ``radii_um``: in-plane radii
    (um) of the air-fraction discs (clipped to the patch); ``air_threshold``: normalised
    intensity below which a voxel counts as air.
    """
    x = np.asarray(patches, np.float32)
    b, d, h, w = x.shape
    centre = x[:, d // 2]
    feats: list[np.ndarray] = []
    feats += _stats(centre) + _stats(x)
    air = x < air_threshold
    for r_um in radii_um:
        disc = _disc((h, w), min(float(r_um) / float(voxel_size_um[2]), min(h, w) / 2))
        feats.append(air[:, d // 2][:, disc].mean(1))      # 2D: central slice
        feats.append(air[:, :, disc].reshape(b, -1).mean(1))  # 3D: cylinder through the depth
    gy, gx = np.gradient(centre, axis=(1, 2))
    g2 = np.hypot(gy, gx)
    feats += [g2.reshape(b, -1).mean(1), g2.reshape(b, -1).std(1)]
    if d > 1:
        gz, gy3, gx3 = np.gradient(x, axis=(1, 2, 3))
        g3 = np.sqrt(gz**2 + gy3**2 + gx3**2)
        feats += [g3.reshape(b, -1).mean(1), np.abs(gz).reshape(b, -1).mean(1)]
    else:
        feats += [g2.reshape(b, -1).mean(1), np.zeros(b, np.float32)]
    lap = np.stack([ndimage.laplace(c) for c in centre])
    feats.append(np.abs(lap).reshape(b, -1).mean(1))
    local_sd = np.stack([np.sqrt(np.clip(ndimage.uniform_filter(c * c, 5) - ndimage.uniform_filter(c, 5) ** 2, 0, None))
                         for c in centre])
    feats += [local_sd.reshape(b, -1).mean(1), local_sd.reshape(b, -1).std(1)]
    return np.column_stack(feats).astype(np.float64)


class RidgeBaseline(nn.Module):
    """Features of the patch + ridge regression per target.

    Args:
        target_spec: names and kind of the targets (predictions are made valid for the kind:
            compositions are clipped at 0 and rescaled to sum 1).
        patch_shape: ``(D, H, W)`` voxels of the input patch.
        spot_radius_vox: accepted (and unused) so every model is built with the same arguments.
        radii_um: air-fraction disc radii (um).
        air_threshold: normalised intensity below which a voxel is air.
        alphas: ridge penalties tried by leave-one-out on the training spots.
        input_spec: the data's input contract (its voxel size sets the features' um); default:
            the data module's, taken by :meth:`fit`.
    """

    dense_equivalent = False
    output_stride = None

    def __init__(self, target_spec: Any, patch_shape: Sequence[int], spot_radius_vox: float | None = None,
                 radii_um: Sequence[float] = (SPOT_RADIUS_UM, 50.0, 100.0), air_threshold: float = 0.3,
                 alphas: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
                 input_spec: InputSpec | dict | None = None) -> None:
        super().__init__()
        self.target_spec = as_target_spec(target_spec)
        self.patch_shape = tuple(int(s) for s in patch_shape)
        self.radii_um, self.air_threshold = [float(r) for r in radii_um], float(air_threshold)
        self.alphas = [float(a) for a in alphas]
        self.input_spec = InputSpec.from_dict(input_spec) if isinstance(input_spec, dict) else input_spec
        self.alpha: float | None = None
        self.coef = nn.Parameter(torch.zeros(0, dtype=torch.float64), requires_grad=False)  # (T, F)
        self.intercept = nn.Parameter(torch.zeros(0, dtype=torch.float64), requires_grad=False)  # (T,)
        self.register_buffer("feature_mean", torch.zeros(0, dtype=torch.float64))  # (F,) standardisation
        self.register_buffer("feature_scale", torch.zeros(0, dtype=torch.float64))

    @property
    def voxel_size_um(self) -> tuple[float, float, float]:
        if self.input_spec is None:
            raise RuntimeError("RidgeBaseline has no input spec (voxel size); call fit(datamodule) or pass input_spec")
        return self.input_spec.voxel_size_um

    @property
    def fitted(self) -> bool:
        return self.coef.numel() > 0

    def features(self, patches: np.ndarray) -> np.ndarray:
        """``(B, D, H, W)`` -> ``(B, F)`` (see :func:`patch_features`)."""
        return patch_features(patches, self.voxel_size_um, self.radii_um, self.air_threshold)

    def fit(self, datamodule: Any) -> "RidgeBaseline":
        """Fit on the data module's training spots (one pass, no augmentation)."""
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if self.input_spec is None:
            self.input_spec = datamodule.input_spec()
        datamodule.setup("fit")
        train = datamodule.spots["split"].to_numpy() == "train"
        feats, targets = [], []
        for batch in datamodule.predict_dataloader():
            keep = train[batch["index"].numpy()]
            if keep.any():
                feats.append(self.features(image_to_float(batch["image"][keep, 0]).numpy()))
                targets.append(batch["target"][keep].numpy())
        x, y = np.concatenate(feats), np.concatenate(targets)
        pipeline = make_pipeline(StandardScaler(), RidgeCV(alphas=self.alphas)).fit(x, y)
        scaler, ridge = pipeline[0], pipeline[-1]
        self.feature_mean = torch.as_tensor(scaler.mean_, dtype=torch.float64)
        self.feature_scale = torch.as_tensor(scaler.scale_, dtype=torch.float64)
        self.coef = nn.Parameter(torch.as_tensor(np.asarray(ridge.coef_).reshape(y.shape[1], -1), dtype=torch.float64),
                                 requires_grad=False)
        self.intercept = nn.Parameter(torch.as_tensor(np.atleast_1d(ridge.intercept_), dtype=torch.float64),
                                      requires_grad=False)
        self.alpha = float(ridge.alpha_)
        log.info("ridge baseline: %d training spots, %d features, alpha %.3g", len(x), x.shape[1], ridge.alpha_)
        return self

    def predict_patches(self, patches: np.ndarray) -> np.ndarray:
        """``(B, D, H, W)`` normalised patches -> ``(B, T)`` float32 predictions: the standardised
        features times the ridge coefficients (scikit-learn's ``Pipeline.predict``, same numbers)."""
        if not self.fitted:
            raise RuntimeError("RidgeBaseline is not fitted; call fit(datamodule) first")
        x = self.features(patches)
        z = (x - self.feature_mean.cpu().numpy()) / self.feature_scale.cpu().numpy()
        pred = (z @ self.coef.detach().cpu().numpy().T + self.intercept.detach().cpu().numpy()).reshape(len(patches), -1)
        return get_kind(self.target_spec.kind).activate_numpy(pred).astype(np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` (float intensities, or a loader's uint8 levels) -> ``(B, T)``."""
        return torch.from_numpy(self.predict_patches(image_to_float(x[:, 0].detach().cpu()).numpy()))

    # -- checkpoints ---------------------------------------------------------------------------
    def hyper_parameters(self) -> dict:
        return {"target_spec": self.target_spec.to_dict(), "patch_shape": list(self.patch_shape),
                "radii_um": list(self.radii_um), "air_threshold": self.air_threshold, "alphas": list(self.alphas)}

    def save_checkpoint(self, path: str | Path, run_config: dict | None = None) -> Path:
        """A checkpoint ``infer.py`` loads like a network's: weights, constructor arguments, the
        input spec (with this model recorded) and, when given, the run's config."""
        if not self.fitted:
            raise RuntimeError("RidgeBaseline is not fitted; nothing to save")
        spec = self.input_spec.with_model(**{"class": f"{type(self).__module__}.{type(self).__qualname__}",
                                             "family": "ridge", "alpha": self.alpha, "dense_equivalent": False,
                                             "output_stride": None})
        ckpt = {"state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                "hyper_parameters": self.hyper_parameters(), INPUT_SPEC_KEY: spec.to_dict()}
        if run_config is not None:
            ckpt[RUN_CONFIG_KEY] = run_config
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)
        return path

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "RidgeBaseline":
        """The fitted baseline a :meth:`save_checkpoint` dict holds."""
        spec = ckpt.get(INPUT_SPEC_KEY)
        model = cls(**ckpt["hyper_parameters"], input_spec=None if spec is None else InputSpec.from_dict(spec))
        state = ckpt["state_dict"]
        model.coef = nn.Parameter(state["coef"].to(torch.float64), requires_grad=False)
        model.intercept = nn.Parameter(state["intercept"].to(torch.float64), requires_grad=False)
        model.feature_mean, model.feature_scale = state["feature_mean"], state["feature_scale"]
        model.alpha = (spec or {}).get("model", {}).get("alpha")
        return model

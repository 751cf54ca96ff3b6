"""The features + ridge baseline (``model=ridge``): what a deep model must beat.

Hand-made features of the same CT patch a network sees, in 2D (the central slice) and in 3D
(the whole patch depth): intensity statistics, the local air fraction in discs/cylinders of
several radii around the spot, gradient magnitude, and texture (Laplacian energy, local
standard deviation). Features are standardised and a ridge regression per target (scikit-learn
``RidgeCV``, its penalty chosen by efficient leave-one-out on the training spots) maps them to
the targets. It is fitted once on the training spots (no augmentation, no epochs) and evaluated
by the same code as the networks (``xpression.training.train``).

It is an ``nn.Module`` only so the training and evaluation code can treat it like a network:
``forward`` takes the ``(B, 1, D, H, W)`` batch tensor; its coefficients are frozen parameters.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from xpression.models.targets import as_target_spec

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
        target_spec: names and kind of the targets (compositions are clipped at 0 and
            renormalised to sum 1 after the regression).
        patch_shape: ``(D, H, W)`` voxels of the input patch.
        spot_radius_vox: spot radius in in-plane voxels (sets the in-plane voxel size in um).
        radii_um: air-fraction disc radii (um).
        air_threshold: normalised intensity below which a voxel is air.
        alphas: ridge penalties tried by leave-one-out on the training spots.
    """

    def __init__(self, target_spec: Any, patch_shape: Sequence[int], spot_radius_vox: float | None = None,
                 radii_um: Sequence[float] = (27.5, 50.0, 100.0), air_threshold: float = 0.3,
                 alphas: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)) -> None:
        super().__init__()
        self.target_spec = as_target_spec(target_spec)
        self.patch_shape = tuple(int(s) for s in patch_shape)
        in_plane = 27.5 / float(spot_radius_vox) if spot_radius_vox else 1.0
        self.voxel_size_um = (in_plane, in_plane, in_plane)
        self.radii_um, self.air_threshold = [float(r) for r in radii_um], float(air_threshold)
        self.alphas = [float(a) for a in alphas]
        self.model: Any = None
        self.coef = nn.Parameter(torch.zeros(0), requires_grad=False)

    def features(self, patches: np.ndarray) -> np.ndarray:
        """``(B, D, H, W)`` -> ``(B, F)`` (see :func:`patch_features`)."""
        return patch_features(patches, self.voxel_size_um, self.radii_um, self.air_threshold)

    def fit(self, datamodule: Any) -> "RidgeBaseline":
        """Fit on the data module's training spots (one pass, no augmentation)."""
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.voxel_size_um = tuple(float(v) for v in datamodule.voxel_size_um)
        datamodule.setup("fit")
        train = datamodule.spots["split"].to_numpy() == "train"
        feats, targets = [], []
        from xpression.data.datamodule import image_to_float

        for batch in datamodule.predict_dataloader():
            keep = train[batch["index"].numpy()]
            if keep.any():
                feats.append(self.features(image_to_float(batch["image"][keep, 0]).numpy()))
                targets.append(batch["target"][keep].numpy())
        x, y = np.concatenate(feats), np.concatenate(targets)
        self.model = make_pipeline(StandardScaler(), RidgeCV(alphas=self.alphas)).fit(x, y)
        ridge = self.model[-1]
        self.coef = nn.Parameter(torch.as_tensor(np.column_stack([ridge.coef_.reshape(y.shape[1], -1), np.atleast_1d(ridge.intercept_)]),
                                                 dtype=torch.float32), requires_grad=False)
        log.info("ridge baseline: %d training spots, %d features, alpha %.3g", len(x), x.shape[1], ridge.alpha_)
        return self

    def predict_patches(self, patches: np.ndarray) -> np.ndarray:
        """``(B, D, H, W)`` normalised patches -> ``(B, T)`` float32 predictions."""
        if self.model is None:
            raise RuntimeError("RidgeBaseline is not fitted; call fit(datamodule) first")
        pred = self.model.predict(self.features(patches)).reshape(len(patches), -1)
        if self.target_spec.kind == "composition":
            pred = np.clip(pred, 0.0, None)
            pred = pred / np.maximum(pred.sum(1, keepdims=True), 1e-12)
        return pred.astype(np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` (float intensities, or a loader's uint8 levels) -> ``(B, T)``."""
        from xpression.data.datamodule import image_to_float

        return torch.from_numpy(self.predict_patches(image_to_float(x[:, 0].detach().cpu()).numpy()))

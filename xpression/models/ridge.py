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
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from xpression.data.input_spec import InputSpec
from xpression.data.patches import dequantise
from xpression.data.registration import SPOT_RADIUS_UM
from xpression.models.closed_form import ClosedFormModel, map_rows

__all__ = ["RidgeBaseline", "patch_features"]

log = logging.getLogger(__name__)

_CHUNK = 2  # patches per feature call: a 21 x 129 x 129 patch and its gradient buffers fit in cache
_LEVELS = dequantise(np.arange(256, dtype=np.uint8))  # the float32 values of the cache's uint8 levels


def _disc(hw: tuple[int, int], radius_vox: float) -> np.ndarray:
    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    return (yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= radius_vox**2


def _percentiles(flat: np.ndarray, q: Sequence[float], codes: np.ndarray | None = None) -> list[np.ndarray]:
    """``np.percentile(flat, q, axis=1)`` (its default linear method), bit for bit, one
    ``(B,)`` float64 array per ``q``. Only the ranks around each ``q`` are needed: rows that hold
    the cache's 256 uint8 levels only (the patch path's quantised patches) are counted per level
    instead of sorted; other rows are sorted once (numpy partitions along the first axis, which
    on patches of a few hundred distinct levels is several times slower than a full sort).
    ``codes``: the rows' uint8 levels when the caller has them (else they are recognised)."""
    n = flat.shape[1]
    virtual = (n - 1) * np.true_divide(np.asarray(q), 100)  # numpy's virtual index and rounding
    below = np.floor(virtual).astype(np.intp)
    prev, nxt = np.minimum(below, n - 1), np.minimum(below + 1, n - 1)
    gamma = (virtual - below)[:, None]
    codes = _level_codes(flat) if codes is None else codes
    if codes is not None:
        a, b = _ranked_levels(codes, prev), _ranked_levels(codes, nxt)  # (Q, B) float32
        has_nan = np.zeros(len(flat), bool)
    else:
        s = np.sort(flat, axis=1)
        a, b = s[:, prev].T, s[:, nxt].T  # (Q, B) float32
        has_nan = np.isnan(s[:, -1])  # a row with a NaN (sorted last) has NaN percentiles
    diff = b - a
    out = a + diff * gamma  # numpy's lerp: from below, and from above when gamma >= 0.5
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    out[:, has_nan] = np.nan
    return list(out)


def _level_codes(flat: np.ndarray) -> np.ndarray | None:
    """``(B, N)`` uint8 level codes of float32 ``flat`` if every value is one of the 256 cache
    levels exactly (``_LEVELS``, in order), else None."""
    if flat.dtype != np.float32:
        return None
    codes = np.rint(flat * np.float32(255.0))
    if not (codes.min() >= 0 and codes.max() <= 255):  # False for NaN too
        return None
    if not np.array_equal(codes * _LEVELS[1], flat):  # level k is k * _LEVELS[1], as dequantise makes it
        return None
    return codes.astype(np.uint8)


def _ranked_levels(codes: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """``(Q, B)``: the value at each 0-based rank of each row's sorted values, from the rows'
    per-level counts (the levels are increasing, so sorting the codes sorts the values)."""
    counts = np.stack([np.bincount(row, minlength=256) for row in codes])  # (B, 256)
    cumulative = np.cumsum(counts, axis=1)
    index = (cumulative[None, :, :] <= np.asarray(ranks)[:, None, None]).sum(axis=2)  # first level past the rank
    return _LEVELS[index]


def _stats(x: np.ndarray, codes: np.ndarray | None = None) -> list[np.ndarray]:
    """Mean, sd and the 10/50/90th percentiles over all but the first axis (``codes``: ``x``'s
    uint8 levels, if known)."""
    flat = x.reshape(len(x), -1)
    return [flat.mean(1), flat.std(1), *_percentiles(flat, [10, 50, 90], None if codes is None else codes.reshape(len(x), -1))]


def _air_fractions(x: np.ndarray, voxel_size_um: Sequence[float], radii_um: Sequence[float],
                   air_threshold: float) -> list[np.ndarray]:
    """Per radius (um): the air fraction in the disc on the central slice of ``(B, D, H, W)``
    patches and in the cylinder through the depth. Counted per pixel column first (the same
    float64 numbers as the mean of the boolean mask: an exact count over the voxel count)."""
    b, d, h, w = x.shape
    centre_air = x[:, d // 2] < air_threshold
    column_air = np.count_nonzero(x < air_threshold, axis=1)  # (B, H, W) air voxels through the depth
    out: list[np.ndarray] = []
    for r_um in radii_um:
        disc = _disc((h, w), min(float(r_um) / float(voxel_size_um[2]), min(h, w) / 2))
        n = int(disc.sum())
        out.append(np.count_nonzero(centre_air[:, disc], axis=1) / n)  # 2D: central slice
        out.append(column_air[:, disc].sum(1) / (d * n))                # 3D: cylinder through the depth
    return out


def _axis_gradient(x: np.ndarray, axis: int, out: np.ndarray) -> np.ndarray:
    """``np.gradient(x, axis=axis)`` (unit spacing, first-order edges: the same float32
    operations) written into ``out``, without temporaries."""
    def part(start: int | None, stop: int | None) -> tuple[slice, ...]:
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    inner = out[part(1, -1)]
    np.subtract(x[part(2, None)], x[part(None, -2)], out=inner)
    np.divide(inner, 2.0, out=inner)
    np.subtract(x[part(1, 2)], x[part(0, 1)], out=out[part(0, 1)])
    np.subtract(x[part(-1, None)], x[part(-2, -1)], out=out[part(-1, None)])
    return out


def _gradient_3d(x: np.ndarray) -> list[np.ndarray]:
    """Mean 3D gradient magnitude and mean ``|d/dz|`` of ``(B, D, H, W)`` patches (D > 1), as
    ``sqrt(gz**2 + gy**2 + gx**2)`` of ``np.gradient`` (same float32 operations in the same
    order), accumulated in two buffers."""
    b = len(x)
    total, g = _axis_gradient(x, 1, np.empty_like(x)), np.empty_like(x)
    abs_gz = np.abs(total, out=g).reshape(b, -1).mean(1)
    np.square(total, out=total)
    for axis in (2, 3):
        total += np.square(_axis_gradient(x, axis, g), out=g)
    return [np.sqrt(total, out=total).reshape(b, -1).mean(1), abs_gz]


def patch_features(patches: np.ndarray, voxel_size_um: Sequence[float], radii_um: Sequence[float],
                   air_threshold: float, threads: int | None = None) -> np.ndarray:
    """``(B, D, H, W)`` normalised patches ([0, 1], or the cache's uint8 levels) -> ``(B, F)`` features.

    ``voxel_size_um``: (z, y, x) voxel size (um) of the patches; ``radii_um``: in-plane radii
    (um) of the air-fraction discs (clipped to the patch); ``air_threshold``: normalised
    intensity below which a voxel counts as air; ``threads``: blocks of rows computed at once
    (:func:`~xpression.models.closed_form.map_rows`; default: torch's CPU threads), each in
    chunks of ``_CHUNK`` patches. Each row depends on its own patch only, so the numbers do not
    depend on the chunks or the threads, and uint8 levels give those of their float32 values.
    """
    x = np.asarray(patches)
    x = x if x.dtype == np.uint8 else np.asarray(x, np.float32)

    def rows(block: np.ndarray) -> np.ndarray:
        return np.concatenate([_chunk_features(block[i : i + _CHUNK], voxel_size_um, radii_um, air_threshold)
                               for i in range(0, len(block), _CHUNK)])

    return map_rows(rows, x, threads)


def _chunk_features(patches: np.ndarray, voxel_size_um: Sequence[float], radii_um: Sequence[float],
                    air_threshold: float) -> np.ndarray:
    """:func:`patch_features` of a few patches at once (their buffers stay in cache)."""
    codes = patches if patches.dtype == np.uint8 else None  # the levels the percentiles count
    x = np.ascontiguousarray(dequantise(patches))
    b, d, h, w = x.shape
    centre = x[:, d // 2]
    feats: list[np.ndarray] = []
    feats += _stats(centre, None if codes is None else codes[:, d // 2]) + _stats(x, codes)
    feats += _air_fractions(x, voxel_size_um, radii_um, air_threshold)
    gy, gx = np.gradient(centre, axis=(1, 2))
    g2 = np.hypot(gy, gx)
    feats += [g2.reshape(b, -1).mean(1), g2.reshape(b, -1).std(1)]
    if d > 1:
        feats += _gradient_3d(x)
    else:
        feats += [g2.reshape(b, -1).mean(1), np.zeros(b, np.float32)]
    lap = np.stack([ndimage.laplace(c) for c in centre])
    feats.append(np.abs(lap).reshape(b, -1).mean(1))
    local_sd = np.stack([np.sqrt(np.clip(ndimage.uniform_filter(c * c, 5) - ndimage.uniform_filter(c, 5) ** 2, 0, None))
                         for c in centre])
    feats += [local_sd.reshape(b, -1).mean(1), local_sd.reshape(b, -1).std(1)]
    return np.column_stack(feats).astype(np.float64)


class RidgeBaseline(ClosedFormModel):
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

    family = "ridge"

    def __init__(self, target_spec: Any, patch_shape: Sequence[int], spot_radius_vox: float | None = None,
                 radii_um: Sequence[float] = (SPOT_RADIUS_UM, 50.0, 100.0), air_threshold: float = 0.3,
                 alphas: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
                 input_spec: InputSpec | dict | None = None) -> None:
        super().__init__(target_spec, patch_shape, input_spec)
        self.radii_um, self.air_threshold = [float(r) for r in radii_um], float(air_threshold)
        self.alphas = [float(a) for a in alphas]
        self.alpha: float | None = None
        self.coef = nn.Parameter(torch.zeros(0, dtype=torch.float64), requires_grad=False)  # (T, F)
        self.intercept = nn.Parameter(torch.zeros(0, dtype=torch.float64), requires_grad=False)  # (T,)
        self.register_buffer("feature_mean", torch.zeros(0, dtype=torch.float64))  # (F,) standardisation
        self.register_buffer("feature_scale", torch.zeros(0, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return self.coef.numel() > 0

    def as_views(self, patches: np.ndarray) -> np.ndarray:
        """As :meth:`ClosedFormModel.as_views`, but the cache's uint8 levels stay levels: the
        features count them for their percentiles (the same numbers as from their float32 values)."""
        patches = np.asarray(patches)
        return patches[:, None] if patches.ndim == 4 else patches

    def features(self, views: np.ndarray) -> np.ndarray:
        """``(B, C, D, H, W)`` -> ``(B, F)`` from the patch (see :func:`patch_features`; a context
        view, if the data has one, is not read)."""
        return patch_features(views[:, 0], self.voxel_size_um, self.radii_um, self.air_threshold)

    def fit_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

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

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """The standardised features times the ridge coefficients (scikit-learn's
        ``Pipeline.predict``, same numbers)."""
        z = (x - self.feature_mean.cpu().numpy()) / self.feature_scale.cpu().numpy()
        return z @ self.coef.detach().cpu().numpy().T + self.intercept.detach().cpu().numpy()

    def hyper_parameters(self) -> dict:
        return {**super().hyper_parameters(), "radii_um": list(self.radii_um), "air_threshold": self.air_threshold,
                "alphas": list(self.alphas)}

    def model_record(self) -> dict:
        return {"alpha": self.alpha}

    def restore_record(self, record: dict) -> None:
        self.alpha = record.get("alpha")

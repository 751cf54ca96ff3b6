"""ST image pixels -> CT in-plane um: a least-squares 2D affine fitted to BigWarp landmarks.

BigWarp CSV (no header): ``name, enabled, fixed_x, fixed_y, moving_x, moving_y`` where *moving*
is the ST full-resolution image (px, x/y) and *fixed* the section's CT frame ``(u, v)`` in um.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpression.data.geometry import DataError

__all__ = ["Landmarks", "AffineFit", "read_landmarks", "fit_affine", "register_section"]

log = logging.getLogger(__name__)

SPOT_RADIUS_UM = 27.5


@dataclass(frozen=True)
class Landmarks:
    """Landmark pairs from one BigWarp CSV; ``moving`` px (N, 2) and ``fixed`` um (N, 2), x/y order."""

    path: Path
    names: list[str]
    enabled: np.ndarray
    moving_px: np.ndarray
    fixed_um: np.ndarray


@dataclass(frozen=True)
class AffineFit:
    """``uv = matrix @ [px_x, px_y, 1]``; residuals of the enabled landmarks in um."""

    matrix: np.ndarray
    rms_um: float
    max_um: float
    n_landmarks: int

    def apply(self, px_xy: np.ndarray) -> np.ndarray:
        """(N, 2) ST pixels (x, y) -> (N, 2) CT in-plane ``(u, v)`` um."""
        px = np.asarray(px_xy, dtype=float).reshape(-1, 2)
        return px @ self.matrix[:, :2].T + self.matrix[:, 2]

    @property
    def um_per_px(self) -> float:
        """Mean isotropic scale, sqrt(|det|) um per ST pixel."""
        return float(np.sqrt(abs(np.linalg.det(self.matrix[:, :2]))))


def _as_bool(text: str) -> bool | None:
    t = text.strip().lower()
    return True if t in ("true", "1", "yes") else False if t in ("false", "0", "no") else None


def read_landmarks(path: str | Path) -> Landmarks:
    """Parse a BigWarp landmark CSV; raises :class:`DataError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "landmark file not found")
    names, enabled, rows = [], [], []
    try:
        with path.open(newline="") as fh:
            for i, row in enumerate(csv.reader(fh), start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) < 6:
                    raise DataError(path, f"line {i}: expected 6 columns (name, enabled, fixed_x, fixed_y, moving_x, moving_y), got {len(row)}")
                flag = _as_bool(row[1])
                if flag is None:
                    raise DataError(path, f"line {i}: 'enabled' must be true/false, got {row[1]!r}")
                try:
                    rows.append([float(c) for c in row[2:6]])
                except ValueError:
                    raise DataError(path, f"line {i}: coordinates are not numbers: {row[2:6]}") from None
                names.append(row[0].strip())
                enabled.append(flag)
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read landmark file ({err})") from err
    arr = np.asarray(rows, dtype=float).reshape(-1, 4)
    if not np.all(np.isfinite(arr)):
        raise DataError(path, "landmark coordinates contain NaN or inf")
    return Landmarks(path, names, np.asarray(enabled, dtype=bool), arr[:, 2:4], arr[:, 0:2])


def fit_affine(moving_px: np.ndarray, fixed_um: np.ndarray, where: object = None) -> AffineFit:
    """Least-squares affine ``fixed ~ A @ moving + t``; needs 3+ non-collinear points."""
    src = np.asarray(moving_px, dtype=float).reshape(-1, 2)
    dst = np.asarray(fixed_um, dtype=float).reshape(-1, 2)
    if len(src) < 3:
        raise DataError(where, f"too few enabled landmarks: {len(src)} (an affine needs at least 3)")
    design = np.hstack([src, np.ones((len(src), 1))])
    centred = src - src.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    if s[1] <= 1e-6 * max(s[0], 1e-12):
        raise DataError(where, f"degenerate landmarks: the {len(src)} enabled ST points are collinear")
    sol, *_ = np.linalg.lstsq(design, dst, rcond=None)
    matrix = sol.T  # (2, 3)
    res = np.linalg.norm(design @ sol - dst, axis=1)
    if abs(np.linalg.det(matrix[:, :2])) < 1e-12:
        raise DataError(where, "degenerate landmarks: the fitted affine is singular")
    return AffineFit(matrix, float(np.sqrt(np.mean(res**2))), float(res.max()), len(src))


def register_section(path: str | Path, max_residual_um: float = SPOT_RADIUS_UM) -> AffineFit:
    """Read a landmark CSV, fit the affine on the enabled pairs and check its residual.

    Raises :class:`DataError` when fewer than 3 landmarks are enabled, they are collinear, or
    the largest residual exceeds ``max_residual_um`` (default: one Visium spot radius).
    """
    lm = read_landmarks(path)
    fit = fit_affine(lm.moving_px[lm.enabled], lm.fixed_um[lm.enabled], where=lm.path)
    log.info("%s: affine from %d landmarks, residual RMS %.2f um, max %.2f um", lm.path.name, fit.n_landmarks, fit.rms_um, fit.max_um)
    if fit.max_um > max_residual_um:
        raise DataError(
            lm.path,
            f"landmark residual too large: max {fit.max_um:.2f} um, RMS {fit.rms_um:.2f} um "
            f"> bound {max_residual_um:g} um (check or disable outlying landmarks)",
        )
    return fit

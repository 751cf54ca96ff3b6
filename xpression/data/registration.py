"""ST image pixels -> CT micrometres: a least-squares affine fitted to BigWarp landmarks.

What the user did in BigWarp is declared per section in the manifest (:class:`Declaration`):
which image was *moving* (``st``, BigWarp practice, or ``ct``), in which ST image the ST points
were clicked (``fullres``, ``hires`` or ``lowres`` pixels, converted with the section's
scale factors) and the CT side's units (``um`` for a calibrated image, or ``px``, voxels of the
volume). A 2D table gives each landmark's in-plane CT ``(u, v)`` on the manifest's plane; a 3D
table gives the CT ``(x, y, z)``, and the plane is fitted to those points when the manifest gives
none. The fit is then checked against what the ST platform guarantees: registered spots must be
one spot pitch apart (Visium: 100 um), which catches a wrong declaration before training.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xpression.data.bigwarp import BigWarpLandmarks, read_landmarks
from xpression.data.geometry import DataError, Plane
from xpression.data.manifest import LANDMARKS_CT_UNITS, LANDMARKS_MOVING, LANDMARKS_ST_SPACE, VISIUM_PITCH_UM

__all__ = [
    "AffineFit", "Declaration", "Registration", "fit_affine", "read_landmarks", "register_landmarks",
    "register_section", "spot_pitch_um", "SPOT_RADIUS_UM", "VISIUM_PITCH_UM", "PITCH_TOLERANCE",
]

log = logging.getLogger(__name__)

SPOT_RADIUS_UM = 27.5
PITCH_TOLERANCE = 0.15  # relative: a scale error this small is no declaration mistake
_SCALEF = {"hires": "tissue_hires_scalef", "lowres": "tissue_lowres_scalef"}


@dataclass(frozen=True)
class Declaration:
    """How a landmark table was made: the manifest keys ``landmarks_moving``,
    ``landmarks_st_space`` and ``landmarks_ct_units``."""

    moving: str = "st"
    st_space: str = "fullres"
    ct_units: str = "um"

    @classmethod
    def of(cls, entry: Any) -> "Declaration":
        """The declaration of a manifest ``SectionEntry`` (defaults where it has none)."""
        return cls(*(getattr(entry, f"landmarks_{k}", d) for k, d in (("moving", "st"), ("st_space", "fullres"), ("ct_units", "um"))))

    def differs(self, other: "Declaration") -> str:
        """The manifest lines that turn ``other`` into this declaration."""
        return ", ".join(f"landmarks_{k}: {getattr(self, k)}" for k in ("moving", "st_space", "ct_units")
                         if getattr(self, k) != getattr(other, k))


@dataclass(frozen=True)
class AffineFit:
    """``uv = matrix @ [px_x, px_y, 1]``; residuals of the fitted landmarks in um."""

    matrix: np.ndarray
    rms_um: float
    max_um: float
    n_landmarks: int

    def apply(self, px_xy: np.ndarray) -> np.ndarray:
        """(N, 2) ST pixels (x, y) -> (N, 2) CT in-plane ``(u, v)`` um."""
        px = np.asarray(px_xy, dtype=float).reshape(-1, 2)
        return px @ self.matrix[:, :2].T + self.matrix[:, 2]

    @property
    def determinant(self) -> float:
        """Determinant of the linear part (um^2 per px^2); negative for a mirrored fit."""
        return float(np.linalg.det(self.matrix[:, :2]))

    @property
    def um_per_px(self) -> float:
        """Mean isotropic scale, sqrt(|det|) um per ST pixel."""
        return float(np.sqrt(abs(self.determinant)))


def fit_affine(st_px: np.ndarray, ct_um: np.ndarray, where: object = None) -> AffineFit:
    """Least-squares affine ``ct ~ A @ st + t`` from (N, 2) point pairs; needs 3+ non-collinear points."""
    src = np.asarray(st_px, dtype=float).reshape(-1, 2)
    dst = np.asarray(ct_um, dtype=float).reshape(-1, 2)
    if len(src) < 3:
        raise DataError(where, f"too few active landmarks: {len(src)} (an affine needs at least 3)")
    design = np.hstack([src, np.ones((len(src), 1))])
    s = np.linalg.svd(src - src.mean(axis=0), compute_uv=False)
    if s[1] <= 1e-6 * max(s[0], 1e-12):
        raise DataError(where, f"degenerate landmarks: the {len(src)} active ST points are collinear")
    sol, *_ = np.linalg.lstsq(design, dst, rcond=None)
    matrix = sol.T  # (2, 3)
    if abs(np.linalg.det(matrix[:, :2])) < 1e-12:
        raise DataError(where, "degenerate landmarks: the fitted affine is singular")
    res = np.linalg.norm(design @ sol - dst, axis=1)
    return AffineFit(matrix, float(np.sqrt(np.mean(res**2))), float(res.max()), len(src))


@dataclass(frozen=True)
class Registration:
    """One section's landmark registration.

    ``st_px`` (N, 2) full-resolution ST pixels and ``ct_uv_um`` (N, 2) in-plane CT um of the
    active landmarks ``names``; ``off_plane_um`` (N,) their CT distance from ``plane`` (3D tables);
    ``pitch_um`` the registered spots' median nearest-neighbour distance (None if not measured).
    """

    path: Path
    declaration: Declaration
    names: tuple[str, ...]
    n_rows: int
    st_px: np.ndarray
    ct_uv_um: np.ndarray
    off_plane_um: np.ndarray
    affine: AffineFit
    plane: Plane
    plane_from_landmarks: bool
    warnings: tuple[str, ...] = ()
    pitch_um: float | None = None
    expected_pitch_um: float | None = None

    @property
    def residual_um(self) -> np.ndarray:
        """(N,) distance of each landmark's CT point from where the fit puts its ST point (um),
        out-of-plane offset included."""
        inplane = np.linalg.norm(self.affine.apply(self.st_px) - self.ct_uv_um, axis=1)
        return np.hypot(inplane, self.off_plane_um)

    @property
    def rms_um(self) -> float:
        return float(np.sqrt(np.mean(self.residual_um**2)))

    @property
    def worst(self) -> tuple[str, float]:
        """The landmark with the largest residual and that residual (um)."""
        i = int(np.argmax(self.residual_um))
        return self.names[i], float(self.residual_um[i])

    @property
    def tilt_deg(self) -> float:
        """Angle between the section plane's normal and the CT z axis (degrees)."""
        return plane_tilt_deg(self.plane)


def plane_tilt_deg(plane: Plane) -> float:
    """Angle between ``plane``'s normal and the z axis, in degrees (0 for an axial plane)."""
    return float(np.degrees(np.arccos(min(1.0, abs(float(plane.n[0]))))))


def _scalefactor(scalefactors: dict | None, st_space: str, where: object) -> float:
    if st_space == "fullres":
        return 1.0
    key = _SCALEF[st_space]
    try:
        value = float((scalefactors or {})[key])
    except (KeyError, TypeError, ValueError):
        raise DataError(where, f"landmarks_st_space: {st_space} needs uns['spatial'][library]['scalefactors']['{key}'], "
                               "which the ST data lacks") from None
    if not value > 0:
        raise DataError(where, f"scalefactors['{key}'] must be positive, got {value!r}")
    return value


def _ct_um(points: np.ndarray, ct_units: str, voxel_size_um: Sequence[float] | None, where: object) -> np.ndarray:
    """CT points in BigWarp's (x, y[, z]) order -> um, same order."""
    if ct_units == "um":
        return points
    if voxel_size_um is None:
        raise DataError(where, "landmarks_ct_units: px needs the volume's voxel size")
    vz, vy, vx = (float(v) for v in voxel_size_um)
    return points * np.array([vx, vy, vz][: points.shape[1]])


def _plane_summary(points_zyx: np.ndarray) -> str:
    try:
        own = Plane.from_points(points_zyx)
    except DataError:
        return f"their mean z is {points_zyx[:, 0].mean():.1f} um"
    return f"they lie on a plane through z = {points_zyx[:, 0].mean():.1f} um tilted {plane_tilt_deg(own):.1f} deg"


def register_landmarks(
    landmarks: BigWarpLandmarks,
    declaration: Declaration = Declaration(),
    *,
    plane: Plane | None = None,
    scalefactors: dict | None = None,
    voxel_size_um: Sequence[float] | None = None,
    max_off_plane_um: float = SPOT_RADIUS_UM,
    where_plane: str = "z_um/plane",
) -> Registration:
    """Fit the affine of a BigWarp table as ``declaration`` says it was made.

    ``plane``: the manifest's section plane; required for a 2D table, optional for a 3D one (fitted
    to the landmarks' CT points when None, else they must lie within ``max_off_plane_um`` of it).
    ``scalefactors``: the section's ``uns['spatial'][lib]['scalefactors']`` (for hires/lowres).
    ``voxel_size_um``: the volume's (z, y, x) voxel size (for ``ct_units: px``).
    """
    path = landmarks.path
    used = landmarks.used()
    st_raw, ct_raw = (used.moving, used.fixed) if declaration.moving == "st" else (used.fixed, used.moving)
    st_px = st_raw[:, :2] / _scalefactor(scalefactors, declaration.st_space, path)
    ct = _ct_um(ct_raw, declaration.ct_units, voxel_size_um, path)
    from_landmarks = False
    if landmarks.ndim == 2:
        if plane is None:
            raise DataError(path, "a 2D landmark table carries no CT z: give the section's z_um or plane in the manifest")
        uv, off = ct, np.zeros(len(ct))
    else:
        zyx = ct[:, ::-1]
        if plane is None:
            if len(zyx) < 3:
                raise DataError(path, f"too few active landmarks: {len(zyx)} (a plane and an affine need at least 3)")
            plane, from_landmarks = Plane.from_points(zyx, where=path), True
        uvw = plane.to_uvw(zyx)
        uv, off = uvw[:, :2], uvw[:, 2]
        far = int(np.argmax(np.abs(off)))
        if not from_landmarks and abs(off[far]) > max_off_plane_um:
            raise DataError(
                path,
                f"landmark {used.names[far]!r} lies {abs(off[far]):.1f} um from the section plane given by "
                f"{where_plane} (bound {max_off_plane_um:g} um); {_plane_summary(zyx)}: correct z_um/plane, "
                "or remove it to use the landmarks' own plane",
            )
    fit = fit_affine(st_px, uv, where=path)
    warnings = []
    if len(used.names) == 3:
        warnings.append("only 3 active landmarks: an affine passes through any 3 points exactly, so the residual "
                        "check cannot see a misplaced one (place 6 or more)")
    if fit.determinant < 0:
        warnings.append("the fit mirrors the ST image (negative determinant): right if the section lies face-down "
                        "relative to the CT, otherwise x and y of one side are swapped")
    return Registration(path, declaration, used.names, len(landmarks.names), st_px, uv, off, fit, plane,
                        from_landmarks, tuple(warnings))


def spot_pitch_um(uv_um: np.ndarray) -> float | None:
    """Median nearest-neighbour distance of (N, 2) spot positions (um); None for < 2 spots."""
    from scipy.spatial import cKDTree

    pts = np.asarray(uv_um, dtype=float).reshape(-1, 2)
    if len(pts) < 2:
        return None
    dist, _ = cKDTree(pts).query(pts, k=2)
    return float(np.median(dist[:, 1]))


def _pitch_ok(measured: float | None, expected: float) -> bool:
    return measured is None or abs(measured - expected) <= PITCH_TOLERANCE * expected


def _alternatives(landmarks: BigWarpLandmarks, current: Declaration, spots_px: np.ndarray, expected: float,
                  **kw: Any) -> list[str]:
    """Declarations under which the spots would be ``expected`` apart, as manifest lines, closest first."""
    hits = []
    for combo in itertools.product(LANDMARKS_MOVING, LANDMARKS_ST_SPACE, LANDMARKS_CT_UNITS):
        other = Declaration(*combo)
        if other == current:
            continue
        try:
            reg = register_landmarks(landmarks, other, **kw)
        except DataError:
            continue
        pitch = spot_pitch_um(reg.affine.apply(spots_px))
        if pitch is not None and _pitch_ok(pitch, expected):
            hits.append((abs(pitch - expected), f"with {other.differs(current)} they would be {pitch:.1f} um apart"))
    return [text for _, text in sorted(hits)]  # the closest first


def register_section(
    landmarks_path: str | Path,
    spots_px: np.ndarray,
    declaration: Declaration = Declaration(),
    *,
    plane: Plane | None = None,
    scalefactors: dict | None = None,
    voxel_size_um: Sequence[float] | None = None,
    spot_pitch: float | None = VISIUM_PITCH_UM,
    max_residual_um: float = SPOT_RADIUS_UM,
    where_plane: str = "z_um/plane",
    section_id: str | None = None,
) -> Registration:
    """Read a BigWarp table, fit it as declared and check the result before anything is trained.

    ``spots_px``: (N, 2) full-resolution spot centres of the section. Raises :class:`DataError`
    (naming the landmark file) when the registered spots are not ``spot_pitch`` um apart within
    15 % (None skips the check; the message names the likely wrong key), or when the largest
    landmark residual exceeds ``max_residual_um`` (default: one Visium spot radius). Warnings
    (3 landmarks, a mirrored fit) are logged and kept on the result.
    """
    landmarks = read_landmarks(landmarks_path)
    kw = dict(plane=plane, scalefactors=scalefactors, voxel_size_um=voxel_size_um,
              max_off_plane_um=max_residual_um, where_plane=where_plane)
    reg = register_landmarks(landmarks, declaration, **kw)
    label = f"section {section_id}: " if section_id else ""
    if spot_pitch is not None:
        measured = spot_pitch_um(reg.affine.apply(spots_px))
        reg = replace(reg, pitch_um=measured, expected_pitch_um=float(spot_pitch))
        if not _pitch_ok(measured, spot_pitch):
            hints = _alternatives(landmarks, declaration, spots_px, spot_pitch, **kw)
            raise DataError(
                reg.path,
                f"{label}the registered spots are {measured:.1f} um apart (median nearest neighbour), expected "
                f"{spot_pitch:g} um +- {PITCH_TOLERANCE:.0%} (spot_pitch_um): the landmark declaration does not match "
                f"the file. Likely causes: moving and fixed swapped (landmarks_moving, now {declaration.moving}), "
                f"ST points in hires/lowres instead of full-resolution pixels (landmarks_st_space, now "
                f"{declaration.st_space}), CT side in voxels instead of um (landmarks_ct_units, now "
                f"{declaration.ct_units})" + (f"; {'; '.join(hints)}" if hints else ""),
            )
    worst, worst_um = reg.worst
    log.info("%s%s: affine from %d of %d landmarks, residual RMS %.2f um, worst %s %.2f um%s", label, reg.path.name,
             len(reg.names), reg.n_rows, reg.rms_um, worst, worst_um,
             f", plane fitted to the landmarks, tilt {reg.tilt_deg:.2f} deg" if reg.plane_from_landmarks else "")
    if worst_um > max_residual_um:
        raise DataError(
            reg.path,
            f"{label}landmark residual too large: {worst!r} is {worst_um:.2f} um off (RMS {reg.rms_um:.2f} um) "
            f"> bound {max_residual_um:g} um (check or deactivate outlying landmarks)",
        )
    for message in reg.warnings:
        log.warning("%s%s: %s", label, reg.path.name, message)
    return reg

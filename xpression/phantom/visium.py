"""Visium simulation: spot grid, true programs, counts, H&E-like images, landmarks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from scipy.ndimage import map_coordinates

if TYPE_CHECKING:
    import anndata

    from .phantom import Phantom

SLIDE_RGB = np.array([246.0, 242.0, 244.0])
STAIN_RGB = np.array([168.0, 72.0, 150.0])  # dense eosin/haematoxylin mix


@dataclass
class SectionResult:
    adata: "anndata.AnnData"
    landmarks: list[list[Any]]  # BigWarp rows: name, active, moving x, y (ST full-res px), fixed x, y (CT um)


def affine_apply(affine: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine to (N, 2) points."""
    a = np.asarray(affine, np.float64)
    return np.asarray(xy, np.float64) @ a[:, :2].T + a[:, 2]


def affine_inverse(affine: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine, as a 2x3 affine."""
    a = np.asarray(affine, np.float64)
    lin = np.linalg.inv(a[:, :2])
    return np.hstack([lin, -(lin @ a[:, 2])[:, None]])


def displacement(modes: list[list[float]], uv: np.ndarray) -> np.ndarray:
    """The section's smooth in-plane warp (N, 2) um at CT plane points (u, v) = (x, y) um."""
    uv = np.asarray(uv, np.float64)
    out = np.zeros_like(uv)
    for ku, kv, phase, amp_u, amp_v in modes:
        c = np.cos(uv[:, 0] * ku + uv[:, 1] * kv + phase)
        out[:, 0] += amp_u * c
        out[:, 1] += amp_v * c
    return out


def st_from_ct(sec: dict[str, Any], uv: np.ndarray) -> np.ndarray:
    """ST full-res px (x, y) of the tissue at CT plane points (u, v) um: the section's affine
    after its non-affine warp (none unless the preset sets deformation_um)."""
    uv = np.asarray(uv, np.float64)
    modes = sec.get("deformation") or []
    return affine_apply(sec["st_affine"], uv + displacement(modes, uv) if modes else uv)


def ct_from_st(sec: dict[str, Any], px: np.ndarray) -> np.ndarray:
    """Inverse of :func:`st_from_ct`: CT plane points (u, v) um of ST px (x, y).

    The warp is a contraction (gradient well below 1), so the fixed-point iteration
    uv = s - displacement(uv) converges to machine precision in a few steps.
    """
    s = affine_apply(affine_inverse(sec["st_affine"]), px)
    modes = sec.get("deformation") or []
    uv = s
    for _ in range(50 if modes else 0):
        new = s - displacement(modes, uv)
        if np.abs(new - uv).max(initial=0.0) < 1e-9:
            return new
        uv = new
    return uv


def spot_grid(sec: dict[str, Any], pitch_um: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hexagonal spot grid over the ST image: (array_row, array_col, px (N, 2) x, y).

    Visium convention: rows are pitch*sqrt(3)/2 apart, array_col steps by 2 along a row
    (pitch/2 per unit) and odd rows use odd columns.
    """
    w, h = sec["st_image_size_px"]
    pitch_px = pitch_um * sec["st_scale_px_per_um"]
    x0, y0 = rng.uniform(0, pitch_px, 2)
    rows = np.arange(int((h - y0) / (pitch_px * math.sqrt(3) / 2)) + 1)
    cols = np.arange(int((w - x0) / (pitch_px / 2)) + 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    keep = (rr % 2) == (cc % 2)
    rr, cc = rr[keep], cc[keep]
    px = np.column_stack([x0 + cc * pitch_px / 2, y0 + rr * pitch_px * math.sqrt(3) / 2])
    return rr, cc, px


def section_density(ph: "Phantom", vid: str, z_um: float) -> np.ndarray:
    """Stain density in [0, 1] on the section plane at CT voxel spacing (y, x); 0 off tissue."""
    vol = ph.volume(vid)
    _, ny, nx = vol["shape"]
    vox = vol["voxel_size_um"]
    yy, xx = np.meshgrid(np.arange(ny) * vox[1], np.arange(nx) * vox[2], indexing="ij")
    pts = np.column_stack([np.full(yy.size, z_um), yy.ravel(), xx.ravel()])
    att = ph.attenuation_at(vid, pts)
    a = ph.spec["attenuation"]
    dens = np.clip((att - a["air"]) / (a["tissue"] - a["air"]), 0.0, 1.0)
    dens[ph.organ_sd(vid, pts) > 0] = 0.0
    return dens.reshape(ny, nx)


def render_st_image(density: np.ndarray, vox: list[float], sec: dict[str, Any],
                    size_px: list[int], scalef: float) -> np.ndarray:
    """H&E-like RGB uint8 image of the section in ST image space at scalef x full-res."""
    w, h = (max(1, int(math.ceil(s * scalef))) for s in size_px)
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    full = np.column_stack([xx.ravel(), yy.ravel()]) / scalef
    uv = ct_from_st(sec, full)
    d = map_coordinates(density, [uv[:, 1] / vox[1], uv[:, 0] / vox[2]], order=1, cval=0.0)
    rgb = SLIDE_RGB - d[:, None] * (SLIDE_RGB - STAIN_RGB)
    return np.rint(rgb).astype(np.uint8).reshape(h, w, 3)


def _barcodes(rng: np.random.Generator, n: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        bc = "".join("ACGT"[i] for i in rng.integers(0, 4, 16)) + "-1"
        if bc not in seen:
            seen.add(bc)
            out.append(bc)
    return out


def _landmarks(ph: "Phantom", vid: str, sec: dict[str, Any], rng: np.random.Generator) -> list[list[Any]]:
    prm = ph.spec["params"]
    vol = ph.volume(vid)
    ext = [(n - 1) * v for n, v in zip(vol["shape"], vol["voxel_size_um"])]
    cand = rng.uniform([0, 0], [ext[2], ext[1]], (600, 2))  # (u, v) = (x, y)
    sd = ph.organ_sd(vid, np.column_stack([np.full(len(cand), sec["z_um"]), cand[:, 1], cand[:, 0]]))
    cand = cand[sd < -30.0]
    chosen = [int(rng.integers(len(cand)))]
    dist = np.linalg.norm(cand - cand[chosen[0]], axis=1)
    while len(chosen) < min(prm["n_landmarks"], len(cand)):
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(cand - cand[i], axis=1))
    true = cand[chosen]
    fixed = true + rng.normal(0.0, prm["landmark_error_um"], true.shape)
    moving = st_from_ct(sec, true) + rng.normal(0.0, 0.5, true.shape)
    return [[f"Pt-{i}", True, *map(float, moving[i]), *map(float, fixed[i])] for i in range(len(true))]


def simulate_section(ph: "Phantom", vid: str, sec: dict[str, Any], rng: np.random.Generator) -> SectionResult:
    """Spots over tissue, their true programs, NB counts, images and landmarks."""
    import anndata
    import pandas as pd

    prm = ph.spec["params"]
    vol = ph.volume(vid)
    vox = vol["voxel_size_um"]
    ext = [(n - 1) * v for n, v in zip(vol["shape"], vox)]
    z = float(sec["z_um"])
    radius = 0.5 * prm["spot_diameter_um"]
    rows, cols, px = spot_grid(sec, prm["spot_pitch_um"], rng)
    px = np.rint(px)
    uv = ct_from_st(sec, px)
    inside = (uv[:, 0] >= radius) & (uv[:, 0] <= ext[2] - radius) & (uv[:, 1] >= radius) & (uv[:, 1] <= ext[1] - radius)
    rows, cols, px, uv = rows[inside], cols[inside], px[inside], uv[inside]
    ct = np.column_stack([np.full(len(uv), z), uv[:, 1], uv[:, 0]])
    tissue = ph.organ_sd(vid, ct) < 0
    rows, cols, px, ct = rows[tissue], cols[tissue], px[tissue], ct[tissue]

    progs = ph.spot_programs(vid, ct[:, 1:], z)
    expr = ph.spec["expression"]
    sig = np.asarray(expr["signatures"], np.float64)
    lib = expr["library_size"] * np.exp(rng.normal(0.0, expr["library_sigma"], len(ct)))
    mu = lib[:, None] * (progs.astype(np.float64) @ sig)
    phi = expr["dispersion"]
    counts = rng.poisson(rng.gamma(1.0 / phi, mu * phi)).astype(np.int32)

    dens = section_density(ph, vid, z)
    scale = sec["st_scale_px_per_um"]
    size = sec["st_image_size_px"]
    hires_f = prm["hires_px"] / max(size)
    lowres_f = prm["lowres_px"] / max(size)
    lib_id = sec["id"]
    obs = pd.DataFrame({"in_tissue": np.ones(len(ct), np.int64), "array_row": rows.astype(np.int64),
                        "array_col": cols.astype(np.int64)}, index=_barcodes(rng, len(ct)))
    var = pd.DataFrame({"gene_ids": [f"PHANTOM{i:07d}" for i in range(len(expr["genes"]))],
                        "feature_types": "Gene Expression", "genome": "phantom"},
                       index=list(expr["genes"]))
    ad = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    ad.obsm["spatial"] = px.astype(np.int64)
    ad.obsm["programs_true"] = progs
    ad.obsm["ct_position_um"] = ct.astype(np.float64)
    ad.uns["programs"] = np.array(ph.program_names, dtype=object)
    ad.uns["spatial"] = {lib_id: {
        "images": {"hires": render_st_image(dens, vox, sec, size, hires_f),
                   "lowres": render_st_image(dens, vox, sec, size, lowres_f)},
        "scalefactors": {"spot_diameter_fullres": float(prm["spot_diameter_um"] * scale),
                         "fiducial_diameter_fullres": float(1.6 * prm["spot_diameter_um"] * scale),
                         "tissue_hires_scalef": float(hires_f),
                         "tissue_lowres_scalef": float(lowres_f)},
        "metadata": {"chemistry_description": "Spatial 3' (simulated)", "software_version": "xpression-phantom"},
    }}
    ad.uns["phantom"] = {"volume_id": vid, "section_id": lib_id, "z_um": z,
                         "z_recorded_um": float(sec.get("z_recorded_um", z)),
                         "st_affine": np.asarray(sec["st_affine"], np.float64)}
    return SectionResult(ad, _landmarks(ph, vid, sec, rng))


def java_double(value: float) -> str:
    """``value`` as Java's ``Double.toString`` prints it (``812.8``, ``1.0E-4``, ``Infinity``)."""
    from decimal import Decimal

    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    if v == 0.0:
        return "-0.0" if math.copysign(1.0, v) < 0 else "0.0"
    if 1e-3 <= abs(v) < 1e7:
        text = repr(v)  # shortest round-trip digits, plain notation in this range
        return text if "." in text else f"{text}.0"
    sign, digits, exponent = Decimal(repr(v)).normalize().as_tuple()
    mantissa = "".join(map(str, digits))
    return f"{'-' if sign else ''}{mantissa[0]}.{mantissa[1:] or '0'}E{exponent + len(mantissa) - 1}"


def write_landmarks(path, rows: list[list[Any]]) -> None:
    """A BigWarp landmark CSV as ``LandmarkTableModel.save`` writes it: opencsv's default
    ``CSVWriter`` (every field quoted, ``\n`` line ends), no header, ``name, active, moving x, y,
    fixed x, y``, numbers as Java prints doubles."""
    lines = []
    for name, active, *coords in rows:
        fields = [str(name), "true" if active else "false", *map(java_double, coords)]
        lines.append(",".join('"' + f.replace('"', '""') + '"' for f in fields))
    with open(path, "w", newline="") as fh:
        fh.write("".join(line + "\n" for line in lines))

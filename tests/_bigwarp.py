"""Test studies whose landmark tables are written the way BigWarp writes them.

``write_bigwarp_csv`` mirrors ``bigwarp.landmarks.LandmarkTableModel.save`` (saalfeldlab/bigwarp):
one ``String[]`` per landmark, ``name, active.toString(), moving[d].toString()..., target[d].toString()...``,
handed to opencsv's default ``CSVWriter`` (separator ``,``, every field quoted with ``"``, quotes
doubled, ``\\n`` line end, no header). ``toJson`` / ``TransformWriterJson`` give the JSON form.
Nothing here uses the project's own phantom writer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import yaml

from xpression.data.geometry import Plane

UM_PER_PX = 0.37  # a typical Visium full-resolution image
THETA = math.radians(25.0)
LIN = UM_PER_PX * np.array([[math.cos(THETA), -math.sin(THETA)], [math.sin(THETA), math.cos(THETA)]])
SHIFT = np.array([150.0, 90.0])  # ST full-res px -> CT (u, v) um: uv = LIN @ px + SHIFT
VOXEL_UM = (10.0, 5.0, 5.0)  # (z, y, x)
SHAPE = (40, 420, 420)
Z_UM = 200.0
SCALEFACTORS = {"tissue_hires_scalef": 0.15, "tissue_lowres_scalef": 0.045, "spot_diameter_fullres": 55.0 / UM_PER_PX}
SECTION = "s0"


def java_double(v: float) -> str:
    """Java's ``Double.toString``: plain decimals in [1e-3, 1e7), else ``d.dddE<exp>``."""
    v = float(v)
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    if v == 0.0:
        return "0.0"
    if 1e-3 <= abs(v) < 1e7:
        return np.format_float_positional(v, unique=True, trim="0")
    mantissa, exponent = np.format_float_scientific(v, unique=True, trim="0").split("e")
    return f"{mantissa}E{int(exponent)}"


def write_bigwarp_csv(path: Path, names, active, moving, fixed) -> Path:
    lines = []
    for name, on, m, f in zip(names, active, moving, fixed):
        row = [name, "true" if on else "false", *map(java_double, m), *map(java_double, f)]
        lines.append(",".join('"' + c.replace('"', '""') + '"' for c in row) + "\n")
    path.write_text("".join(lines))
    return path


def write_bigwarp_json(path: Path, names, active, moving, fixed, nest: str = "transform") -> Path:
    """``LandmarkTableModel.toJson`` (Gson with ``serializeSpecialFloatingPointValues``: Infinity stays
    a bare token), alone (``nest="table"``), in ``TransformWriterJson.write``'s object (``"transform"``)
    or under ``"Transform"`` of a ``BigwarpSettings`` file (``"settings"``)."""
    table = {"type": "BigWarpLandmarks", "numDimensions": len(moving[0]), "movingPoints": np.asarray(moving).tolist(),
             "fixedPoints": np.asarray(fixed).tolist(), "active": list(map(bool, active)), "names": list(names)}
    transform = {"type": "Thin Plate Spline", "landmarks": table}
    doc = {"table": table, "transform": transform, "settings": {"Bookmarks": {}, "Transform": transform}}[nest]
    path.write_text(json.dumps(doc))
    return path


def to_uv(px: np.ndarray) -> np.ndarray:
    return np.asarray(px, float) @ LIN.T + SHIFT


def to_px(uv: np.ndarray) -> np.ndarray:
    return (np.asarray(uv, float) - SHIFT) @ np.linalg.inv(LIN).T


def hex_grid(pitch_um: float = 100.0, lo: float = 300.0, hi: float = 1800.0) -> np.ndarray:
    rows = np.arange(lo, hi, pitch_um * math.sqrt(3) / 2)
    pts = [(x + (pitch_um / 2 if i % 2 else 0.0), y) for i, y in enumerate(rows) for x in np.arange(lo, hi, pitch_um)]
    return np.asarray(pts)


def true_plane(tilt_deg: float = 0.0, z_um: float = Z_UM) -> Plane:
    """The section plane: axial at ``z_um``, or tilted about the x axis by ``tilt_deg``."""
    t = math.tan(math.radians(tilt_deg))
    return Plane.from_points([[z_um + t * (y - 1000.0), y, x] for y, x in ((0, 0), (0, 2000), (2000, 0), (2000, 2000))])


def landmark_uv(n: int) -> np.ndarray:
    ring = [(400.0, 400.0), (1600.0, 450.0), (1500.0, 1650.0), (450.0, 1550.0), (1000.0, 1000.0),
            (1000.0, 350.0), (1650.0, 1050.0), (700.0, 1200.0), (1200.0, 700.0), (350.0, 1000.0)]
    return np.asarray(ring[:n])


def write_study(root: Path, *, ndim: int = 2, st_space: str = "fullres", ct_units: str = "um", moving: str = "st",
                declare: dict | None = None, tilt_deg: float = 0.0, z_um: float = Z_UM, n_landmarks: int = 8,
                ct_shift_um=(0.0, 0.0, 0.0), give_plane: bool | None = None, fmt: str = "csv",
                mirror: bool = False, seed: int = 0) -> dict:
    """A volume (.npy), one Visium-like section (.h5ad) on a known affine, its BigWarp landmarks
    written in the stated spaces, and a manifest declaring them (``declare`` overrides the keys).

    Returns paths and the true spot positions (``uv_um`` in-plane, ``points_um`` (z, y, x))."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    plane = true_plane(tilt_deg, z_um)
    flip = np.diag([1.0, -1.0]) if mirror else np.eye(2)
    uv_spots = hex_grid()
    px_spots = to_px(uv_spots) @ flip  # a mirrored ST image: y flipped before the affine
    n_spots = len(uv_spots)
    obs_index = [f"S{i:05d}-1" for i in range(n_spots)]
    import pandas as pd

    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(2.0, (n_spots, 30)).astype(np.float32)),
                       obs=pd.DataFrame({"in_tissue": np.ones(n_spots, np.int64)}, index=obs_index),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(30)]))
    adata.obsm["spatial"] = px_spots
    adata.obsm["programs_true"] = rng.dirichlet(np.ones(4), n_spots)
    adata.uns["spatial"] = {SECTION: {"scalefactors": dict(SCALEFACTORS)}}
    adata.write_h5ad(root / f"{SECTION}.h5ad")
    np.save(root / "ct.npy", np.zeros(SHAPE, np.uint8))

    uv_lm = landmark_uv(n_landmarks)
    st = (to_px(uv_lm) @ flip + rng.normal(0.0, 0.3, uv_lm.shape))
    st = st * {"fullres": 1.0, "hires": SCALEFACTORS["tissue_hires_scalef"], "lowres": SCALEFACTORS["tissue_lowres_scalef"]}[st_space]
    world = plane.to_world(uv_lm) + rng.normal(0.0, 0.5, (n_landmarks, 3)) + np.asarray(ct_shift_um)
    vz, vy, vx = VOXEL_UM
    scale = np.array([vx, vy, vz]) if ct_units == "px" else np.ones(3)
    if ndim == 2:
        ct = (plane.to_uvw(world)[:, :2]) / scale[:2]
        st_pts = st
    else:
        ct = world[:, ::-1] / scale  # BigWarp's (x, y, z)
        st_pts = np.column_stack([st, np.zeros(n_landmarks)])  # a 2D image seen in 3D: z = 0
    mov, fix = (st_pts, ct) if moving == "st" else (ct, st_pts)
    names = [f"Pt-{i}" for i in range(n_landmarks)]
    writer = write_bigwarp_json if fmt == "json" else write_bigwarp_csv
    lm_path = writer(root / f"{SECTION}_landmarks.{fmt}", names, [True] * n_landmarks, mov, fix)

    section = {"id": SECTION, "adata": f"{SECTION}.h5ad", "landmarks": lm_path.name}
    if give_plane if give_plane is not None else ndim == 2:
        section["z_um" if tilt_deg == 0 else "plane"] = z_um if tilt_deg == 0 else plane.to_world(landmark_uv(3)).tolist()
    section.update({"landmarks_moving": moving, "landmarks_st_space": st_space, "landmarks_ct_units": ct_units})
    section.update(declare or {})
    manifest = {"name": "bigwarp-study", "volumes": [{"id": "v0", "image": "ct.npy", "voxel_size_um": list(VOXEL_UM),
                                                      "sections": [section]}]}
    (root / "cohort.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return {"manifest": root / "cohort.yaml", "landmarks": lm_path, "uv_um": uv_spots,
            "points_um": plane.to_world(uv_spots), "plane": plane, "names": names, "moving": mov, "fixed": fix}

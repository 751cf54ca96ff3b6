"""ST sections: read the AnnData, register its spots and place them in the CT volume (um).

A :class:`Section` holds the AnnData, the landmark affine, the section :class:`Plane` and each
spot's in-plane ``(u, v)`` and 3D ``(z, y, x)`` position in um.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from xpression.data.geometry import DataError, Plane
from xpression.data.registration import AffineFit, Declaration, Registration, SPOT_RADIUS_UM, VISIUM_PITCH_UM, register_section
from xpression.data.spaceranger import read_spaceranger

__all__ = ["Section", "read_adata", "check_counts", "load_section"]

log = logging.getLogger(__name__)


def read_adata(path: str | Path) -> Any:
    """Read an ``.h5ad`` file or a Space Ranger output folder (:mod:`xpression.data.spaceranger`)."""
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise DataError(path, "ST file not found")
    try:
        adata = read_spaceranger(path) if path.is_dir() else ad.read_h5ad(path)
    except DataError:
        raise
    except Exception as err:  # h5py/anndata raise many types for corrupt files
        raise DataError(path, f"cannot read ST data ({type(err).__name__}: {err})") from err
    adata.var_names_make_unique()
    if "spatial" not in adata.obsm:
        raise DataError(path, f"no obsm['spatial'] spot positions; obsm keys: {sorted(adata.obsm.keys())}")
    spatial_shape = np.shape(adata.obsm["spatial"])
    if len(spatial_shape) != 2 or spatial_shape[1] < 2:
        raise DataError(path, f"obsm['spatial'] has shape {spatial_shape}; expected (n_spots, 2): each spot's x, y in image pixels")
    if adata.n_obs == 0:
        raise DataError(path, "no spots")
    if adata.obs_names.has_duplicates:
        raise DataError(path, f"duplicate spot barcodes, e.g. {adata.obs_names[adata.obs_names.duplicated()][:3].tolist()}")
    return adata


def check_counts(adata: Any, where: object) -> None:
    """Raise :class:`DataError` if the count matrix ``X`` holds NaN/inf or negative values."""
    x = adata.X
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size and not np.all(np.isfinite(data)):
        raise DataError(where, f"counts contain NaN or inf ({int((~np.isfinite(data)).sum())} entries)")
    if data.size and data.min() < 0:
        raise DataError(where, f"counts contain negative values (min {data.min():g})")


def scalefactors(adata: Any) -> dict | None:
    """The first library's ``uns['spatial'][lib]['scalefactors']``, or None if absent."""
    try:
        lib = next(iter(adata.uns["spatial"].values()))
        return dict(lib["scalefactors"])
    except (KeyError, StopIteration, TypeError, AttributeError, ValueError):
        return None


def spot_diameter_px(adata: Any) -> float | None:
    """``spot_diameter_fullres`` from ``uns['spatial']`` (ST px), or None if absent."""
    try:
        return float(scalefactors(adata)["spot_diameter_fullres"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class Section:
    """One registered ST section placed in its volume.

    ``uv_um`` (N, 2) in-plane positions; ``points_um`` (N, 3) (z, y, x) um; ``px`` (N, 2) ST
    full-resolution pixels (x, y); ``spot_radius_um`` from the scale factors and affine;
    ``registration`` the landmark fit (residuals per landmark, spot pitch, warnings).
    """

    id: str
    volume_id: str
    adata: Any
    plane: Plane
    affine: AffineFit
    px: np.ndarray
    uv_um: np.ndarray
    points_um: np.ndarray
    spot_radius_um: float
    adata_path: Path
    registration: Registration | None = None

    @property
    def barcodes(self) -> np.ndarray:
        return np.asarray(self.adata.obs_names)


def load_section(entry: Any, max_residual_um: float = SPOT_RADIUS_UM, only_in_tissue: bool = True,
                 voxel_size_um: Sequence[float] | None = None) -> Section:
    """Read, validate and register one manifest ``SectionEntry``.

    Spots with ``obs['in_tissue'] == 0`` are dropped when ``only_in_tissue``. ``voxel_size_um``:
    the volume's (z, y, x) voxel size, needed when the landmarks' CT side is in voxels.
    Registration checks (spot pitch, residual) raise :class:`DataError` before anything is trained.
    """
    adata = read_adata(entry.adata)
    check_counts(adata, entry.adata)
    if only_in_tissue and "in_tissue" in adata.obs:
        keep = np.asarray(adata.obs["in_tissue"]).astype(bool)
        if not keep.any():
            raise DataError(entry.adata, "no spot has in_tissue == 1")
        if not keep.all():
            log.info("%s: %d spots outside the tissue (in_tissue == 0) dropped", entry.id, int((~keep).sum()))
            adata = adata[keep].copy()
    px = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2]
    if not np.all(np.isfinite(px)):
        raise DataError(entry.adata, "obsm['spatial'] contains NaN or inf")
    if entry.z_um is not None:
        plane, where_plane = Plane.axial(float(entry.z_um)), f"z_um ({entry.z_um:g})"
    elif entry.plane is not None:
        plane, where_plane = Plane.from_points(entry.plane, where=f"section {entry.id}"), "plane"
    else:
        plane, where_plane = None, "z_um/plane"  # a 3D landmark table: fitted to its CT points
    reg = register_section(
        entry.landmarks, px, Declaration.of(entry), plane=plane, scalefactors=scalefactors(adata),
        voxel_size_um=voxel_size_um, spot_pitch=getattr(entry, "spot_pitch_um", VISIUM_PITCH_UM),
        max_residual_um=max_residual_um, where_plane=where_plane, section_id=entry.id,
    )
    fit = reg.affine
    uv = fit.apply(px)
    diam = spot_diameter_px(adata)
    radius = SPOT_RADIUS_UM if diam is None else 0.5 * diam * fit.um_per_px
    return Section(
        id=entry.id,
        volume_id=entry.volume_id,
        adata=adata,
        plane=reg.plane,
        affine=fit,
        px=px,
        uv_um=uv,
        points_um=reg.plane.to_world(uv),
        spot_radius_um=float(radius),
        adata_path=Path(entry.adata),
        registration=reg,
    )

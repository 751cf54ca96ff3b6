"""Print what a cohort holds: `python -m xpression.data.summary cohort.yaml`.

Reads only metadata (array shapes, voxel sizes, the AnnData's obs/var/obsm keys), never voxels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata as ad
from rich.console import Console
from rich.table import Table

from xpression.data.geometry import DataError
from xpression.data.manifest import Cohort, ManifestError, load_manifest
from xpression.data.sections import read_adata
from xpression.data.volume import VolumeError, open_volume

__all__ = ["cohort_table", "main"]


def cohort_table(cohort: Cohort) -> Table:
    """One row per section: its volume's shape, voxel size and extent, and the section's spots and genes."""
    table = Table(title=f"cohort {cohort.name!r} ({cohort.path})", title_justify="left")
    for column in ("volume", "condition", "shape (z, y, x)", "voxel (um)", "extent (mm)", "section", "plane", "spots", "genes"):
        table.add_column(column, justify="right" if column in ("spots", "genes") else "left")
    for volume in cohort.volumes:
        vol = open_volume(volume.image, volume.voxel_size_um)
        voxel = "x".join(f"{v:g}" for v in vol.voxel_size_um)
        extent = " x ".join(f"{e / 1000:.2f}" for e in vol.extent_um)
        rows = volume.sections or (None,)
        for section in rows:
            if section is None:
                table.add_row(volume.id, volume.condition or "", str(vol.shape), voxel, extent, "-", "", "", "")
                continue
            spots, genes = _spots_and_genes(section.adata)
            plane = (f"z = {section.z_um:.1f} um" if section.is_axial else
                     f"tilted ({len(section.plane)} points)" if section.plane else "from 3D landmarks")
            table.add_row(
                volume.id, volume.condition or "", str(vol.shape), voxel, extent,
                section.id, plane, str(spots), str(genes),
            )
    return table


def _spots_and_genes(path: Path) -> tuple[int, int]:
    """Spots and genes of an ``.h5ad`` (its header only) or a Space Ranger folder (read whole)."""
    if path.is_dir():
        adata = read_adata(path)
        return adata.n_obs, adata.n_vars
    try:
        adata = ad.read_h5ad(path, backed="r")
    except Exception as err:  # h5py/anndata raise many types for corrupt files
        raise DataError(path, f"cannot read ST data ({type(err).__name__}: {err})") from err
    try:
        return adata.n_obs, adata.n_vars
    finally:
        adata.file.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpression.data.summary", description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="the cohort manifest (cohort.yaml)")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        cohort = load_manifest(args.manifest)
        console.print(cohort_table(cohort))
    except (ManifestError, VolumeError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cohort.truth is not None:
        console.print(f"programs (truth): {', '.join(cohort.truth.programs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

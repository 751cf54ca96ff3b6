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

from xpression.data.manifest import Cohort, ManifestError, load_manifest
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
            adata = ad.read_h5ad(section.adata, backed="r")
            plane = (f"z = {section.z_um:.1f} um" if section.is_axial else
                     f"tilted ({len(section.plane)} points)" if section.plane else "from 3D landmarks")
            table.add_row(
                volume.id, volume.condition or "", str(vol.shape), voxel, extent,
                section.id, plane, str(adata.n_obs), str(adata.n_vars),
            )
            adata.file.close()
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpression.data.summary", description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="the cohort manifest (cohort.yaml)")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        cohort = load_manifest(args.manifest)
        console.print(cohort_table(cohort))
    except (ManifestError, VolumeError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    if cohort.truth is not None:
        console.print(f"programs (truth): {', '.join(cohort.truth.programs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

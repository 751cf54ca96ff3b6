"""`python -m xpression.data.summary`: what a cohort holds, from its metadata alone."""

from __future__ import annotations

import anndata as ad
import pytest

from xpression.data.manifest import load_manifest
from xpression.data.summary import main


def test_one_row_per_section_with_its_volume_and_spots(tiny_cohort, capsys):
    assert main([str(tiny_cohort)]) == 0
    out = capsys.readouterr().out
    cohort = load_manifest(tiny_cohort)
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == sum(max(len(v.sections), 1) for v in cohort.volumes)
    for volume in cohort.volumes:
        for section in volume.sections:
            row = next(r for r in rows if f" {section.id} " in r)
            cells = [c.strip() for c in row.strip("│").split("│")]
            adata = ad.read_h5ad(section.adata, backed="r")
            assert cells[0] == volume.id and int(cells[-2]) == adata.n_obs and int(cells[-1]) == adata.n_vars
    assert "programs (truth):" in out


def test_a_missing_manifest_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path / "cohort.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid cohort manifest") and "manifest file not found" in err


def test_a_corrupt_section_file_is_one_error_line(tiny_cohort, tmp_path, capsys):
    """A section's .h5ad that is not HDF5 was h5py's traceback."""
    import shutil

    import yaml

    cohort = tmp_path / "c"
    shutil.copytree(tiny_cohort.parent, cohort)
    manifest = yaml.safe_load((cohort / "cohort.yaml").read_text())
    adata = cohort / manifest["volumes"][0]["sections"][0]["adata"]
    adata.write_bytes(b"not an h5ad")
    assert main([str(cohort / "cohort.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {adata}: cannot read ST data (") and err.count("\n") == 1


def test_help_is_not_read_as_a_manifest(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "manifest" in capsys.readouterr().out

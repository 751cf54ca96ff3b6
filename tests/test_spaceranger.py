"""Space Ranger output folders as a section's ``adata``: every layout loads to the same AnnData.

The fixtures are written as Space Ranger writes them (10x "HDF5 Feature-Barcode Matrix Format",
Cell Ranger's ``save_h5_file``: fixed-length ASCII strings, CSC features x barcodes with int32
data, int64 indices/indptr, int32 shape; 10x "Feature-Barcode Matrices (MEX Format)": gzipped
``matrix.mtx`` (features x barcodes, ``%%MatrixMarket matrix coordinate integer general`` and a
``%metadata_json`` comment), headerless tab-separated ``features.tsv.gz`` (id, name, feature_type)
and ``barcodes.tsv.gz``; 10x "Spatial Outputs": ``tissue_positions_list.csv``
without a header in 1.x, ``tissue_positions.csv`` with one from 2.0), never with the reader.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import yaml
from PIL import Image

from xpression.data import DataError, ManifestError, load_manifest
from xpression.data.sections import load_section, read_adata
from xpression.data.spaceranger import read_spaceranger

GENES = ["Cd74", "Ptprc", "Sftpc", "Ager", "Pecam1", "Col1a1"]
GENE_IDS = [f"ENSMUSG{i:011d}" for i in range(len(GENES))]
ANTIBODY = ("CD3", "CD3_TotalSeqA")  # (id, name) of one non-gene feature
SCALEFACTORS = {"spot_diameter_fullres": 55.0, "tissue_hires_scalef": 0.25, "fiducial_diameter_fullres": 88.0,
                "tissue_lowres_scalef": 0.075}
HEADER = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"


def _slide(seed: int = 0) -> dict:
    """A small Visium capture area: a hexagonal lattice (array_col step 2 = 100 um = 100 px)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(5), np.arange(12), indexing="ij")
    keep = (rows + cols) % 2 == 0  # Visium: array_row + array_col is even
    rows, cols = rows[keep], cols[keep]
    bases = np.array(list("ACGT"))
    barcodes = ["".join(rng.choice(bases, 16)) + "-1" for _ in rows]
    in_tissue = (cols >= 2).astype(int)  # the first columns are background, as on a real slide
    return {
        "barcodes": barcodes, "in_tissue": in_tissue, "array_row": rows, "array_col": cols,
        # pixel centres: x from the column, y from the row, never equal so a swap shows
        "pxl_col_in_fullres": (1000 + 50 * cols).astype(int),
        "pxl_row_in_fullres": (2000 + np.rint(50 * np.sqrt(3) * rows)).astype(int),
        "order": rng.permutation(len(rows)),  # positions rows are not in matrix order
    }


def _counts(n_spots: int, seed: int = 1) -> np.ndarray:
    """Known integer counts, spots x (genes + 1 antibody), with zeros."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, size=(n_spots, len(GENES) + 1))
    counts[rng.random(counts.shape) < 0.3] = 0
    return counts.astype(np.int32)


def _ascii(values: list[str]) -> np.ndarray:
    data = [v.encode("ascii", "xmlcharrefreplace") for v in values]
    return np.array(data, dtype=f"S{max(1, max(len(v) for v in data))}")


def _write_matrix_h5(path: Path, barcodes: list[str], counts: np.ndarray) -> None:
    """``filtered_feature_bc_matrix.h5`` as Space Ranger writes it (features x barcodes, CSC)."""
    csc = sp.csc_matrix(counts.T)  # features x barcodes
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = np.bytes_("matrix")
        f.attrs["version"] = np.int64(2)
        f.attrs["library_ids"] = _ascii(["lung_A1"])
        f.attrs["original_gem_groups"] = np.array([1])
        f.attrs["chemistry_description"] = np.bytes_("Visium Spatial Gene Expression")
        f.attrs["software_version"] = np.bytes_("spaceranger-2.1.0")
        g = f.create_group("matrix")
        feats = g.create_group("features")
        feats.create_dataset("id", data=_ascii(GENE_IDS + [ANTIBODY[0]]))
        feats.create_dataset("name", data=_ascii(GENES + [ANTIBODY[1]]))
        feats.create_dataset("feature_type", data=_ascii(["Gene Expression"] * len(GENES) + ["Antibody Capture"]))
        feats.create_dataset("genome", data=_ascii(["mm10"] * len(GENES) + [""]))
        feats.create_dataset("_all_tag_keys", data=_ascii(["genome"]))
        g.create_dataset("barcodes", data=_ascii(barcodes))
        for name, dtype in (("data", "int32"), ("indices", "int64"), ("indptr", "int64")):
            g.create_dataset(name, data=np.asarray(getattr(csc, name), dtype=dtype), chunks=True, maxshape=(None,),
                             compression="gzip", shuffle=True)
        g.create_dataset("shape", data=np.asarray(csc.shape, dtype="int32"))


def _write_mex(folder: Path, barcodes: list[str], counts: np.ndarray, compress: bool = True,
               genes_tsv: bool = False) -> None:
    """``filtered_feature_bc_matrix/`` as Space Ranger writes it: 1-based features x barcodes
    coordinates, headerless TSVs. ``compress=False``: the same files gunzipped (as some GEO uploads
    carry them); ``genes_tsv``: the Cell Ranger 2 ``genes.tsv`` (id, name), genes only."""
    folder.mkdir(parents=True)
    if genes_tsv:
        counts = counts[:, : len(GENES)]
        feature_lines = [f"{i}\t{n}" for i, n in zip(GENE_IDS, GENES)]
    else:
        feature_lines = [f"{i}\t{n}\tGene Expression" for i, n in zip(GENE_IDS, GENES)]
        feature_lines.append(f"{ANTIBODY[0]}\t{ANTIBODY[1]}\tAntibody Capture")
    mtx = io.BytesIO()
    scipy.io.mmwrite(mtx, sp.coo_matrix(counts.T), field="integer",
                     comment='metadata_json: {"software_version": "spaceranger-2.1.0", "format_version": 2}')
    files = {"genes.tsv" if genes_tsv else "features.tsv": ("\n".join(feature_lines) + "\n").encode(),
             "barcodes.tsv": ("\n".join(barcodes) + "\n").encode(), "matrix.mtx": mtx.getvalue()}
    for name, data in files.items():
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def _write_legacy_h5(path: Path, barcodes: list[str], counts: np.ndarray) -> None:
    """Cell Ranger 2 layout: one top-level group per genome, genes only."""
    csc = sp.csc_matrix(counts[:, : len(GENES)].T)
    with h5py.File(path, "w") as f:
        g = f.create_group("mm10")
        g.create_dataset("barcodes", data=_ascii(barcodes))
        g.create_dataset("genes", data=_ascii(GENE_IDS))
        g.create_dataset("gene_names", data=_ascii(GENES))
        for name in ("data", "indices", "indptr"):
            g.create_dataset(name, data=np.asarray(getattr(csc, name), dtype="int64" if name != "data" else "int32"))
        g.create_dataset("shape", data=np.asarray(csc.shape, dtype="int32"))


def _position_rows(slide: dict) -> list[str]:
    keys = ("in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
    return [",".join([slide["barcodes"][i], *(str(int(slide[k][i])) for k in keys)]) for i in slide["order"]]


def make_spaceranger(folder: Path, layout: str = "sr2", images: bool = True, seed: int = 0) -> dict:
    """A Space Ranger ``outs/`` folder in one ``layout`` (``sr1``, ``sr2``, ``parquet``, ``legacy_h5``;
    ``mex``, ``mex_plain``, ``mex_genes_tsv``: ``sr2`` with the MEX folder instead of the ``.h5``).

    The filtered matrix holds the spots under tissue; the positions file lists every spot.
    Returns the truth the folder was written from.
    """
    slide = _slide(seed)
    spatial = folder / "spatial"
    spatial.mkdir(parents=True)
    tissue = np.flatnonzero(slide["in_tissue"] == 1)
    barcodes = [slide["barcodes"][i] for i in tissue]
    counts = _counts(len(tissue))
    if layout.startswith("mex"):
        _write_mex(folder / "filtered_feature_bc_matrix", barcodes, counts, compress=layout != "mex_plain",
                   genes_tsv=layout == "mex_genes_tsv")
    else:
        writer = _write_legacy_h5 if layout == "legacy_h5" else _write_matrix_h5
        writer(folder / "filtered_feature_bc_matrix.h5", barcodes, counts)
    rows = _position_rows(slide)
    if layout == "sr1":
        (spatial / "tissue_positions_list.csv").write_text("\n".join(rows) + "\n")
    elif layout in ("sr2", "legacy_h5") or layout.startswith("mex"):
        (spatial / "tissue_positions.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    elif layout == "parquet":
        import pandas as pd

        table = pd.DataFrame([r.split(",") for r in rows], columns=HEADER.split(","))
        table = table.astype({c: int for c in HEADER.split(",")[1:]})
        table.to_parquet(spatial / "tissue_positions.parquet")  # needs pyarrow
    else:
        raise ValueError(layout)
    (spatial / "scalefactors_json.json").write_text(json.dumps(SCALEFACTORS))
    hires = lowres = None
    if images:
        rng = np.random.default_rng(seed + 7)
        hires = rng.integers(0, 256, size=(500, 400, 3), dtype=np.uint8)
        lowres = rng.integers(0, 256, size=(150, 120, 3), dtype=np.uint8)
        Image.fromarray(hires).save(spatial / "tissue_hires_image.png")
        Image.fromarray(lowres).save(spatial / "tissue_lowres_image.png")
    return {"barcodes": barcodes, "counts": counts, "tissue": tissue, "slide": slide, "hires": hires, "lowres": lowres}


def _expected_xy(truth: dict) -> np.ndarray:
    s, t = truth["slide"], truth["tissue"]
    return np.column_stack([s["pxl_col_in_fullres"][t], s["pxl_row_in_fullres"][t]]).astype(float)


def test_space_ranger_1x_csv_without_header(tmp_path):
    truth = make_spaceranger(tmp_path / "outs", "sr1")
    adata = read_spaceranger(tmp_path / "outs")
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), truth["counts"][:, : len(GENES)])
    assert list(adata.var_names) == GENES
    assert list(adata.var["gene_ids"]) == GENE_IDS
    assert set(adata.var["feature_types"]) == {"Gene Expression"}  # the antibody feature is left out
    assert list(adata.obs_names) == truth["barcodes"] and all(b.endswith("-1") for b in adata.obs_names)
    np.testing.assert_array_equal(adata.obsm["spatial"], _expected_xy(truth))
    slide, t = truth["slide"], truth["tissue"]
    np.testing.assert_array_equal(adata.obs["array_row"], slide["array_row"][t])
    np.testing.assert_array_equal(adata.obs["array_col"], slide["array_col"][t])
    assert (adata.obs["in_tissue"] == 1).all()
    assert adata.n_obs == int(slide["in_tissue"].sum()) < len(slide["barcodes"])  # background spots dropped
    lib = adata.uns["spatial"]["lung_A1"]
    assert lib["scalefactors"] == SCALEFACTORS
    assert lib["metadata"] == {"chemistry_description": "Visium Spatial Gene Expression", "software_version": "spaceranger-2.1.0"}
    np.testing.assert_array_equal(lib["images"]["hires"], truth["hires"])
    np.testing.assert_array_equal(lib["images"]["lowres"], truth["lowres"])


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert list(a.var_names) == list(b.var_names) and list(a.obs_names) == list(b.obs_names)
    assert list(a.var["gene_ids"]) == list(b.var["gene_ids"])
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    for col in ("in_tissue", "array_row", "array_col"):
        np.testing.assert_array_equal(a.obs[col], b.obs[col])
    (la, sa), (lb, sb) = next(iter(a.uns["spatial"].items())), next(iter(b.uns["spatial"].items()))
    assert sa["scalefactors"] == sb["scalefactors"]


@pytest.mark.parametrize("layout", ["sr2", "legacy_h5", "parquet"])
def test_every_layout_loads_to_the_same_anndata(tmp_path, layout):
    if layout == "parquet":
        pytest.importorskip("pyarrow")
    make_spaceranger(tmp_path / "sr1", "sr1")
    make_spaceranger(tmp_path / layout, layout)
    _same(read_spaceranger(tmp_path / layout), read_spaceranger(tmp_path / "sr1"))


def test_matches_scanpy_read_visium(tmp_path):
    """An independent reader (scanpy's, deprecated but still shipped) gives the same numbers."""
    sc = pytest.importorskip("scanpy")
    make_spaceranger(tmp_path / "outs", "sr2")
    ours = read_spaceranger(tmp_path / "outs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sc.read_visium(tmp_path / "outs")
    np.testing.assert_array_equal(ours.X.toarray(), theirs.X.toarray())
    assert list(ours.var_names) == list(theirs.var_names)
    assert list(ours.obs_names) == list(theirs.obs_names)
    np.testing.assert_array_equal(ours.obsm["spatial"], np.asarray(theirs.obsm["spatial"], float))
    assert list(ours.uns["spatial"]) == list(theirs.uns["spatial"])


def test_run_folder_with_outs_and_absent_images(tmp_path):
    truth = make_spaceranger(tmp_path / "run" / "outs", "sr2", images=False)
    with h5py.File(tmp_path / "run" / "outs" / "filtered_feature_bc_matrix.h5", "r+") as f:
        del f.attrs["library_ids"]  # then the library is named after the run folder
    adata = read_spaceranger(tmp_path / "run")  # the run folder, not outs/
    assert adata.uns["spatial"]["run"]["images"] == {}
    np.testing.assert_array_equal(adata.obsm["spatial"], _expected_xy(truth))


def test_parquet_positions_are_read_by_column_name(tmp_path, monkeypatch):
    """The parquet branch without pyarrow: pandas' reader stands in, returning the documented columns
    (reordered, as a table read by name may be); the CSV fixture supplies the values."""
    import pandas as pd

    make_spaceranger(tmp_path / "sr1", "sr1")
    make_spaceranger(tmp_path / "pq", "sr2")
    spatial = tmp_path / "pq" / "spatial"
    table = pd.read_csv(spatial / "tissue_positions.csv", dtype={"barcode": str})
    (spatial / "tissue_positions.csv").rename(spatial / "tissue_positions.parquet")
    monkeypatch.setattr(pd, "read_parquet", lambda path: table[table.columns[::-1]])
    _same(read_spaceranger(tmp_path / "pq"), read_spaceranger(tmp_path / "sr1"))


def test_parquet_without_pyarrow_names_the_dependency(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyarrow is installed")
    make_spaceranger(tmp_path / "outs", "sr2")
    spatial = tmp_path / "outs" / "spatial"
    (spatial / "tissue_positions.csv").rename(spatial / "tissue_positions.parquet")
    with pytest.raises(DataError, match=r"tissue_positions\.parquet: .*optional dependency pyarrow"):
        read_spaceranger(tmp_path / "outs")


@pytest.mark.parametrize(
    "remove, message",
    [
        ("filtered_feature_bc_matrix.h5", r"not a Space Ranger output folder: no filtered_feature_bc_matrix\.h5 \(nor a "
                                          r"filtered_feature_bc_matrix/ folder\)"),
        ("spatial/tissue_positions.csv", r"without spot positions: none of spatial/\{tissue_positions\.csv, tissue_positions_list\.csv, tissue_positions\.parquet\}"),
        ("spatial/scalefactors_json.json", r"without spatial/scalefactors_json\.json"),
    ],
)
def test_missing_required_file_is_one_clear_error(tmp_path, remove, message):
    make_spaceranger(tmp_path / "outs", "sr2")
    (tmp_path / "outs" / remove).unlink()
    with pytest.raises(DataError, match=message) as err:
        read_adata(tmp_path / "outs")
    assert "\n" not in str(err.value)


def test_malformed_files_are_named(tmp_path):
    truth = make_spaceranger(tmp_path / "outs", "sr1")
    positions = tmp_path / "outs" / "spatial" / "tissue_positions_list.csv"
    lines = positions.read_text().splitlines()
    kept = [ln for ln in lines if not ln.startswith(truth["barcodes"][0])]
    positions.write_text("\n".join(kept) + "\n")
    with pytest.raises(DataError, match=r"tissue_positions_list\.csv: 1 of \d+ barcodes .* have no position"):
        read_spaceranger(tmp_path / "outs")
    positions.write_text("\n".join(ln.rsplit(",", 1)[0] for ln in lines) + "\n")
    with pytest.raises(DataError, match=r"expected 6 columns"):
        read_spaceranger(tmp_path / "outs")
    positions.write_text("\n".join(lines) + "\n")
    (tmp_path / "outs" / "spatial" / "scalefactors_json.json").write_text(json.dumps({**SCALEFACTORS, "spot_diameter_fullres": 0}))
    with pytest.raises(DataError, match=r"scalefactors_json\.json: 'spot_diameter_fullres' must be a positive number, got 0"):
        read_spaceranger(tmp_path / "outs")
    (tmp_path / "outs" / "spatial" / "scalefactors_json.json").write_text(json.dumps(SCALEFACTORS))
    (tmp_path / "outs" / "filtered_feature_bc_matrix.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"filtered_feature_bc_matrix\.h5: cannot read HDF5 file"):
        read_spaceranger(tmp_path / "outs")


def _cohort(tmp_path: Path, adata: str) -> Path:
    np.save(tmp_path / "ct.npy", np.zeros((4, 4, 4), np.float32))
    # Landmarks whose ST pixels and CT um coincide (1 um per px): the same fit whichever side is read first.
    corners = [(900.0, 1900.0), (1700.0, 1900.0), (900.0, 2400.0), (1700.0, 2400.0)]
    (tmp_path / "landmarks.csv").write_text(
        "".join(f'"Pt-{i}","true","{x}","{y}","{x}","{y}"\n' for i, (x, y) in enumerate(corners)))
    manifest = {"volumes": [{"id": "v0", "image": "ct.npy", "voxel_size_um": [10, 10, 10],
                             "sections": [{"id": "s0", "adata": adata, "landmarks": "landmarks.csv", "z_um": 20.0}]}]}
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_manifest_accepts_a_space_ranger_folder_and_load_section_places_the_spots(tmp_path):
    truth = make_spaceranger(tmp_path / "st" / "outs", "sr1")
    cohort = load_manifest(_cohort(tmp_path, "st"))
    entry = cohort.section("s0")
    assert entry.adata == tmp_path / "st"
    section = load_section(entry)
    xy = _expected_xy(truth)
    assert list(section.barcodes) == truth["barcodes"]
    np.testing.assert_allclose(section.px, xy)
    np.testing.assert_allclose(section.uv_um, xy, atol=1e-6)  # 1 um per px
    assert section.spot_radius_um == pytest.approx(27.5)  # half of spot_diameter_fullres x 1 um/px
    pitch = np.sort(np.linalg.norm(xy[:, None] - xy[None], axis=2), axis=1)[:, 1]
    assert np.median(pitch) == pytest.approx(100.0, abs=1.0)  # the Visium spot pitch


def test_manifest_reports_a_folder_that_is_not_space_ranger_output(tmp_path):
    make_spaceranger(tmp_path / "st", "sr2")
    shutil.rmtree(tmp_path / "st" / "spatial")
    with pytest.raises(ManifestError, match=r"section 's0'\.adata: .*st: Space Ranger folder without spot positions"):
        load_manifest(_cohort(tmp_path, "st"))
    (tmp_path / "other.txt").write_text("")
    with pytest.raises(ManifestError, match=r"'other\.txt' is neither an \.h5ad file nor a Space Ranger output folder"):
        load_manifest(_cohort(tmp_path, "other.txt"))


# -- the MEX folder without the .h5 ------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["mex", "mex_plain", "mex_genes_tsv"])
def test_mex_folder_without_h5_loads_to_the_same_anndata_as_the_h5(tmp_path, layout):
    truth = make_spaceranger(tmp_path / "h5" / "outs", "sr2")
    make_spaceranger(tmp_path / "mex" / "outs", layout)
    assert not (tmp_path / "mex" / "outs" / "filtered_feature_bc_matrix.h5").exists()
    mex, h5 = read_spaceranger(tmp_path / "mex"), read_spaceranger(tmp_path / "h5")
    _same(mex, h5)
    assert sp.isspmatrix_csr(mex.X) and mex.X.dtype == np.float32
    np.testing.assert_array_equal(mex.X.toarray(), truth["counts"][:, : len(GENES)])  # the antibody left out
    assert list(mex.var_names) == GENES and list(mex.var["feature_types"]) == ["Gene Expression"] * len(GENES)
    assert list(mex.obs_names) == truth["barcodes"]
    np.testing.assert_array_equal(mex.obsm["spatial"], _expected_xy(truth))
    lib = mex.uns["spatial"]["mex"]  # no library_ids in a MEX folder: the run folder's name
    assert lib["scalefactors"] == SCALEFACTORS
    np.testing.assert_array_equal(lib["images"]["hires"], truth["hires"])
    assert lib["metadata"] == {"software_version": "spaceranger-2.1.0"}  # from the %metadata_json line


def test_h5_is_preferred_and_mex_folder_goes_through_the_manifest(tmp_path):
    truth = make_spaceranger(tmp_path / "st" / "outs", "mex")
    cohort = load_manifest(_cohort(tmp_path, "st"))
    section = load_section(cohort.section("s0"))
    assert list(section.barcodes) == truth["barcodes"]
    np.testing.assert_allclose(section.px, _expected_xy(truth))
    # Both present: the .h5 is read (its library_ids name the library).
    make_spaceranger(tmp_path / "both", "sr2")
    _write_mex(tmp_path / "both" / "filtered_feature_bc_matrix", truth["barcodes"][:3], truth["counts"][:3])
    assert list(read_spaceranger(tmp_path / "both").uns["spatial"]) == ["lung_A1"]


def _mex_outs(tmp_path: Path) -> Path:
    make_spaceranger(tmp_path / "outs", "mex")
    return tmp_path / "outs" / "filtered_feature_bc_matrix"


def test_incomplete_mex_folder_names_the_missing_file(tmp_path):
    mex = _mex_outs(tmp_path)
    (mex / "matrix.mtx.gz").unlink()
    with pytest.raises(DataError, match=r"filtered_feature_bc_matrix: no filtered_feature_bc_matrix\.h5 beside it and "
                                        r"this MEX folder has no matrix\.mtx\.gz$") as err:
        read_adata(tmp_path / "outs")
    assert "\n" not in str(err.value)
    with pytest.raises(ManifestError, match=r"section 's0'\.adata: .*has no matrix\.mtx\.gz"):
        load_manifest(_cohort(tmp_path, "outs"))


@pytest.mark.parametrize("damage, message", [
    ("features_2_columns", r"features\.tsv\.gz: expected 3 tab-separated columns \(id, name, feature_type\), got 2; "
                           r"a 2-column file is the Cell Ranger 2 genes\.tsv"),
    ("barcode_dropped", r"matrix\.mtx\.gz: inconsistent matrix: shape \[7, 25\] \(features x barcodes\), 7 features in "
                        r"features\.tsv\.gz, 24 barcodes in barcodes\.tsv\.gz"),
    ("matrix_not_gzip", r"matrix\.mtx\.gz: cannot read Matrix Market file \(BadGzipFile"),
    ("matrix_garbage", r"matrix\.mtx\.gz: cannot read Matrix Market file \(ValueError"),
    ("duplicate_barcode", r"filtered_feature_bc_matrix: duplicate barcodes"),
])
def test_malformed_mex_files_are_one_clear_error(tmp_path, damage, message):
    mex = _mex_outs(tmp_path)
    features = gzip.decompress((mex / "features.tsv.gz").read_bytes()).decode().splitlines()
    barcodes = gzip.decompress((mex / "barcodes.tsv.gz").read_bytes()).decode().splitlines()
    if damage == "features_2_columns":
        text = "\n".join(ln.rsplit("\t", 1)[0] for ln in features) + "\n"
        (mex / "features.tsv.gz").write_bytes(gzip.compress(text.encode()))
    elif damage == "barcode_dropped":
        (mex / "barcodes.tsv.gz").write_bytes(gzip.compress(("\n".join(barcodes[1:]) + "\n").encode()))
    elif damage == "matrix_not_gzip":
        (mex / "matrix.mtx.gz").write_bytes(gzip.decompress((mex / "matrix.mtx.gz").read_bytes()))
    elif damage == "matrix_garbage":
        (mex / "matrix.mtx.gz").write_bytes(gzip.compress(b"%%MatrixMarket matrix coordinate integer general\nnot numbers\n"))
    elif damage == "duplicate_barcode":
        (mex / "barcodes.tsv.gz").write_bytes(gzip.compress(("\n".join([barcodes[1]] + barcodes[1:]) + "\n").encode()))
    with pytest.raises(DataError, match=message) as err:
        read_adata(tmp_path / "outs")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_gene_named_na_keeps_its_name(tmp_path):
    """A gene symbol such as NA (or NaN, null) is text in features.tsv, not a missing value."""
    mex = _mex_outs(tmp_path)
    features = gzip.decompress((mex / "features.tsv.gz").read_bytes()).decode().replace("\tAger\t", "\tNA\t")
    (mex / "features.tsv.gz").write_bytes(gzip.compress(features.encode()))
    assert list(read_spaceranger(tmp_path / "outs").var_names) == [g if g != "Ager" else "NA" for g in GENES]


# -- scale factors, images, duplicate gene names ---------------------------------------------------------

def test_missing_scalefactor_key_is_named_with_the_file(tmp_path):
    make_spaceranger(tmp_path / "outs", "sr2")
    path = tmp_path / "outs" / "spatial" / "scalefactors_json.json"
    path.write_text(json.dumps({k: v for k, v in SCALEFACTORS.items() if k != "tissue_hires_scalef"}))
    with pytest.raises(DataError) as err:
        read_adata(tmp_path / "outs")
    assert str(err.value) == (
        f"{path}: key(s) 'tissue_hires_scalef' missing from this file (Space Ranger writes spot_diameter_fullres, "
        "tissue_hires_scalef, tissue_lowres_scalef); found ['fiducial_diameter_fullres', 'spot_diameter_fullres', "
        "'tissue_lowres_scalef']")
    assert "got None" not in str(err.value)


@pytest.mark.parametrize("corruption", ["truncated", "not_png"])
def test_corrupt_hires_image_warns_and_the_section_still_loads(tmp_path, caplog, corruption):
    """The loader never uses the images (fullres landmarks need none; hires ones need only the scale factor)."""
    truth = make_spaceranger(tmp_path / "st" / "outs", "sr1")
    hires = tmp_path / "st" / "outs" / "spatial" / "tissue_hires_image.png"
    raw = hires.read_bytes()
    hires.write_bytes(raw[: len(raw) // 2] if corruption == "truncated" else b"not a png")
    with caplog.at_level(logging.WARNING, logger="xpression.data.spaceranger"):
        section = load_section(load_manifest(_cohort(tmp_path, "st")).section("s0"))
    np.testing.assert_allclose(section.px, _expected_xy(truth))
    images = next(iter(section.adata.uns["spatial"].values()))["images"]
    assert list(images) == ["lowres"]
    np.testing.assert_array_equal(images["lowres"], truth["lowres"])
    warned = [r.getMessage() for r in caplog.records if "cannot read image" in r.getMessage()]
    assert len(warned) == 1 and str(hires) in warned[0] and "\n" not in warned[0]


def test_duplicate_gene_names_are_made_unique_with_one_logged_line(tmp_path, caplog):
    make_spaceranger(tmp_path / "outs", "sr2")
    names = GENES[:2] + ["Cd74", "Cd74"] + GENES[4:]  # Sftpc and Ager renamed Cd74
    with h5py.File(tmp_path / "outs" / "filtered_feature_bc_matrix.h5", "r+") as f:
        feats = f["matrix/features"]
        del feats["name"]
        feats.create_dataset("name", data=_ascii(names + [ANTIBODY[1]]))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="xpression.data.spaceranger"):
        warnings.simplefilter("always")
        adata = read_adata(tmp_path / "outs")
    assert list(adata.var_names) == ["Cd74", "Ptprc", "Cd74-1", "Cd74-2", "Pecam1", "Col1a1"]
    assert list(adata.var["gene_ids"]) == GENE_IDS  # the IDs tell the copies apart
    assert not [w for w in caught if "not unique" in str(w.message)]  # anndata's warning is not needed
    lines = [r.getMessage() for r in caplog.records if "duplicate gene names" in r.getMessage()]
    assert lines == [f"{tmp_path / 'outs' / 'filtered_feature_bc_matrix.h5'}: 2 duplicate gene names made unique as "
                     "var_names_make_unique does (a -1, -2, ... suffix on each later copy, e.g. Cd74 -> Cd74-1, "
                     "Cd74 -> Cd74-2; var['gene_ids'] keeps their IDs)"]


def test_mex_fixture_reads_the_same_with_scanpy(tmp_path):
    """An independent MEX reader (scanpy's read_10x_mtx) agrees with ours on the same folder."""
    sc = pytest.importorskip("scanpy")
    make_spaceranger(tmp_path / "outs", "mex")
    ours = read_spaceranger(tmp_path / "outs")
    theirs = sc.read_10x_mtx(tmp_path / "outs" / "filtered_feature_bc_matrix", var_names="gene_symbols")
    np.testing.assert_array_equal(ours.X.toarray(), theirs.X.toarray())
    assert list(ours.var_names) == list(theirs.var_names)
    assert list(ours.var["gene_ids"]) == list(theirs.var["gene_ids"])
    assert list(ours.obs_names) == list(theirs.obs_names)

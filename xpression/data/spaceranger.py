"""Space Ranger output folders (Visium, Space Ranger 1.x-3.x) read into the AnnData scanpy users expect.

Read as Space Ranger writes them (10x "HDF5 Feature-Barcode Matrix Format" and "Spatial Outputs"):

- ``filtered_feature_bc_matrix.h5``: group ``matrix`` holding a CSC matrix of features x barcodes
  (``data``, ``indices``, ``indptr``, ``shape``), ``barcodes`` and ``features/{id, name,
  feature_type, genome}`` as fixed-length ASCII with XML character references; file attributes
  ``library_ids``, ``chemistry_description``, ``software_version``. The Cell Ranger 2 layout (one
  top-level group per genome with ``genes``/``gene_names``) is read too when it holds one genome.
- without that file, the same matrix as Market Exchange Format (10x "Feature-Barcode Matrices (MEX
  Format)", as many GEO uploads carry it): ``filtered_feature_bc_matrix/`` with ``matrix.mtx.gz``
  (features x barcodes, 1-based coordinates), ``features.tsv.gz`` (tab-separated, no header: id,
  name, feature_type) and ``barcodes.tsv.gz`` (one barcode a line). Uncompressed ``.mtx``/``.tsv``
  files are read too, and a two-column ``genes.tsv`` (id, name: the Cell Ranger 2 naming) as Gene
  Expression only, like the Cell Ranger 2 ``.h5``.
- ``spatial/tissue_positions_list.csv`` (1.x, no header), ``spatial/tissue_positions.csv`` (2.0+,
  header) or ``spatial/tissue_positions.parquet`` (needs pyarrow): ``barcode, in_tissue,
  array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres``; one row per spot of the slide,
  under tissue or not.
- ``spatial/scalefactors_json.json`` and the optional ``tissue_hires_image.png`` /
  ``tissue_lowres_image.png``. Nothing in this package needs the images (landmarks in hires/lowres
  pixels are converted with the scale factors), so an unreadable one is left out with a warning.

The result matches ``squidpy.read.visium`` / the former ``scanpy.read_visium``: raw counts (CSR,
float32) of the Gene Expression features, ``var_names`` gene names (``var['gene_ids']``,
``var['feature_types']``; duplicate names made unique with a logged warning, as
``var_names_make_unique`` does), ``obs_names`` barcodes, ``obs['in_tissue', 'array_row', 'array_col']``,
``obsm['spatial']`` = (x, y) = (``pxl_col_in_fullres``, ``pxl_row_in_fullres``) full-resolution
pixels, and ``uns['spatial'][library_id]`` with ``images``, ``scalefactors`` and ``metadata``.
"""

from __future__ import annotations

import gzip
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from xpression.data.geometry import DataError

__all__ = ["SpaceRangerFiles", "find_spaceranger_files", "read_spaceranger"]

log = logging.getLogger(__name__)

MATRIX_FILE = "filtered_feature_bc_matrix.h5"
MEX_FOLDER = "filtered_feature_bc_matrix"
# The MEX files, each in order of preference (Space Ranger writes the first).
MEX_FILES = {"matrix": ("matrix.mtx.gz", "matrix.mtx"),
             "features": ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"),
             "barcodes": ("barcodes.tsv.gz", "barcodes.tsv")}
# In order of preference: the CSV layouts need no optional dependency.
POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv", "tissue_positions.parquet")
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
SCALEFACTORS_FILE = "scalefactors_json.json"
REQUIRED_SCALEFACTORS = ("spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef")
IMAGE_FILES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}
GENE_EXPRESSION = "Gene Expression"


@dataclass(frozen=True)
class SpaceRangerFiles:
    """The files of one Space Ranger output folder (``outs/``); images are None when absent."""

    root: Path
    matrix: Path  # filtered_feature_bc_matrix.h5, or the filtered_feature_bc_matrix/ MEX folder without it
    positions: Path
    scalefactors: Path
    images: dict[str, Path]


def find_spaceranger_files(folder: str | Path) -> SpaceRangerFiles:
    """Locate the files of a Space Ranger output folder (the run folder or its ``outs/``).

    Raises:
        DataError: naming the folder and the first required file that is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "Space Ranger output folder not found")

    def has_matrix(path: Path) -> bool:
        return (path / MATRIX_FILE).is_file() or (path / MEX_FOLDER).is_dir()

    root = folder
    if not has_matrix(root) and has_matrix(folder / "outs"):
        root = folder / "outs"
    if not has_matrix(root):
        raise DataError(folder, f"not a Space Ranger output folder: no {MATRIX_FILE} (nor a {MEX_FOLDER}/ folder) "
                                "in it or in its outs/")
    matrix = root / MATRIX_FILE
    if not matrix.is_file():
        matrix = root / MEX_FOLDER
        _mex_files(matrix)  # all three files there
    spatial = root / "spatial"
    positions = next((spatial / name for name in POSITION_FILES if (spatial / name).is_file()), None)
    if positions is None:
        raise DataError(root, f"Space Ranger folder without spot positions: none of spatial/{{{', '.join(POSITION_FILES)}}}")
    if not (spatial / SCALEFACTORS_FILE).is_file():
        raise DataError(root, f"Space Ranger folder without spatial/{SCALEFACTORS_FILE}")
    images = {res: spatial / name for res, name in IMAGE_FILES.items() if (spatial / name).is_file()}
    return SpaceRangerFiles(root, matrix, positions, spatial / SCALEFACTORS_FILE, images)


def read_spaceranger(folder: str | Path, library_id: str | None = None) -> Any:
    """Read a Space Ranger output folder into an AnnData (see the module docstring).

    The matrix is ``filtered_feature_bc_matrix.h5``, else the ``filtered_feature_bc_matrix/`` MEX folder
    (the same AnnData either way). Only Gene Expression features become genes; duplicate gene names
    are made unique as ``var_names_make_unique`` does (``-1``, ``-2``, ... on the later copies), with
    one logged warning. Matrix barcodes must all have a position; positions
    of spots not in the matrix (the filtered matrix holds the spots under tissue) are dropped.
    ``library_id`` defaults to the matrix's ``library_ids`` attribute, else the folder name (the
    run folder's for ``outs/``).

    Raises:
        DataError: one line naming the file and the problem (missing file, malformed table, ...).
    """
    import anndata as ad

    files = find_spaceranger_files(folder)
    scalefactors = _read_scalefactors(files.scalefactors)  # the small files first
    positions = _read_positions(files.positions)
    counts, barcodes, var, attrs = _read_mex(files.matrix) if files.matrix.is_dir() else _read_matrix(files.matrix)
    var.index = _unique_names(var.index, files.matrix)
    missing = pd.Index(barcodes).difference(positions.index)
    if len(missing):
        raise DataError(files.positions, f"{len(missing)} of {len(barcodes)} barcodes of {files.matrix.name} have no "
                                         f"position, e.g. {missing[:3].tolist()}")
    positions = positions.loc[barcodes]
    obs = pd.DataFrame({c: positions[c].to_numpy(np.int64) for c in ("in_tissue", "array_row", "array_col")},
                       index=pd.Index(barcodes, dtype=object))
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["spatial"] = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    folder_name = files.root.parent.name if files.root.name == "outs" else files.root.name
    library = library_id or _library_id(attrs) or folder_name
    metadata = {k: attrs[k] for k in ("chemistry_description", "software_version") if k in attrs}
    adata.uns["spatial"] = {library: {"images": _read_images(files.images),
                                      "scalefactors": scalefactors,
                                      "metadata": metadata}}
    return adata


# -- the feature-barcode matrix ----------------------------------------------------------------------

def _text(values: np.ndarray) -> list[str]:
    """Fixed-length ASCII with XML character references (as Space Ranger stores strings) -> str."""
    return [html.unescape(v.decode("ascii") if isinstance(v, bytes) else str(v)) for v in np.asarray(values).ravel()]


def _attr_text(value: Any) -> Any:
    if isinstance(value, bytes):
        return html.unescape(value.decode("ascii", errors="replace"))
    if isinstance(value, np.ndarray) and value.dtype.kind in "SUO":
        return _text(value)
    return value.item() if isinstance(value, np.generic) else value


def _library_id(attrs: dict) -> str | None:
    ids = attrs.get("library_ids")
    if isinstance(ids, list) and ids:
        return str(ids[0])
    return ids if isinstance(ids, str) and ids else None


def _read_matrix(path: Path) -> tuple[sp.csr_matrix, list[str], pd.DataFrame, dict]:
    """(spots x Gene Expression features CSR float32, barcodes, var, file attributes)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _attr_text(v) for k, v in f.attrs.items()}
            if "matrix" in f:
                group = f["matrix"]
                if "features" not in group:
                    raise DataError(path, "group 'matrix' has no 'features' group (not a 10x feature-barcode matrix)")
                feats = group["features"]
                _require(path, feats, ("id", "name", "feature_type"), "matrix/features/")
                ids, names, types = (_text(feats[k][()]) for k in ("id", "name", "feature_type"))
                genome = _text(feats["genome"][()]) if "genome" in feats else None
            else:
                groups = [k for k in f if isinstance(f[k], h5py.Group)]
                if len(groups) != 1:
                    raise DataError(path, f"no 'matrix' group and {len(groups)} genome groups {groups}; expected a 10x "
                                          "feature-barcode matrix (one 'matrix' group, or one genome group of Cell Ranger 2)")
                group = f[groups[0]]
                _require(path, group, ("genes", "gene_names"), f"{groups[0]}/")
                ids, names = _text(group["genes"][()]), _text(group["gene_names"][()])
                types, genome = [GENE_EXPRESSION] * len(ids), [groups[0]] * len(ids)
            _require(path, group, ("barcodes", "data", "indices", "indptr", "shape"), f"{group.name.strip('/')}/")
            barcodes = _text(group["barcodes"][()])
            data, indices, indptr = (np.asarray(group[k][()]) for k in ("data", "indices", "indptr"))
            shape = tuple(int(s) for s in group["shape"][()])
    except OSError as err:
        raise DataError(path, f"cannot read HDF5 file ({err})") from err
    n_features, n_barcodes = shape
    if len(barcodes) != n_barcodes or len(ids) != n_features or len(indptr) != n_barcodes + 1:
        raise DataError(path, f"inconsistent matrix: shape {list(shape)}, {len(ids)} features, {len(barcodes)} barcodes, "
                              f"indptr of length {len(indptr)} (expected {n_barcodes + 1})")
    if len(data) != len(indices) or (len(indices) and (indices.min() < 0 or indices.max() >= n_features)):
        raise DataError(path, "inconsistent matrix: 'indices' out of range or not as long as 'data'")
    # CSC features x barcodes is the CSR barcodes x features matrix, read as is.
    counts = sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(n_barcodes, n_features))
    counts, var = _gene_expression(path, counts, barcodes, ids, names, types, genome)
    return counts, barcodes, var, attrs


def _gene_expression(path: Path, counts: sp.csr_matrix, barcodes: list[str], ids: list[str], names: list[str],
                     types: list[str], genome: list[str] | None) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """The Gene Expression columns of ``counts`` (barcodes x features) and their ``var``; the same for
    the ``.h5`` and the MEX matrix."""
    if pd.Index(barcodes).has_duplicates:
        raise DataError(path, f"duplicate barcodes, e.g. {pd.Index(barcodes)[pd.Index(barcodes).duplicated()][:3].tolist()}")
    gene = np.asarray(types) == GENE_EXPRESSION
    if not gene.any():
        raise DataError(path, f"no '{GENE_EXPRESSION}' features; feature types: {sorted(set(types))}")
    var = pd.DataFrame({"gene_ids": np.asarray(ids, dtype=object)[gene],
                        "feature_types": np.asarray(types, dtype=object)[gene]},
                       index=pd.Index(np.asarray(names, dtype=object)[gene], dtype=object))
    if genome is not None:
        var["genome"] = np.asarray(genome, dtype=object)[gene]
    if not gene.all():
        log.info("%s: %d non-gene-expression features left out (%s)", path, int((~gene).sum()), sorted(set(types) - {GENE_EXPRESSION}))
    return counts[:, np.flatnonzero(gene)].tocsr(), var


def _mex_files(folder: Path) -> dict[str, Path]:
    """The matrix, features and barcodes files of a MEX folder (``MEX_FILES``, first found of each)."""
    found, missing = {}, []
    for kind, names in MEX_FILES.items():
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            missing.append(names[0])
        else:
            found[kind] = path
    if missing:
        raise DataError(folder, f"no {MATRIX_FILE} beside it and this MEX folder has no {' or '.join(missing)}")
    return found


def _read_table(path: Path, what: str) -> pd.DataFrame:
    """A headerless tab-separated file (``.gz`` or plain) as strings, read verbatim (a gene named NA stays NA)."""
    try:
        table = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=3,
                            compression="gzip" if path.name.endswith(".gz") else None)
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(path, f"cannot read {what} ({type(err).__name__}: {err})") from err
    return table


def _read_mex(folder: Path) -> tuple[sp.csr_matrix, list[str], pd.DataFrame, dict]:
    """The MEX folder read as :func:`_read_matrix` reads the ``.h5`` (file attributes: the
    ``software_version`` of the ``%metadata_json`` header line, when there is one)."""
    import scipy.io

    files = _mex_files(folder)
    path = files["features"]
    features = _read_table(path, "features")
    if path.name.startswith("genes"):  # Cell Ranger 2 naming: id, name; genes only
        if features.shape[1] < 2:
            raise DataError(path, f"expected 2 tab-separated columns (id, name), got {features.shape[1]}")
        types = [GENE_EXPRESSION] * len(features)
    else:
        if features.shape[1] < 3:
            raise DataError(path, f"expected 3 tab-separated columns (id, name, feature_type), got {features.shape[1]}"
                                  + ("; a 2-column file is the Cell Ranger 2 genes.tsv" if features.shape[1] == 2 else ""))
        types = features[2].tolist()
    ids, names = features[0].tolist(), features[1].tolist()
    barcode_table = _read_table(files["barcodes"], "barcodes")
    barcodes = barcode_table[0].tolist()
    path = files["matrix"]
    attrs: dict = {}
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for line in iter(fh.readline, b""):
                if not line.startswith(b"%"):
                    break
                if line.startswith(b"%metadata_json:"):
                    try:
                        meta = json.loads(line.split(b":", 1)[1])
                    except ValueError:
                        meta = {}
                    if isinstance(meta, dict) and isinstance(meta.get("software_version"), str):
                        attrs["software_version"] = meta["software_version"]
        with opener(path, "rb") as fh:
            matrix = scipy.io.mmread(fh)
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read Matrix Market file ({type(err).__name__}: {err})") from err
    if not sp.issparse(matrix):
        raise DataError(path, "expected a sparse 'coordinate' Matrix Market matrix, got a dense 'array' one")
    if matrix.shape != (len(ids), len(barcodes)):
        raise DataError(path, f"inconsistent matrix: shape {list(matrix.shape)} (features x barcodes), "
                              f"{len(ids)} features in {files['features'].name}, {len(barcodes)} barcodes in "
                              f"{files['barcodes'].name}")
    counts = sp.csr_matrix(matrix.T, dtype=np.float32)
    counts, var = _gene_expression(folder, counts, barcodes, ids, names, types, None)
    return counts, barcodes, var, attrs


def _unique_names(names: pd.Index, path: Path) -> pd.Index:
    """``names`` made unique as ``AnnData.var_names_make_unique`` does, saying so in one warning."""
    if not names.has_duplicates:
        return names
    from anndata.utils import make_index_unique

    unique = make_index_unique(pd.Index(names, dtype=object))
    renamed = unique[unique != names]
    log.warning("%s: %d duplicate gene names made unique as var_names_make_unique does (a -1, -2, ... suffix on "
                "each later copy, e.g. %s; var['gene_ids'] keeps their IDs)", path, len(renamed),
                ", ".join(f"{a} -> {b}" for a, b in zip(names[unique != names][:3], renamed[:3])))
    return unique


def _require(path: Path, group: Any, keys: tuple[str, ...], prefix: str) -> None:
    missing = [k for k in keys if k not in group]
    if missing:
        raise DataError(path, f"not a 10x feature-barcode matrix: missing {', '.join(prefix + k for k in missing)}")


# -- spot positions, scale factors, images -----------------------------------------------------------

def _read_positions(path: Path) -> pd.DataFrame:
    """Spot positions indexed by barcode, columns as in ``POSITION_COLUMNS`` (header or not)."""
    try:
        if path.suffix == ".parquet":
            table = _read_parquet(path)
        else:
            with path.open() as fh:
                has_header = fh.readline().split(",")[0].strip().strip('"') == "barcode"
            table = pd.read_csv(path, header=0 if has_header else None, dtype={"barcode" if has_header else 0: str})
            if not has_header:  # Space Ranger 1.x: no header, the documented column order
                if table.shape[1] != len(POSITION_COLUMNS):
                    raise DataError(path, f"expected {len(POSITION_COLUMNS)} columns ({', '.join(POSITION_COLUMNS)}), got {table.shape[1]}")
                table.columns = list(POSITION_COLUMNS)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(path, f"cannot read spot positions ({err})") from err
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; found {list(table.columns)}")
    table = table[list(POSITION_COLUMNS)]
    numbers = table[list(POSITION_COLUMNS[1:])].apply(pd.to_numeric, errors="coerce")
    if numbers.isna().any().any():
        bad = numbers.columns[numbers.isna().any()].tolist()
        raise DataError(path, f"non-numeric or empty values in column(s) {bad}")
    if not numbers["in_tissue"].isin([0, 1]).all():
        raise DataError(path, "in_tissue must be 0 or 1")
    index = pd.Index(table["barcode"].astype(str).to_numpy(dtype=object), dtype=object, name=None)
    if index.has_duplicates:
        raise DataError(path, f"duplicate barcodes, e.g. {index[index.duplicated()][:3].tolist()}")
    numbers.index = index
    return numbers


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except ImportError as err:
        raise DataError(path, "reading tissue_positions.parquet needs the optional dependency pyarrow "
                              "(pip install pyarrow)") from err


def _read_scalefactors(path: Path) -> dict[str, float]:
    try:
        factors = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(path, f"cannot read scale factors ({err})") from err
    if not isinstance(factors, dict):
        raise DataError(path, f"expected a JSON object, got {type(factors).__name__}")
    absent = [key for key in REQUIRED_SCALEFACTORS if key not in factors]
    if absent:
        raise DataError(path, f"key(s) {', '.join(map(repr, absent))} missing from this file (Space Ranger writes "
                              f"{', '.join(REQUIRED_SCALEFACTORS)}); found {sorted(factors)}")
    for key in REQUIRED_SCALEFACTORS:
        value = factors[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise DataError(path, f"{key!r} must be a positive number, got {value!r}")
    return factors


def _read_images(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    """The images that can be read; an unreadable one is left out with a warning (nothing here needs them)."""
    from PIL import Image

    images = {}
    for res, path in paths.items():
        try:
            with Image.open(path) as im:
                image = np.asarray(im)
            if image.ndim not in (2, 3) or image.dtype.kind not in "uif":
                raise ValueError(f"decoded to a {image.dtype} array of shape {image.shape}")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            log.warning("%s: cannot read image, left out of uns['spatial'][...]['images'] (%s: %s); only plots over "
                        "the H&E need it", path, type(err).__name__, err)
            continue
        images[res] = image
    for res in sorted(set(IMAGE_FILES) - set(paths)):
        log.info("no spatial/%s: uns['spatial'][...]['images'] has no %r image", IMAGE_FILES[res], res)
    return images

"""What the model predicts per spot: an obsm matrix, genes, or programs computed here.

Every target is a small config object (Hydra ``_target_``) whose ``compute(adatas)`` takes
``{section_id: AnnData}`` and returns ``({section_id: float32 (n_spots, T)}, TargetSpec)``.
Programs are fitted jointly over all the sections given, so they share one set of names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from xpression.data.geometry import DataError

__all__ = ["TargetSpec", "ObsmTarget", "GenesTarget", "ProgramsTarget", "dominant_index", "to_composition"]

log = logging.getLogger(__name__)

TargetKind = Literal["composition", "log_expression", "counts"]
KINDS = ("composition", "log_expression", "counts")


@dataclass(frozen=True)
class TargetSpec:
    """Names of the T target columns and their kind (composition / log_expression / counts)."""

    names: list[str]
    kind: TargetKind

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TargetSpec.kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def n_targets(self) -> int:
        return len(self.names)


def _where(adata: Any, sid: str) -> str:
    path = getattr(adata, "filename", None) or adata.uns.get("_xpression_path")
    return f"{path} (section {sid})" if path else f"section {sid}"


COMPOSITION_SUM_TOLERANCE = 1e-3  # |row sum - 1| accepted as a composition (float32 scores round)


def _refuse_negative(values: np.ndarray, where: object, what: str, hint: str) -> None:
    """Raise :class:`DataError` for negative entries beyond float round-off (1e-6 of the largest value)."""
    tolerance = 1e-6 * float(np.abs(values).max(initial=0.0))
    negative = values < -tolerance
    if negative.any():
        rows = int(negative.any(axis=1).sum())
        raise DataError(where, f"{what}: {rows} of {len(values)} spots have negative values (min {values.min():.4g}); {hint}")


def to_composition(values: np.ndarray, where: object = None) -> np.ndarray:
    """Scale rows to sum to 1. Negative entries (beyond round-off, which is clipped to 0) and
    rows that sum to 0 raise :class:`DataError`: clipping signed scores would invent proportions."""
    v = np.asarray(values, dtype=np.float64)
    _refuse_negative(v, where, "cannot renormalise the target to compositions",
                     "signed scores are not proportions: set target.renormalize=false with target.kind=log_expression")
    v = np.clip(v, 0.0, None)
    s = v.sum(axis=1, keepdims=True)
    if np.any(s <= 0):
        raise DataError(where, f"{int((s <= 0).sum())} spots have all-zero target values; cannot renormalise")
    return (v / s).astype(np.float32)


def dominant_index(values: np.ndarray, kind: str) -> np.ndarray:
    """Dominant column per spot: argmax for compositions, argmax of column z-scores otherwise."""
    v = np.asarray(values, dtype=np.float64)
    if kind != "composition":
        v = (v - v.mean(axis=0)) / (v.std(axis=0) + 1e-12)
    return v.argmax(axis=1).astype(np.int64)


def _check_declared_kind(values: np.ndarray, kind: str, where: object, key: str) -> None:
    """Targets used as they are (``renormalize=false``) must be what ``kind`` says: compositions
    non-negative with rows summing to 1, counts non-negative."""
    what = f"target {key!r} declared kind={kind} with renormalize=false"
    if kind == "composition":
        _refuse_negative(values, where, what, "proportions cannot be negative: for signed scores use target.kind=log_expression")
        off = np.abs(values.sum(axis=1) - 1.0) > COMPOSITION_SUM_TOLERANCE
        if off.any():
            sums = values.sum(axis=1)[off]
            raise DataError(where, f"{what}, but {int(off.sum())} of {len(values)} spots' values do not sum to 1 "
                            f"(sums from {sums.min():.4g} to {sums.max():.4g}); set target.renormalize=true to scale "
                            "each spot to proportions, or target.kind=log_expression")
    elif kind == "counts":
        _refuse_negative(values, where, what, "counts cannot be negative; use target.kind=log_expression")


def _check_finite(values: np.ndarray, where: object, what: str) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise DataError(where, f"{what} contains NaN or inf")
    return values


@dataclass
class ObsmTarget:
    """An ``obsm`` matrix (e.g. ``programs_true`` or Chrysalis ``chr_aa``) as the target.

    ``table``: optional CSV path (``{section}`` is replaced by the section id) whose first
    column holds spot barcodes; used instead of ``obsm`` for scores computed elsewhere.
    ``renormalize`` scales rows to compositions (negative scores are refused, not clipped);
    without it the values must already be what ``kind`` says (compositions: rows summing to 1).
    ``names`` overrides the column names.
    """

    key: str = "programs_true"
    renormalize: bool = True
    kind: TargetKind = "composition"
    table: str | None = None
    names: Sequence[str] | None = None

    def _names(self, adata: Any, n: int, columns: Sequence[str] | None) -> list[str]:
        if self.names is not None:
            return [str(x) for x in self.names]
        if columns is not None:
            return [str(c) for c in columns]
        for k in (f"{self.key}_names", "programs"):
            got = adata.uns.get(k)
            if got is not None and len(got) == n:
                return [str(x) for x in got]
        return [f"{self.key}_{i}" for i in range(n)]

    def _from_table(self, adata: Any, sid: str) -> pd.DataFrame:
        path = Path(str(self.table).replace("{section}", sid))
        if not path.is_file():
            raise DataError(path, f"target table for section {sid} not found")
        try:
            df = pd.read_csv(path, index_col=0)
        except Exception as err:
            raise DataError(path, f"cannot read target table ({err})") from err
        df.index = df.index.astype(str)
        missing = adata.obs_names.difference(df.index)
        if len(missing):
            raise DataError(
                path,
                f"spot ids do not match the AnnData {_where(adata, sid)}: {len(missing)} of {adata.n_obs} "
                f"barcodes have no target row, e.g. {missing[:5].tolist()}",
            )
        return df.loc[adata.obs_names]

    def compute(self, adatas: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], TargetSpec]:
        """Per-section target arrays (n_spots, T) float32 and their spec."""
        out: dict[str, np.ndarray] = {}
        names: list[str] | None = None
        for sid, adata in adatas.items():
            where = _where(adata, sid)
            columns = None
            if self.table is not None:
                df = self._from_table(adata, sid)
                values, columns, where = df.to_numpy(dtype=float), list(df.columns), Path(str(self.table).replace("{section}", sid))
            else:
                if self.key not in adata.obsm:
                    raise DataError(where, f"obsm key {self.key!r} not found; available obsm keys: {sorted(adata.obsm.keys())}")
                raw = adata.obsm[self.key]
                if isinstance(raw, pd.DataFrame):
                    if not raw.index.equals(adata.obs_names):
                        raise DataError(where, f"obsm[{self.key!r}] rows do not match the spot barcodes")
                    columns = list(raw.columns)
                    raw = raw.to_numpy()
                values = np.asarray(raw.toarray() if sp.issparse(raw) else raw, dtype=float)
            if values.ndim != 2 or values.shape[0] != adata.n_obs:
                raise DataError(where, f"target has shape {values.shape}, expected ({adata.n_obs}, T)")
            _check_finite(values, where, f"target {self.key!r}")
            if self.renormalize:
                values = to_composition(values, where)
            else:
                _check_declared_kind(values, self.kind, where, self.key)
            these = self._names(adata, values.shape[1], columns)
            if names is not None and these != names:
                raise DataError(where, f"target columns {these} differ from another section's {names}")
            names = these
            out[sid] = values.astype(np.float32)
        kind = "composition" if self.renormalize else self.kind
        return out, TargetSpec(names or [], kind)


def _normalised(adata: Any, target_sum: float | None) -> Any:
    import scanpy as sc

    a = adata.copy()
    a.X = a.X.astype(np.float32)
    sc.pp.normalize_total(a, target_sum=target_sum)
    sc.pp.log1p(a)
    return a


def _concat(adatas: Mapping[str, Any]) -> Any:
    import anndata as ad

    common = None
    for a in adatas.values():
        common = a.var_names if common is None else common.intersection(a.var_names)
    parts = {sid: a[:, common] for sid, a in adatas.items()}
    joint = ad.concat(parts, label="section_id", index_unique="::")
    return joint


def _split_rows(joint: Any, values: np.ndarray, adatas: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for sid, a in adatas.items():
        out[sid] = np.ascontiguousarray(values[start : start + a.n_obs], dtype=np.float32)
        start += a.n_obs
    return out


def _top_hvg(norm: Any, n_top: int) -> list[str]:
    import scanpy as sc

    n_top = min(int(n_top), norm.n_vars)
    info = sc.pp.highly_variable_genes(norm, n_top_genes=n_top, flavor="seurat", inplace=False)
    order = np.argsort(-np.nan_to_num(np.asarray(info["dispersions_norm"], dtype=float), nan=-np.inf))
    return [str(g) for g in norm.var_names[order[:n_top]]]


@dataclass
class GenesTarget:
    """Log-normalised expression of ``genes`` (or of the ``n_top`` most variable genes).

    Counts are library-size normalised (``target_sum`` per spot, None = median) then log1p.
    With ``counts=True`` the targets are the raw integer counts instead (kind ``counts``, for
    count losses such as ``poisson``); genes are still chosen on the normalised data.
    """

    genes: Sequence[str] | None = None
    n_top: int | None = None
    target_sum: float | None = 1e4
    counts: bool = False

    def compute(self, adatas: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], TargetSpec]:
        """Per-section (n_spots, T) float32 log1p expression and a ``log_expression`` spec."""
        if (self.genes is None) == (self.n_top is None):
            raise ValueError("GenesTarget: give exactly one of `genes` (a list) or `n_top` (an int)")
        if self.genes is not None:
            genes = [str(g) for g in self.genes]
            for sid, a in adatas.items():
                missing = [g for g in genes if g not in a.var_names]
                if missing:
                    raise DataError(_where(a, sid), f"genes not found: {missing} ({a.n_vars} genes available)")
        raw = _concat(adatas)
        joint = _normalised(raw, self.target_sum)
        if self.genes is None:
            genes = _top_hvg(joint, int(self.n_top))  # type: ignore[arg-type]
        if self.counts:
            x = raw[:, genes].X
            kind = "counts"
        else:
            x = joint[:, genes].X
            kind = "log_expression"
        values = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)
        return _split_rows(joint, values, adatas), TargetSpec(list(genes), kind)


def _morans_top(joint: Any, n_top: int) -> list[str]:
    import scanpy as sc
    from sklearn.neighbors import kneighbors_graph

    scores = np.zeros(joint.n_vars)
    x = joint.X.toarray() if sp.issparse(joint.X) else np.asarray(joint.X)
    sections = np.asarray(joint.obs["section_id"])
    for sid in np.unique(sections):
        rows = sections == sid
        graph = kneighbors_graph(joint.obsm["spatial"][rows], n_neighbors=min(6, rows.sum() - 1), include_self=False)
        scores += np.nan_to_num(sc.metrics.morans_i(graph, x[rows].T))
    order = np.argsort(-scores)
    return [str(g) for g in joint.var_names[order[: min(n_top, joint.n_vars)]]]


def _archetypes(x: np.ndarray, k: int, rng: np.random.Generator, n_iter: int = 30) -> np.ndarray:
    """Archetypal analysis (alternating constrained least squares); returns (N, k) compositions."""
    from scipy.optimize import nnls

    def simplex_ls(basis: np.ndarray, y: np.ndarray, weight: float = 200.0) -> np.ndarray:
        aug = np.vstack([basis, np.full((1, basis.shape[1]), weight)])
        return nnls(aug, np.append(y, weight))[0]

    # Furthest-sum initialisation picks extreme spots.
    idx = [int(rng.integers(len(x)))]
    for _ in range(k):
        d = np.linalg.norm(x[:, None, :] - x[idx][None], axis=2).sum(axis=1)
        d[idx] = -1
        idx.append(int(d.argmax()))
    z = x[idx[1:]].copy()
    scale = np.abs(x).max() + 1e-12
    xs, zs = x / scale, z / scale
    for _ in range(n_iter):
        a = np.array([simplex_ls(zs.T, row) for row in xs])
        target = np.linalg.lstsq(a, xs, rcond=None)[0]
        b = np.array([simplex_ls(xs.T, t) for t in target])
        zs = b @ xs
    a = np.array([simplex_ls(zs.T, row) for row in xs])
    return a / a.sum(axis=1, keepdims=True)


@dataclass
class ProgramsTarget:
    """Expression programs fitted from counts, as per-spot compositions.

    Genes: the ``n_genes`` most highly variable (``gene_selection='hvg'``) or most spatially
    autocorrelated (``'moran'``, Moran's I on a 6-nearest-spot graph) after library-size
    normalisation and log1p. ``method='nmf'`` factorises those genes with NMF;
    ``'archetypes'`` runs archetypal analysis on ``n_pcs`` principal components (as Chrysalis).
    """

    n_programs: int = 8
    method: Literal["nmf", "archetypes"] = "nmf"
    n_genes: int = 1000
    gene_selection: Literal["hvg", "moran"] = "hvg"
    n_pcs: int = 20
    seed: int = 0

    def compute(self, adatas: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], TargetSpec]:
        """Per-section (n_spots, n_programs) float32 compositions and a ``composition`` spec."""
        joint = _normalised(_concat(adatas), 1e4)
        genes = _top_hvg(joint, self.n_genes) if self.gene_selection == "hvg" else _morans_top(joint, self.n_genes)
        x = joint[:, genes].X
        x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
        k = int(self.n_programs)
        if k < 2 or k > min(x.shape):
            raise ValueError(f"ProgramsTarget: n_programs={k} must be in [2, {min(x.shape)}]")
        if self.method == "nmf":
            from sklearn.decomposition import NMF

            w = NMF(n_components=k, init="nndsvda", random_state=self.seed, max_iter=500).fit_transform(x)
            w = w + 1e-9
            comp = w / w.sum(axis=1, keepdims=True)
        elif self.method == "archetypes":
            from sklearn.decomposition import PCA

            n_pcs = max(k, min(int(self.n_pcs), min(x.shape) - 1))
            pcs = PCA(n_components=n_pcs, random_state=self.seed).fit_transform(x)
            comp = _archetypes(pcs, k, np.random.default_rng(self.seed))
        else:
            raise ValueError(f"ProgramsTarget.method must be 'nmf' or 'archetypes', got {self.method!r}")
        names = [f"program_{i}" for i in range(k)]
        log.info("programs: %s on %d genes x %d spots -> %d programs", self.method, len(genes), x.shape[0], k)
        return _split_rows(joint, comp.astype(np.float32), adatas), TargetSpec(names, "composition")

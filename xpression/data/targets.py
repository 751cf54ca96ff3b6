"""What the model predicts per spot: an obsm matrix, genes, or programs computed here.

Every target is a small config object (Hydra ``_target_``) whose ``compute(adatas)`` takes
``{section_id: AnnData}`` and returns ``({section_id: float32 (n_spots, T)}, TargetSpec)``.
Programs are fitted on the ``fit_sections`` (default: all given) and applied to the others, so
every section shares one set of names; with ``reference`` the fitted programs are matched to
known programs (e.g. a phantom's truth) by :func:`match_programs`, and the spec records it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from xpression.data.chrysalis import CHRYSALIS_KEY, compartment_colors, compartment_names
from xpression.data.geometry import DataError
from xpression.data.kinds import KINDS, get_kind, refuse_negative

__all__ = ["KINDS", "TargetSpec", "ObsmTarget", "GenesTarget", "ProgramsTarget", "FittedPrograms", "match_programs",
           "dominant_index", "to_composition"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TargetSpec:
    """Names of the T target columns, their kind (a registered ``xpression.data.kinds`` name:
    composition / log_expression / counts / ...) and,
    optionally, one colour per target (any matplotlib colour) for maps and figures.

    ``reference``: for programs fitted from counts and matched to known programs,
    ``{target name: reference program name}`` (matched targets only); ``reference_r``: the
    Pearson r of each match over the spots it was made on.
    """

    names: list[str]
    kind: str
    colors: list[str] | None = None
    reference: dict[str, str] | None = field(default=None, hash=False)
    reference_r: dict[str, float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        try:
            get_kind(self.kind)
        except ValueError:
            raise ValueError(f"TargetSpec.kind must be one of {KINDS.names()}, got {self.kind!r}") from None
        if self.colors is not None:
            from matplotlib.colors import is_color_like

            if len(self.colors) != len(self.names) or not all(is_color_like(c) for c in self.colors):
                raise ValueError(f"TargetSpec.colors must be {len(self.names)} colours (one per target), got {self.colors!r}")

    @property
    def n_targets(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        """Plain ``{"names": [...], "kind": ...}`` (checkpoints, metadata), with ``colors`` when
        set and ``reference`` / ``reference_r`` when the targets were matched to known programs."""
        out: dict = {"names": [str(n) for n in self.names], "kind": str(self.kind)}
        if self.colors is not None:
            out["colors"] = [str(c) for c in self.colors]
        if self.reference:
            out["reference"] = {str(k): str(v) for k, v in self.reference.items()}
            out["reference_r"] = {str(k): float(v) for k, v in (self.reference_r or {}).items()}
        return out

    def reference_name(self, name: str) -> str:
        """The reference program a target was matched to, else the target's own name (so
        targets read from the reference itself, e.g. ``programs_true``, map to themselves)."""
        return (self.reference or {}).get(name, name)


def _where(adata: Any, sid: str) -> str:
    path = getattr(adata, "filename", None) or adata.uns.get("_xpression_path")
    return f"{path} (section {sid})" if path else f"section {sid}"


def to_composition(values: np.ndarray, where: object = None) -> np.ndarray:
    """Scale rows to sum to 1. Negative entries (beyond round-off, which is clipped to 0) and
    rows that sum to 0 raise :class:`DataError`: clipping signed scores would invent proportions."""
    v = np.asarray(values, dtype=np.float64)
    refuse_negative(v, where, "cannot renormalise the target to compositions",
                     "signed scores are not proportions: set target.renormalize=false with target.kind=log_expression")
    v = np.clip(v, 0.0, None)
    s = v.sum(axis=1, keepdims=True)
    if np.any(s <= 0):
        raise DataError(where, f"{int((s <= 0).sum())} spots have all-zero target values; cannot renormalise")
    return (v / s).astype(np.float32)


def dominant_index(values: np.ndarray, kind: str) -> np.ndarray:
    """Dominant column per spot, as the kind defines it (``TargetKind.dominant``: the largest
    proportion of a composition, the largest column z-score otherwise)."""
    return get_kind(kind).dominant(values)


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
    ``names`` overrides the column names (else DataFrame columns, ``uns['<key>_names']``,
    ``uns['programs']``; Chrysalis ``chr_aa``: ``compartment_<i>``). ``colors`` gives one colour
    per target (else ``uns['<key>_colors']``, the scanpy convention; Chrysalis ``chr_aa``: the
    colours of Chrysalis's own plots). With several sections the first section's colours are used.
    """

    key: str = "programs_true"
    renormalize: bool = True
    kind: str = "composition"
    table: str | None = None
    names: Sequence[str] | None = None
    colors: Sequence[str] | None = None

    def _names(self, adata: Any, n: int, columns: Sequence[str] | None) -> list[str]:
        if self.names is not None:
            return [str(x) for x in self.names]
        if columns is not None:
            return [str(c) for c in columns]
        for k in (f"{self.key}_names", "programs"):
            got = adata.uns.get(k)
            if got is not None and len(got) == n:
                return [str(x) for x in got]
        if self.key == CHRYSALIS_KEY:
            return compartment_names(n)
        return [f"{self.key}_{i}" for i in range(n)]

    def _colors(self, adata: Any, n: int) -> list[str] | None:
        if self.colors is not None:
            return [str(c) for c in self.colors]
        got = adata.uns.get(f"{self.key}_colors")
        if got is not None and len(got) == n:
            return [str(c) for c in got]
        if self.key == CHRYSALIS_KEY:
            return compartment_colors(n, adata.n_obs)
        return None

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
        colors: list[str] | None = None
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
                get_kind(self.kind).check_declared(values, where, f"target {self.key!r} declared kind={self.kind} "
                                                                  "with renormalize=false")
            these = self._names(adata, values.shape[1], columns)
            if names is not None and these != names:
                raise DataError(where, f"target columns {these} differ from another section's {names}")
            names = these
            colors = self._colors(adata, values.shape[1]) if colors is None else colors
            out[sid] = values.astype(np.float32)
        kind = "composition" if self.renormalize else self.kind
        try:
            return out, TargetSpec(names or [], kind, colors)
        except ValueError as err:
            raise DataError(f"ObsmTarget {self.key!r}", str(err)) from None


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


def _simplex_weights(basis: np.ndarray, rows: np.ndarray, weight: float = 200.0) -> np.ndarray:
    """Non-negative weights summing to ~1 (a heavily weighted sum row) that best rebuild each
    row of ``rows`` from the rows of ``basis``: (N, k)."""
    from scipy.optimize import nnls

    aug = np.vstack([basis.T, np.full((1, basis.shape[0]), weight)])
    return np.array([nnls(aug, np.append(r, weight))[0] for r in rows])


def _archetypes(x: np.ndarray, k: int, rng: np.random.Generator, n_iter: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Archetypal analysis (alternating constrained least squares).

    Returns the (N, k) compositions and the k archetypes (k, D) in the units of ``x``.
    """
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
        a = _simplex_weights(zs, xs)
        target = np.linalg.lstsq(a, xs, rcond=None)[0]
        b = _simplex_weights(xs, target)
        zs = b @ xs
    a = _simplex_weights(zs, xs)
    return a / a.sum(axis=1, keepdims=True), zs * scale


def match_programs(fitted: np.ndarray, reference: np.ndarray) -> list[tuple[int, int, float]]:
    """Pair fitted program columns with reference columns (Hungarian matching maximising the
    summed Pearson r over the same spots, ``scipy.optimize.linear_sum_assignment``).

    fitted: (N, k_fit); reference: (N, k_ref), rows the same spots. Returns
    ``min(k_fit, k_ref)`` triples ``(fitted column, reference column, r)`` sorted by fitted
    column; a constant column correlates as 0.
    """
    from scipy.optimize import linear_sum_assignment

    f = np.asarray(fitted, np.float64)
    g = np.asarray(reference, np.float64)
    if f.ndim != 2 or g.ndim != 2 or len(f) != len(g):
        raise ValueError(f"match_programs: need (N, k) arrays over the same spots, got {f.shape} and {g.shape}")
    fc, gc = f - f.mean(axis=0), g - g.mean(axis=0)
    norm = np.outer(np.linalg.norm(fc, axis=0), np.linalg.norm(gc, axis=0))
    r = np.divide(fc.T @ gc, norm, out=np.zeros((f.shape[1], g.shape[1])), where=norm > 1e-12)
    rows, cols = linear_sum_assignment(-r)
    return sorted((int(i), int(j), float(r[i, j])) for i, j in zip(rows, cols))


@dataclass
class FittedPrograms:
    """Programs fitted on some sections, applicable to any section with the same genes.

    Counts are library-size normalised to ``target_sum`` and log1p-transformed per spot, then
    restricted to ``genes``. ``nmf``: ``components`` (k, genes) are NMF's H and a spot's
    programs are its non-negative least-squares weights on them. ``archetypes``: spots are
    projected on the PCA (``pca_mean``, ``pca_components``) and weighted on the archetypes
    ``components`` (k, PCs) with weights >= 0 summing to 1, in units of ``scale`` (the fit's
    largest PC score). Either way rows are scaled to 1.
    """

    method: str
    genes: list[str]
    components: np.ndarray
    fit_sections: list[str]
    target_sum: float = 1e4
    pca_mean: np.ndarray | None = None
    pca_components: np.ndarray | None = None
    scale: float = 1.0

    @property
    def names(self) -> list[str]:
        return [f"program_{i}" for i in range(len(self.components))]

    def features(self, adata: Any, sid: str = "") -> np.ndarray:
        """Normalised log expression of ``genes`` (N, G) float64."""
        missing = [g for g in self.genes if g not in adata.var_names]
        if missing:
            raise DataError(_where(adata, sid), f"{len(missing)} genes used by the fitted programs are missing, "
                                                f"e.g. {missing[:5]}")
        x = _normalised(adata, self.target_sum)[:, self.genes].X
        return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)

    def weights(self, x: np.ndarray) -> np.ndarray:
        """Program compositions (N, k) of feature rows ``x`` (from :meth:`features`)."""
        from scipy.optimize import nnls

        if self.method == "nmf":
            w = np.array([nnls(self.components.T, row)[0] for row in x]) + 1e-9
        else:
            pcs = (x - self.pca_mean) @ self.pca_components.T
            w = np.clip(_simplex_weights(self.components / self.scale, pcs / self.scale), 1e-9, None)
        return w / w.sum(axis=1, keepdims=True)

    def transform(self, adata: Any, sid: str = "") -> np.ndarray:
        """Program compositions (N, k) float32 of a section's spots."""
        return self.weights(self.features(adata, sid)).astype(np.float32)


@dataclass
class ProgramsTarget:
    """Expression programs fitted from counts, as per-spot compositions.

    Genes: the ``n_genes`` most highly variable (``gene_selection='hvg'``) or most spatially
    autocorrelated (``'moran'``, Moran's I on a 6-nearest-spot graph) after library-size
    normalisation and log1p. ``method='nmf'`` factorises those genes with NMF;
    ``'archetypes'`` runs archetypal analysis on ``n_pcs`` principal components (as Chrysalis).

    ``fit_sections``: the sections genes and programs are fitted on (default: every section
    given); every other section gets the fitted programs applied to its counts
    (:class:`FittedPrograms`), so held-out sections never shape the labels. ``reference``: an
    ``obsm`` key of known programs (the phantom's ``programs_true``): the fitted programs are
    matched to them on the fit sections' spots only (:func:`match_programs`) and the spec
    records the match (``TargetSpec.reference``), so predictions can be scored against them.
    """

    n_programs: int = 8
    method: Literal["nmf", "archetypes"] = "nmf"
    n_genes: int = 1000
    gene_selection: Literal["hvg", "moran"] = "hvg"
    n_pcs: int = 20
    seed: int = 0
    fit_sections: Sequence[str] | None = None
    reference: str | None = None

    def _fit_ids(self, adatas: Mapping[str, Any]) -> list[str]:
        if self.fit_sections is None:
            return list(adatas)
        ids = [str(s) for s in self.fit_sections]
        missing = [s for s in ids if s not in adatas]
        if missing or not ids:
            raise DataError(None, f"ProgramsTarget.fit_sections {ids}: {missing or 'none'} not among the sections "
                                  f"{list(adatas)}")
        return ids

    def fit(self, adatas: Mapping[str, Any]) -> tuple[FittedPrograms, dict[str, np.ndarray]]:
        """Fit genes and programs on every section of ``adatas``; returns the fitted programs
        and each section's compositions from the fit itself (float32)."""
        if self.method not in ("nmf", "archetypes"):
            raise ValueError(f"ProgramsTarget.method must be 'nmf' or 'archetypes', got {self.method!r}")
        joint = _normalised(_concat(adatas), 1e4)
        genes = _top_hvg(joint, self.n_genes) if self.gene_selection == "hvg" else _morans_top(joint, self.n_genes)
        x = joint[:, genes].X
        x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
        k = int(self.n_programs)
        if k < 2 or k > min(x.shape):
            raise ValueError(f"ProgramsTarget: n_programs={k} must be in [2, {min(x.shape)}]")
        if self.method == "nmf":
            from sklearn.decomposition import NMF

            nmf = NMF(n_components=k, init="nndsvda", random_state=self.seed, max_iter=500)
            w = nmf.fit_transform(x) + 1e-9
            comp = w / w.sum(axis=1, keepdims=True)
            fitted = FittedPrograms("nmf", list(genes), nmf.components_.copy(), list(adatas))
        else:
            from sklearn.decomposition import PCA

            n_pcs = max(k, min(int(self.n_pcs), min(x.shape) - 1))
            pca = PCA(n_components=n_pcs, random_state=self.seed).fit(x)
            pcs = pca.transform(x)
            comp, archetypes = _archetypes(pcs, k, np.random.default_rng(self.seed))
            fitted = FittedPrograms("archetypes", list(genes), archetypes, list(adatas), pca_mean=pca.mean_.copy(),
                                    pca_components=pca.components_.copy(), scale=float(np.abs(pcs).max() + 1e-12))
        log.info("programs: %s on %d genes x %d spots of %s -> %d programs", self.method, len(genes), x.shape[0],
                 ", ".join(adatas), k)
        return fitted, _split_rows(joint, comp.astype(np.float32), adatas)

    def compute(self, adatas: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], TargetSpec]:
        """Per-section (n_spots, n_programs) float32 compositions and a ``composition`` spec."""
        fit_ids = self._fit_ids(adatas)
        fitted, values = self.fit({sid: adatas[sid] for sid in fit_ids})
        for sid, adata in adatas.items():
            if sid not in values:
                values[sid] = fitted.transform(adata, sid)
        names = fitted.names
        if self.reference is None:
            return {sid: values[sid] for sid in adatas}, TargetSpec(names, "composition")
        ref_values, ref_spec = ObsmTarget(self.reference).compute({sid: adatas[sid] for sid in fit_ids})
        pairs = match_programs(np.concatenate([values[s] for s in fit_ids]),
                               np.concatenate([ref_values[s] for s in fit_ids]))
        reference = {names[i]: ref_spec.names[j] for i, j, _ in pairs}
        reference_r = {names[i]: round(r, 4) for i, _, r in pairs}
        log.info("programs matched to %r on %s: %s", self.reference, ", ".join(fit_ids),
                 ", ".join(f"{n} -> {reference[n]} (r {reference_r[n]:.2f})" for n in reference))
        return {sid: values[sid] for sid in adatas}, TargetSpec(names, "composition", reference=reference, reference_r=reference_r)

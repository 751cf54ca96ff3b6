"""Imputed 3D gene maps: predicted compartments (programs) times each compartment's gene profile.

When the target is a composition whose columns carry gene loadings, the expression of any gene
they cover at a map point is ``sum_k p_k * profile_k[gene]`` (``p``: the predicted composition,
summing to 1). :func:`gene_loadings` finds the profiles for a run:

- Chrysalis compartments (``target=obsm target.key=chr_aa``): ``uns['chr_aa']['loadings']``
  ``(K, F)`` over the genes ``uns['chr_pca']['features']`` are the archetypes in PCA space
  multiplied by the PCA loadings, i.e. each compartment's deviation from the mean expression;
  profiles add the mean of ``adata.X`` over the section's spots for those genes, as Chrysalis's
  ``get_compartment_df(adata, weights=False)`` does. Units: those of ``adata.X`` when Chrysalis
  ran its PCA (normalised log1p expression in Chrysalis's workflow). With several trained
  sections the loadings must agree (one Chrysalis fit on the integrated sections).
- Programs fitted here (``target=programs`` / ``programs_fitted``, ``ProgramsTarget``): refitted
  on the run's own sections with its recorded config (deterministic), and checked against the
  run's training labels (``predictions.csv``). Archetypes: ``pca_mean + archetype @ pca_components``
  (exact: a composition of archetypes rebuilds a spot's PCA projection). NMF: ``s * H_k`` with ``s``
  the mean NMF weight sum over the fitted spots (the compositions drop each spot's own scale).
  Units: log1p of counts per ``target_sum`` (1e4) per spot, natural log.

:func:`write_gene_maps` writes ``genes.ome.zarr`` beside ``maps.ome.zarr``: the same grid,
pyramid and tiles, one float16 channel per gene, NaN outside the tissue mask.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xpression.inference.predictor import InferenceError

__all__ = ["GeneLoadings", "chrysalis_loadings", "fitted_program_loadings", "gene_loadings", "check_gene_store",
           "write_gene_maps"]

log = logging.getLogger(__name__)

LOG_CP10K = "log1p(counts per 10,000 per spot), natural log"


@dataclass
class GeneLoadings:
    """``profiles`` ``(K, G)``: the expression of ``genes`` in each of the ``targets`` (the map
    channels, in order), in ``units``; ``source`` says where they came from."""

    targets: list[str]
    genes: list[str]
    profiles: np.ndarray
    units: str
    source: str

    def select(self, genes: Sequence[str]) -> "GeneLoadings":
        """The same loadings restricted to ``genes`` (in that order); unknown genes are an error."""
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in self.genes]
        if missing:
            raise InferenceError(f"genes {missing} have no loadings in {self.source} ({len(self.genes)} genes there, "
                                 f"e.g. {self.genes[:5]})")
        idx = [self.genes.index(g) for g in genes]
        return GeneLoadings(list(self.targets), genes, self.profiles[:, idx], self.units, self.source)

    def impute(self, compositions: np.ndarray) -> np.ndarray:
        """``(K, ...)`` compositions (the map channels) -> ``(G, ...)`` imputed expression."""
        comp = np.asarray(compositions, np.float32)
        flat = comp.reshape(comp.shape[0], -1)
        return (self.profiles.T.astype(np.float32) @ flat).reshape((len(self.genes),) + comp.shape[1:])

    def digest(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.profiles, np.float64).tobytes())
        h.update("\0".join(self.targets + self.genes).encode())
        return h.hexdigest()


def _dense(x: Any) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def chrysalis_loadings(adata: Any, targets: Sequence[str], where: str = "section") -> GeneLoadings:
    """Compartment profiles from a Chrysalis-processed AnnData (see the module doc)."""
    aa, pca = adata.uns.get("chr_aa"), adata.uns.get("chr_pca")
    if not isinstance(aa, dict) or "loadings" not in aa:
        raise InferenceError(f"{where}: uns['chr_aa'] has no 'loadings' (run chrysalis.aa on the section)")
    if not isinstance(pca, dict) or "features" not in pca:
        raise InferenceError(f"{where}: uns['chr_pca'] has no 'features' (the genes of Chrysalis's loadings)")
    loadings = np.asarray(aa["loadings"], np.float64)
    features = [str(g) for g in pca["features"]]
    if loadings.ndim != 2 or loadings.shape != (len(targets), len(features)):
        raise InferenceError(f"{where}: uns['chr_aa']['loadings'] has shape {loadings.shape}, expected "
                             f"({len(targets)} compartments, {len(features)} features of uns['chr_pca']['features'])")
    missing = [g for g in features if g not in adata.var_names]
    if missing:
        raise InferenceError(f"{where}: Chrysalis features {missing[:5]} are not among the section's genes")
    mean = _dense(adata[:, features].X).mean(axis=0)
    return GeneLoadings(list(targets), features, loadings + mean[None], "adata.X of the section, as Chrysalis's PCA "
                        "read it (normalised log1p expression in Chrysalis's workflow)", f"Chrysalis uns['chr_aa'] of {where}")


def fitted_program_loadings(target: Any, adatas: dict[str, Any], targets: Sequence[str],
                            labels: dict[str, Any] | None = None) -> GeneLoadings:
    """Profiles of programs fitted by ``target`` (a ``ProgramsTarget``) on ``adatas`` (its fit
    sections), refitted now; ``labels`` (``{section: table with section_id, barcode and
    true/<target>}``), the run's training labels, must match the refit (else the run was
    fitted on other data)."""
    fitted, values = target.fit(adatas)
    if list(fitted.names) != list(targets):
        raise InferenceError(f"the refitted programs {fitted.names} are not the maps' channels {list(targets)}")
    for sid, table in (labels or {}).items():
        rows = table[table["section_id"] == sid]
        spots = {str(b): i for i, b in enumerate(adatas[sid].obs_names)}
        index = [spots.get(str(b), -1) for b in rows["barcode"]]
        want = rows[[f"true/{t}" for t in targets]].to_numpy(np.float64)
        if min(index, default=0) < 0 or (len(index) and float(np.abs(values[sid][index] - want).max()) > 1e-3):
            raise InferenceError(f"refitting the run's programs on section {sid} does not reproduce its training labels "
                                 "(predictions.csv; another cohort or config?): gene loadings cannot be rebuilt")
    if fitted.method == "archetypes":
        profiles = fitted.pca_mean[None] + fitted.components @ fitted.pca_components
    else:
        from scipy.optimize import nnls

        x = np.concatenate([fitted.features(a, sid) for sid, a in adatas.items()])
        scale = float(np.mean([nnls(fitted.components.T, row)[0].sum() for row in x]))
        profiles = scale * fitted.components
    units = LOG_CP10K if float(fitted.target_sum) == 1e4 else f"log1p(counts per {fitted.target_sum:g} per spot)"
    return GeneLoadings(list(targets), list(fitted.genes), np.asarray(profiles, np.float64), units,
                        f"{fitted.method} programs refitted on {', '.join(adatas)}")


def gene_loadings(info: Any, targets: Sequence[str]) -> GeneLoadings:
    """The gene profiles of a run's targets (see the module doc); :class:`InferenceError` when
    its target carries none."""
    from xpression.data.manifest import load_manifest
    from xpression.data.sections import load_section

    target_cfg = dict(info.config.get("target") or {})
    kind = str(target_cfg.get("_target_", ""))
    manifest = (info.config.get("data") or {}).get("manifest")
    if not manifest:
        raise InferenceError(f"run {info.run_dir} records no cohort manifest; gene loadings come from its sections")
    cohort = load_manifest(manifest)
    trained = info.trained_sections or [s.id for s in cohort.sections]
    entries = {s.id: s for s in cohort.sections if s.id in set(trained)}
    max_residual_um = (info.config.get("data") or {}).get("max_residual_um")

    def section_adata(entry: Any) -> Any:
        """The section's AnnData as training read it (registered, spots in tissue)."""
        from xpression.data.volume import open_volume

        volume = cohort.volume(entry.volume_id)
        voxel = open_volume(volume.image, volume.voxel_size_um).voxel_size_um  # landmarks in px need it
        extra = {} if max_residual_um is None else {"max_residual_um": float(max_residual_um)}
        return load_section(entry, voxel_size_um=voxel, **extra).adata

    if kind.endswith("ObsmTarget") and target_cfg.get("key") == "chr_aa":
        found = [chrysalis_loadings(section_adata(e), targets, f"section {sid} ({e.adata})") for sid, e in entries.items()]
        for other in found[1:]:
            if other.genes != found[0].genes or not np.allclose(other.profiles - other.profiles.mean(0),
                                                                found[0].profiles - found[0].profiles.mean(0), atol=1e-6):
                raise InferenceError(f"the trained sections carry different Chrysalis loadings ({found[0].source}, "
                                     f"{other.source}); gene maps need one Chrysalis fit")
        return found[0]
    if kind.endswith("ProgramsTarget"):
        from xpression.data.targets import ProgramsTarget

        fields = {k: v for k, v in target_cfg.items() if k in ProgramsTarget.__dataclass_fields__}
        fit_ids = list(fields.get("fit_sections") or entries)
        if any(s not in entries for s in fit_ids):
            entries.update({s.id: s for s in cohort.sections if s.id in fit_ids})
        adatas = {sid: section_adata(entries[sid]) for sid in fit_ids}
        return fitted_program_loadings(ProgramsTarget(**fields), adatas, targets, _training_labels(info, targets, fit_ids))
    raise InferenceError(f"the run's target ({kind.rsplit('.', 1)[-1] or '?'}"
                         f"{', key ' + str(target_cfg.get('key')) if target_cfg.get('key') else ''}) carries no gene "
                         "loadings: genes=[...] needs Chrysalis compartments (target=obsm target.key=chr_aa) or programs "
                         "fitted from counts (target=programs or programs_fitted)")


def _training_labels(info: Any, targets: Sequence[str], sections: Sequence[str]) -> dict[str, Any] | None:
    """The run's labels of the fit sections' spots (``predictions.csv``: barcode, section and
    ``true/<target>`` of the spots inside the volume), ``{section: rows}``, when it has them."""
    import pandas as pd

    path = Path(info.run_dir) / "predictions.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    if not {"section_id", "barcode", *(f"true/{t}" for t in targets)} <= set(table.columns):
        return None
    return {sid: table for sid in sections if (table["section_id"] == sid).any()}


def check_gene_store(path: Path, identity: dict, loadings: GeneLoadings, overwrite: bool) -> None:
    """An existing gene store at ``path`` must hold this run's maps and these loadings (or ``overwrite``)."""
    from xpression.inference.writers import _read_meta

    meta = _read_meta(Path(path))
    if meta is None or overwrite:
        if meta is None and Path(path).exists() and not overwrite:
            raise InferenceError(f"{path} exists and is not an X-Pression map store; choose another output or pass overwrite=true")
        return
    want = {**identity, "gene_loadings_sha256": loadings.digest()}
    have = meta.get("identity", {})
    if any(have.get(k) != v for k, v in want.items()) or list(meta.get("targets", [])) != loadings.genes:
        raise InferenceError(f"{path} holds gene maps of another run, loadings or gene list ({meta.get('targets')}); "
                             "choose another output or pass overwrite=true")


def write_gene_maps(maps_path: str | Path, loadings: GeneLoadings, out: str | Path | None = None,
                    overwrite: bool = False) -> Path:
    """``genes.ome.zarr`` (default: beside ``maps_path``) from a finished map store, tile by tile."""
    from xpression.inference.grid import OutputGrid
    from xpression.inference.writers import MapStore, read_maps

    maps, meta = read_maps(maps_path)
    if list(meta["targets"]) != list(loadings.targets):
        raise InferenceError(f"{maps_path} holds {meta['targets']}, the loadings are for {loadings.targets}")
    out = Path(out) if out is not None else Path(maps_path).parent / "genes.ome.zarr"
    grid = OutputGrid.from_dict(meta["grid"])
    identity = {**meta["identity"], "gene_loadings_sha256": loadings.digest()}
    store = MapStore.open(out, grid, meta["tile_shape"], loadings.genes, identity,
                          settings={"from": str(Path(maps_path).name)}, overwrite=overwrite, levels=int(meta["levels"]),
                          metadata={"units": loadings.units, "loadings_source": loadings.source,
                                    "compartments": list(loadings.targets), "volume_id": meta.get("volume_id"),
                                    "kind": "imputed gene expression"})
    if store.complete:
        return out
    done = store.done()
    for tile in store.tiling:
        if tile.index in done:
            continue
        block = np.asarray(maps[(slice(None),) + tile.slices], np.float32)
        store.write_tile(tile, loadings.impute(block))
    store.finalize([t.index for t in store.tiling])
    _set_windows(out, loadings.genes)
    return out


def _set_windows(path: Path, genes: Sequence[str]) -> None:
    """The viewer's display range of each gene channel: its 1st-99th percentile (coarsest level)."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    data = np.asarray(group[str(len(group.attrs["ome"]["multiscales"][0]["datasets"]) - 1)][:], np.float32)  # coarsest level
    attrs = dict(group.attrs["ome"])
    for c, channel in enumerate(attrs["omero"]["channels"]):
        finite = data[c][np.isfinite(data[c])]
        lo, hi = (np.percentile(finite, [1, 99]).tolist() if finite.size else (0.0, 1.0))
        channel["window"] = {"start": lo, "end": hi, "min": float(finite.min()) if finite.size else 0.0,
                             "max": float(finite.max()) if finite.size else 1.0}
    group.attrs["ome"] = attrs

"""Imputed gene maps (``genes.ome.zarr``) scored against a synthetic cohort's true expression.

The phantom's expected expression of gene ``g`` at a 3D point is its share of a spot's counts,
``e_g = sum_p programs_p(point) * signature_p[g]`` (the same signatures its Visium counts are
drawn from), reported as ``log1p(target_sum * e_g)``: the units of fitted-program loadings
(log1p counts per 10,000). Per volume and gene: Pearson and Spearman r over the tissue points
of the whole volume (at most ``max_points``, a seeded subsample), and the RMSE when the maps'
units are those log units (Chrysalis loadings keep the units of the section's ``adata.X``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["true_expression", "score_gene_volume", "evaluate_gene_maps", "gene_scores_table"]

log = logging.getLogger(__name__)

MAX_POINTS = 50_000


def true_expression(phantom: Any, volume_id: str, points_um: np.ndarray, genes: Sequence[str],
                    target_sum: float = 1e4) -> np.ndarray:
    """``(N, G)`` expected ``log1p(target_sum * share)`` of ``genes`` at ``points_um`` (z, y, x)."""
    expr = phantom.spec["expression"]
    names = list(expr["genes"])
    missing = [g for g in genes if g not in names]
    if missing:
        raise KeyError(f"genes {missing} are not in the phantom's panel")
    sig = np.asarray(expr["signatures"], np.float64)[:, [names.index(g) for g in genes]]
    return np.log1p(target_sum * (np.asarray(phantom.programs_at(volume_id, points_um), np.float64) @ sig))


def _points(store: Any, grid: Any, max_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Finite imputed values ``(N, G)`` and their positions ``(N, 3)`` um over every grid plane."""
    rng = np.random.default_rng(seed)
    keep = min(1.0, max_points / max(grid.size, 1))
    values, points = [], []
    for iz in range(grid.shape[0]):
        plane = np.asarray(store[:, iz], np.float32)
        valid = np.all(np.isfinite(plane), axis=0)
        if keep < 1.0:
            valid &= rng.random(valid.shape) < keep
        yy, xx = np.nonzero(valid)
        values.append(plane[:, yy, xx].T)
        points.append(np.stack([np.full(len(yy), grid.axis_um(0)[iz]), grid.axis_um(1)[yy], grid.axis_um(2)[xx]], axis=1))
    return np.concatenate(values), np.concatenate(points)


def score_gene_volume(store: Any, grid: Any, genes: Sequence[str], truth: np.ndarray | Any, volume_id: str,
                      condition: str | None = None, log_units: bool = True, max_points: int = MAX_POINTS,
                      seed: int = 0) -> list[dict]:
    """One row per gene: ``{volume_id, condition, gene, n, pearson, spearman, rmse, mean_pred,
    mean_true, sd_true}`` (``sd_true``: how much the truth varies in the volume). ``truth``: ``points (N, 3) -> (N, G)`` true expression of ``genes``."""
    from scipy.stats import pearsonr, spearmanr

    pred, pts = _points(store, grid, max_points, seed)
    true = np.asarray(truth(pts), np.float64) if len(pts) else np.zeros((0, len(genes)))
    rows = []
    for g, gene in enumerate(genes):
        p, t = pred[:, g].astype(np.float64), true[:, g]
        ok = len(p) > 2 and p.std() > 0 and t.std() > 0
        rows.append({"volume_id": volume_id, "condition": condition, "gene": gene, "n": int(len(p)),
                     "pearson": float(pearsonr(p, t)[0]) if ok else float("nan"),
                     "spearman": float(spearmanr(p, t)[0]) if ok else float("nan"),
                     "rmse": float(np.sqrt(np.mean((p - t) ** 2))) if log_units and len(p) else float("nan"),
                     "mean_pred": float(p.mean()) if len(p) else float("nan"),
                     "mean_true": float(t.mean()) if len(p) else float("nan"),
                     "sd_true": float(t.std()) if len(p) else float("nan")})
    return rows


def evaluate_gene_maps(output: str | Path, volumes: Mapping[str, Mapping[str, Any]], cohort: Any,
                       max_points: int = MAX_POINTS, figures: bool = True) -> pd.DataFrame:
    """Score every volume's ``genes`` store of ``volumes`` (``{volume_id: {"genes": {"path"},
    "section_z_um"}}``) against ``cohort``'s truth; writes ``<output>/gene_evaluation.csv`` and,
    with ``figures``, ``<volume>/figures/genes_vs_truth.png``."""
    from xpression.evaluation.maps import _GridTruth
    from xpression.inference.figures import plot_orthoviews
    from xpression.inference.genes import LOG_CP10K
    from xpression.inference.grid import OutputGrid
    from xpression.inference.writers import read_maps
    from xpression.phantom import Phantom

    phantom = Phantom.from_spec(cohort.truth.spec)
    conditions = {v.id: v.condition for v in cohort.volumes}
    rows: list[dict] = []
    output = Path(output)
    for vid, job in volumes.items():
        if not job.get("genes"):
            continue
        store, meta = read_maps(Path(job["genes"]["path"]))
        grid = OutputGrid.from_dict(meta["grid"])
        genes = list(meta["targets"])
        known = [g for g in genes if g in phantom.spec["expression"]["genes"]]
        if len(known) < len(genes):
            log.info("%s: genes %s are not in the phantom's panel; not scored", vid, sorted(set(genes) - set(known)))
        idx = [genes.index(g) for g in known]

        def truth(p: np.ndarray, v: str = vid) -> np.ndarray:
            return true_expression(phantom, v, p, known)

        rows += score_gene_volume(_Columns(store, idx), grid, known, truth, vid, conditions.get(vid),
                                  meta.get("units") == LOG_CP10K, max_points)
        if figures and known:
            plot_orthoviews(store, grid, genes, output / vid / "figures" / "genes_vs_truth.png",
                            title=f"{vid}: imputed gene maps beside the truth ({meta.get('units')})",
                            section_z_um=job.get("section_z_um"), channels=idx, truth=_GridTruth(truth, grid, list(range(len(known)))),
                            value_label="expression", views=(0, 1))
    df = pd.DataFrame(rows)
    if len(df):
        output.mkdir(parents=True, exist_ok=True)
        df.to_csv(output / "gene_evaluation.csv", index=False)
    return df


class _Columns:
    """The channels ``idx`` of a ``(C, z, y, x)`` store, read plane by plane."""

    def __init__(self, store: Any, idx: Sequence[int]):
        self.store, self.idx = store, list(idx)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.store[key])[self.idx]


def gene_scores_table(df: pd.DataFrame) -> Any:
    """A rich table: one line per volume, Pearson r of each gene's imputed map against the truth."""
    from rich.table import Table

    table = Table(title="Imputed gene maps against the phantom's true expression: Pearson r per volume (whole volume)",
                  title_justify="left")
    if df.empty:
        return table
    genes = list(dict.fromkeys(df["gene"]))
    table.add_column("volume")
    table.add_column("points", justify="right")
    for g in genes:
        table.add_column(g, justify="right")
    for vid, part in df.groupby("volume_id", sort=False):
        r = dict(zip(part["gene"], part["pearson"]))
        table.add_row(str(vid), str(int(part["n"].iloc[0])), *("n/a" if not np.isfinite(r.get(g, np.nan)) else f"{r[g]:.3f}" for g in genes))
    return table

"""Swept maps scored against a synthetic cohort's 3D truth, with the baselines without CT beside
the model (what ``infer.py`` prints and writes to ``evaluation.csv`` for cohorts with truth).

Score rows (``xpression.evaluation.scores``) per volume:

- a volume with a trained section: ``section plane`` (the grid plane nearest the section, where
  the model was trained: not a generalisation score) and ``plane`` rows at each distance
  (both sides pooled, where the volume reaches), plus the run's own ``val``/``test spots`` rows
  from its ``metrics.json`` (for an ensemble's maps: the members' mean on the spots every member
  held out, :mod:`xpression.evaluation.ensemble_spots`);
- a volume without one: a ``volume`` row over every grid plane.

Points are the grid points inside the tissue mask (finite predictions), about
``max_points`` (50 000) per row at most: beyond that a seeded uniform subsample, so memory and
time stay bounded on large volumes. Truth is the phantom's program composition at each point. The baselines are
built from the run's training spots and their labels (``predictions.csv``): 2D extrusion and kNN
in the trained volume, the per-animal mean everywhere (the training mean in other volumes), and
extrusion from every spot of the section (held-out ones included) as a reference.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from xpression.evaluation.baselines import KNN_K, TrainingSpots, baseline_predictions
from xpression.evaluation.ensemble_spots import ensemble_spot_table
from xpression.evaluation.figures import plot_run_scores
from xpression.evaluation.scores import evaluate_spots, score_rows
from xpression.inference.figures import plot_orthoviews
from xpression.inference.grid import OutputGrid
from xpression.inference.writers import read_maps
from xpression.phantom import Phantom

__all__ = ["DEFAULT_DISTANCES_UM", "score_volume", "score_uncertainty", "evaluate_maps", "report_map_scores"]

log = logging.getLogger(__name__)

DEFAULT_DISTANCES_UM = (100.0, 200.0, 400.0, 600.0)
MAX_POINTS = 50_000


def _plane_points(maps: Any, grid: OutputGrid, iz: int, cols: list[int], keep: float,
                  rng: np.random.Generator, decide: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Predictions ``(N, T')`` of grid plane ``iz`` where the first ``decide`` of ``cols`` (all by
    default) are finite, i.e. the swept tissue, and their positions ``(N, 3)`` um, each kept with
    probability ``keep``."""
    plane = np.asarray(maps[:, iz], dtype=np.float32)[cols]  # (T', ny, nx)
    valid = np.all(np.isfinite(plane[:decide]), axis=0)
    if keep < 1.0:
        valid &= rng.random(valid.shape) < keep
    yy, xx = np.nonzero(valid)
    pts = np.stack([np.full(len(yy), grid.axis_um(0)[iz]), grid.axis_um(1)[yy], grid.axis_um(2)[xx]], axis=1)
    return plane[:, yy, xx].T, pts


def score_volume(
    maps: Any,
    grid: OutputGrid,
    targets: Sequence[str],
    truth_fn: Callable[[np.ndarray], np.ndarray],
    program_names: Sequence[str],
    volume_id: str,
    kind: str = "composition",
    section_z_um: float | None = None,
    distances_um: Sequence[float] = DEFAULT_DISTANCES_UM,
    baselines_fn: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None = None,
    condition: str | None = None,
    max_points: int = MAX_POINTS,
    seed: int = 0,
) -> list[dict]:
    """Score rows for one volume's maps ``(T, nz, ny, nx)`` (a zarr level).

    ``truth_fn(points_um (N, 3)) -> (N, P)`` true programs named ``program_names``;
    ``baselines_fn(points_um) -> {baseline: (N, T)}`` in the order of ``targets``. With
    ``section_z_um`` (this volume's trained section) rows ``section plane`` and ``plane``,
    without it one ``volume`` row. Targets that are not truth programs are left out.
    """
    cols = [i for i, t in enumerate(targets) if t in program_names]
    if not cols:
        return []
    names = [targets[i] for i in cols]
    prog = [list(program_names).index(n) for n in names]
    rows: list[dict] = []
    rng = np.random.default_rng(seed)

    def row(where: str, dist: float, planes: list[int]) -> None:
        keep = min(1.0, max_points / max(len(planes) * grid.shape[1] * grid.shape[2], 1))
        parts = [_plane_points(maps, grid, iz, cols, keep, rng) for iz in planes]
        pred = np.concatenate([p for p, _ in parts])
        pts = np.concatenate([q for _, q in parts])
        if len(pts) < 2:
            return
        preds = {"model": pred}
        if baselines_fn is not None:
            preds.update({k: np.asarray(v)[:, cols] for k, v in baselines_fn(pts).items()})
        truth = np.asarray(truth_fn(pts))[:, prog]
        rows.extend(score_rows(preds, truth, names, kind, volume_id=volume_id, condition=condition, where=where, distance_um=dist))

    if section_z_um is None:
        row("volume", float("nan"), list(range(grid.shape[0])))
        return rows
    z = grid.axis_um(0)
    dz = grid.spacing_um[0]
    row("section plane", 0.0, [int(np.argmin(np.abs(z - section_z_um)))])
    for d in distances_um:
        planes = [int(np.argmin(np.abs(z - t))) for t in (section_z_um - d, section_z_um + d)
                  if z[0] - dz / 2 <= t <= z[-1] + dz / 2]
        if planes:
            row("plane", float(d), sorted(set(planes)))
    return rows


def score_uncertainty(maps: Any, grid: OutputGrid, trust: Mapping[str, Any], channels: Sequence[str],
                      truth_fn: Callable[[np.ndarray], np.ndarray], program_names: Sequence[str], volume_id: str,
                      condition: str | None = None, trained: bool = False, max_points: int = MAX_POINTS,
                      seed: int = 0) -> dict | None:
    """One :func:`~xpression.evaluation.uncertainty.uncertainty_scores` row for a trust map
    (``trust``: the maps' ``uncertainty`` metadata; ``channels``: the store's channel names) over
    every grid plane of the volume, on at most about ``max_points`` tissue points."""
    from xpression.evaluation.uncertainty import uncertainty_scores

    targets = list(trust["targets"])
    names = [t for t in targets if t in program_names]
    if not names:
        return None
    mean_cols = [channels.index(t) for t in names]
    sd_cols = [channels.index(f"{t}_sd") for t in names] if trust.get("sd_channels") else []
    ood_cols = [channels.index(trust["ood_channel"])] if trust.get("ood_channel") else []
    cols = mean_cols + sd_cols + ood_cols
    rng = np.random.default_rng(seed)
    keep = min(1.0, max_points / max(grid.shape[0] * grid.shape[1] * grid.shape[2], 1))
    # the tissue points are those of the mean channels (as the accuracy scores'): an SD or ood
    # value that is not finite there is counted by uncertainty_scores, not a reason to drop the point
    parts = [_plane_points(maps, grid, iz, cols, keep, rng, decide=len(mean_cols)) for iz in range(grid.shape[0])]
    values = np.concatenate([p for p, _ in parts])
    pts = np.concatenate([q for _, q in parts])
    if len(pts) < 3:
        return None
    T = len(names)
    truth = np.asarray(truth_fn(pts))[:, [list(program_names).index(n) for n in names]]
    ood_meta = trust.get("ood") or {}
    scale = (trust.get("calibration") or {}).get("scale")
    if scale is not None:  # the scale of each kept target, in the order of names
        scale = [scale[targets.index(n)] for n in names]
    row = uncertainty_scores(values[:, :T], truth, names, values[:, T : 2 * T] if sd_cols else None,
                             values[:, -1] if ood_cols else None, ood_meta.get("train_p99"), scale, where=volume_id)
    return {"volume_id": volume_id, "condition": condition, "trained": trained, "method": trust.get("method"), **row}


def _training_spots(run_dir: Path, targets: Sequence[str], table: pd.DataFrame | None = None
                    ) -> tuple[TrainingSpots, TrainingSpots] | None:
    """The run's training spots and every spot of its sections, with their labels (from
    ``table`` when given, e.g. an ensemble's, else the run's ``predictions.csv``)."""
    path = run_dir / "predictions.csv"
    if table is None:
        if not path.is_file():
            log.info("no %s: maps scored without the baselines", path)
            return None
        table = pd.read_csv(path)
    labels = [f"true/{t}" for t in targets]
    if not set(labels) <= set(table.columns):
        log.info("%s lacks the labels of %s: maps scored without the baselines", path, list(targets))
        return None
    return TrainingSpots.from_table(table, labels), TrainingSpots.from_table(table, labels, split=None)


def _ensemble_table(meta: Mapping[str, Any]) -> tuple[pd.DataFrame | None, list[str]]:
    """For an ensemble's maps (their metadata ``meta``), the members' joint spot table and the
    mean targets; else None."""
    trust = meta.get("uncertainty") or {}
    members = [Path(m["run_dir"]) for m in trust.get("members") or []]
    if trust.get("method") != "ensemble" or len(members) < 2:
        return None, []
    targets = list(trust.get("targets") or [])
    table = ensemble_spot_table(members, targets)
    if table is None:
        log.info("an ensemble member lacks predictions.csv: spot rows and baselines from %s", members[0])
    return table, targets


def _held_out_rows(run_dir: Path, ensemble: pd.DataFrame | None, targets: Sequence[str], kind: str, k: int,
                   conditions: Mapping[str, Any]) -> list[dict]:
    """The held-out spot rows: the run's own, or for an ensemble the members' mean on the spots
    every member held out (:mod:`xpression.evaluation.ensemble_spots`)."""
    if ensemble is None:
        return _spot_rows(run_dir)
    rows = [r for r in evaluate_spots(ensemble, targets, kind, k, conditions)["scores"] if r["where"] in ("val spots", "test spots")]
    if not rows:
        log.info("no spot is held out by every ensemble member: no held-out spot rows")
    return rows


def _target_reference(run_dir: Path) -> dict[str, str]:
    """``{target: truth program}`` for fitted programs matched to the truth (``metrics.json``)."""
    path = run_dir / "metrics.json"
    return dict(json.loads(path.read_text()).get("target_reference") or {}) if path.is_file() else {}


def _spot_rows(run_dir: Path) -> list[dict]:
    """The run's own held-out spot rows (val/test) from its metrics.json."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text()).get("scores") or []
    return [r for r in rows if r.get("where") in ("val spots", "test spots")]


def evaluate_maps(run_dir: str | Path, output: str | Path, volumes: Mapping[str, Mapping[str, Any]], cohort: Any,
                  distances_um: Sequence[float] = DEFAULT_DISTANCES_UM, kind: str = "composition",
                  k: int = KNN_K, max_points: int = MAX_POINTS, figures: bool = True,
                  spots_of: Mapping[str, Any] | None = None, held_out: bool = True) -> pd.DataFrame:
    """Score every swept volume of ``volumes`` (``{volume_id: {"path": maps store,
    "section_z_um": trained section z or None}}``) against ``cohort``'s truth; writes
    ``<output>/evaluation.csv`` (score rows, held-out spot rows of the run included), for maps
    with SD or ood channels ``<output>/uncertainty.csv`` (:func:`score_uncertainty`) and, with
    ``figures``, ``accuracy_vs_distance.png`` and ``<volume>/figures/truth_vs_prediction.png``.
    ``spots_of``: the metadata of the maps whose run (``run_dir``, or that ensemble's members)
    gives the training spots of the baselines and the held-out rows (default: the first volume's
    own); ``held_out=False`` leaves the held-out spot rows out. Returns the rows as a DataFrame."""
    run_dir, output = Path(run_dir), Path(output)
    phantom = Phantom.from_spec(cohort.truth.spec)
    conditions = {v.id: v.condition for v in cohort.volumes}
    rows: list[dict] = []
    trust_rows: list[dict] = []
    train = None
    reference = _target_reference(run_dir)
    for position, (vid, job) in enumerate(volumes.items()):
        maps, meta = read_maps(Path(job["path"]))
        grid = OutputGrid.from_dict(meta["grid"])
        targets = [reference.get(t, t) for t in meta["targets"]]  # fitted programs: the truth program each was matched to
        if position == 0:  # the spots once, from the first volume's metadata
            spots_meta = meta if spots_of is None else spots_of
            ensemble, ensemble_targets = _ensemble_table(spots_meta)
            if held_out:
                rows += _held_out_rows(run_dir, ensemble, ensemble_targets, kind, k, conditions)
            train = _training_spots(run_dir, (spots_meta.get("uncertainty") or {}).get("targets") or targets, ensemble)
        base = None if train is None else (lambda p, v=vid: baseline_predictions(train[0], v, p, k, train[1]))
        truth = lambda p, v=vid: phantom.programs_at(v, p)  # noqa: E731
        z = job.get("section_z_um")
        rows += score_volume(maps, grid, targets, truth, phantom.program_names, vid, kind, z, distances_um, base,
                             conditions.get(vid), max_points)
        cols = [i for i, t in enumerate(targets) if t in phantom.program_names]
        if figures and cols:
            plot_orthoviews(maps, grid, targets, output / vid / "figures" / "truth_vs_prediction.png",
                            title=f"{vid}: truth beside prediction", section_z_um=z, channels=cols,
                            truth=_GridTruth(truth, grid, [phantom.program_names.index(targets[i]) for i in cols]),
                            value_label="program proportion" if kind == "composition" else "value", views=(0, 1))
        if meta.get("uncertainty"):  # [uncertainty hook] the SD / ood channels against the truth
            urow = score_uncertainty(maps, grid, meta["uncertainty"], targets, truth, phantom.program_names, vid,
                                     conditions.get(vid), z is not None, max_points)
            if urow is not None:
                trust_rows.append(urow)
    df = pd.DataFrame(rows)
    output.mkdir(parents=True, exist_ok=True)
    df.to_csv(output / "evaluation.csv", index=False)
    if trust_rows:
        pd.DataFrame(trust_rows).to_csv(output / "uncertainty.csv", index=False)
    if figures and len(df):
        plot_run_scores(df, output / "accuracy_vs_distance.png")
    return df


class _GridTruth:
    """The truth on an output grid, channel-first like the maps (``[t, z, y, x]`` index with
    integers and full slices), computed once per requested plane for every program."""

    def __init__(self, truth_fn: Callable[[np.ndarray], np.ndarray], grid: OutputGrid, programs: list[int]):
        self.truth_fn, self.grid, self.programs = truth_fn, grid, programs
        self.shape = (len(programs), *grid.shape)
        self._planes: dict[str, np.ndarray] = {}

    def __getitem__(self, key: Any) -> np.ndarray:
        t, *rest = key if isinstance(key, tuple) else (key,)
        rest = rest + [slice(None)] * (3 - len(rest))
        tag = repr(rest)
        if tag not in self._planes:
            sel = [np.atleast_1d(self.grid.axis_um(a)[r]) for a, r in enumerate(rest)]
            zz, yy, xx = np.meshgrid(*sel, indexing="ij")
            pts = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)
            vals = np.asarray(self.truth_fn(pts))[:, self.programs].T.reshape(len(self.programs), *zz.shape)
            squeeze = tuple(1 + a for a, r in enumerate(rest) if isinstance(r, (int, np.integer)))
            self._planes[tag] = vals.squeeze(axis=squeeze) if squeeze else vals
        return self._planes[tag][t]


def evaluate_inference(cfg: Any, summary: Mapping[str, Any]) -> dict | None:
    """``infer.py``'s scoring step: when ``cfg.evaluate`` and the swept cohort has a truth spec,
    score every swept volume (:func:`report_map_scores`), print the per-volume table with the
    baselines beside the model and add ``evaluation`` to ``<output>/summary.json``."""
    import sys

    from rich.console import Console

    from xpression.data.manifest import load_manifest

    if not cfg.get("evaluate", True) or not summary.get("cohort") or not summary.get("volumes"):
        return None
    cohort = load_manifest(summary["cohort"])
    if cohort.truth is None or not cohort.truth.spec:
        return None
    volumes = dict(summary["volumes"])
    evaluation = report_map_scores(
        summary["run_dir"], cfg.output, volumes, cohort, list(cfg.get("eval_distances_um") or DEFAULT_DISTANCES_UM),
        "Accuracy per volume against the phantom truth: model and baselines without CT (held-out spots from "
        "training; planes and other volumes from the swept maps)", figures=bool(cfg.get("figures", True)))
    out = Path(cfg.output)
    if any(v.get("genes") for v in volumes.values()):  # hook: imputed gene maps (xpression.evaluation.gene_maps)
        from xpression.evaluation.gene_maps import evaluate_gene_maps, gene_scores_table

        genes = evaluate_gene_maps(cfg.output, volumes, cohort, figures=bool(cfg.get("figures", True)))
        Console(width=None if sys.stdout.isatty() else 200).print(gene_scores_table(genes))
        evaluation["genes"] = {"csv": str(out / "gene_evaluation.csv"), "rows": genes.to_dict(orient="records")}
    path = out / "summary.json"
    if path.is_file():
        full = json.loads(path.read_text())
        full["evaluation"] = evaluation
        path.write_text(json.dumps(full, indent=2, default=str))
    return evaluation


def report_map_scores(run_dir: str | Path, output: str | Path, volumes: Mapping[str, Mapping[str, Any]], cohort: Any,
                      distances_um: Sequence[float], title: str, figures: bool = True, **options: Any) -> dict:
    """:func:`evaluate_maps` (``options``: its ``spots_of``, ``held_out``, ...) with the kind of
    target the first map records, then the score table (titled ``title``) and, for maps with SD
    or ood channels, the uncertainty table printed as ``infer.py`` prints them; returns
    ``{"csv", "rows"[, "uncertainty"]}``."""
    import sys

    from rich.console import Console

    from xpression.evaluation.scores import scores_table

    _, meta = read_maps(Path(next(iter(volumes.values()))["path"]))
    kind = meta.get("target_kind") or "composition"
    df = evaluate_maps(run_dir, output, volumes, cohort, distances_um, kind=kind, figures=figures, **options)
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(scores_table(df.to_dict(orient="records"), title))
    out = Path(output)
    evaluation = {"csv": str(out / "evaluation.csv"), "rows": df.to_dict(orient="records")}
    if (out / "uncertainty.csv").is_file() and meta.get("uncertainty"):  # [uncertainty hook]
        trust = pd.read_csv(out / "uncertainty.csv")
        console.print(uncertainty_table(trust))
        evaluation["uncertainty"] = {"csv": str(out / "uncertainty.csv"), "rows": trust.to_dict(orient="records")}
    return evaluation


def uncertainty_table(df: pd.DataFrame) -> Any:
    """The per-volume uncertainty rows as a rich table (what ``infer.py`` prints)."""
    from rich.table import Table

    table = Table(title="Uncertainty per volume against the phantom truth (SD: spread of the members or passes; "
                        "ood: distance from the training spots' features)")
    cols = [("volume", "volume_id"), ("trained", "trained"), ("points", "n"),
            ("non-finite SD", "n_nonfinite_sd"), ("non-finite ood", "n_nonfinite_ood"), ("|error|", "abs_error_mean"),
            ("mean SD", "sd_mean"), ("Spearman SD~|error|", "spearman_sd_error"),
            ("same, per target", "spearman_sd_error_targets"), ("+-2 SD coverage", "coverage_2sd"),
            ("uncalibrated", "coverage_2sd_uncalibrated"),
            ("ood mean", "ood_mean"), ("ood p95", "ood_p95"), ("> train p99", "ood_above_train_p99"),
            ("Spearman ood~|error|", "spearman_ood_error")]
    # the non-finite counts only where some volume has any (they are warned about as well)
    cols = [(h, c) for h, c in cols if c in df.columns and not (c.startswith("n_nonfinite") and not df[c].fillna(0).any())]
    for h, _ in cols:
        table.add_column(h, justify="left" if h == "volume" else "right")
    for rec in df.to_dict(orient="records"):
        cells = []
        for _, c in cols:
            v = rec.get(c)
            if isinstance(v, (str, bool, np.bool_)) or c == "n" or c.startswith("n_nonfinite"):
                cells.append(str(v if not isinstance(v, float) else int(v)))
            elif v is None or np.isnan(v):
                cells.append("n/a")
            else:  # an infinite ood mean is shown as such; large ones (a closed-form model's) in %g
                cells.append(f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}")
        table.add_row(*cells)
    return table

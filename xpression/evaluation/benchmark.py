"""Collect training runs into the benchmark report: ``python -m xpression.evaluation.benchmark DIR...``.

Every folder under the given multirun (or run) folders that holds a ``metrics.json`` with score
rows (``xpression.evaluation.scores``) is one run. Runs are grouped by experiment (the
``experiment=`` override, else the multirun folder's name) and, within an experiment, by
configuration: the overrides that differ between its runs, the seed left out.

All runs must have trained on one cohort (``data.manifest`` in their ``config.yaml``): runs of
several cohorts are refused in one line, as cohorts name different animals by the same volume ids.

Scores are per volume, never pooled across animals. ``benchmark.md`` holds one table per volume
and place: the held-out spots of a trained animal (its test split, else validation), probe
planes at each distance from its section, and every volume without a training section (an
unseen animal, of a trained condition or not). Every configuration's row carries its own
baselines beside it, from the same runs: 2D extrusion (Pearson r), the features + ridge
baseline on the same patch (r) and the per-animal mean (R^2, its r being n/a), each as the mean
paired difference over seeds with its 95 % t interval (``xpression.evaluation.stats``); a
difference whose interval contains 0 reads "level". Then the findings the benchmark asks for,
each with its interval, the cost of each configuration and the probe's exclusions.

Also written: ``benchmark.csv`` (mean and sd over seeds of every metric, per experiment,
configuration, volume, place and predictor), ``comparisons.csv`` (every paired difference in
the tables and findings) and ``accuracy_vs_distance.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import yaml

from xpression.evaluation.figures import PREDICTOR_STYLE
from xpression.evaluation.scores import PREDICTOR_LABELS
from xpression.evaluation.stats import PairedDifference, paired_difference
from xpression.metrics import MIN_TRUTH_SD, format_score
from xpression.plotting import file_in_the_way, new_figure, save_figure

__all__ = ["collect_runs", "runs_by_seed", "summarise_scores", "write_report", "findings", "check_one_cohort", "main"]

log = logging.getLogger(__name__)

_METRICS = ("pearson_mean", "spearman_mean", "r2_mean", "mse_mean", "jsd_mean", "dominant_acc", "macro_auc")
# (baseline, metric) beside every row: extrusion and ridge on r, the per-animal mean on R^2 (its r is n/a)
_BESIDE = (("extrusion", "pearson_mean", "2D extrusion r", "Δr vs extrusion"),
           ("section_extrusion", "pearson_mean", "all-spot extrusion r", "Δr vs all-spot extrusion"),
           ("ridge", "pearson_mean", "ridge r (same patch)", "Δr vs ridge"),
           ("animal_mean", "r2_mean", "animal mean R²", "ΔR² vs animal mean"))
_KEY = ["volume_id", "place", "distance_um"]
UNSEEN_SAME = "unseen animal, trained condition"
UNSEEN_OTHER = "unseen condition"


def _overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])] if path.is_file() else []


def _cohort(run: Path, config: dict) -> str | None:
    """The cohort manifest a run trained on (its ``config.yaml``'s ``data.manifest``), a relative
    path resolved against the folder ``train.py`` ran in (``.hydra/hydra.yaml``); None if unrecorded."""
    manifest = (config.get("data") or {}).get("manifest") if isinstance(config.get("data"), dict) else None
    if not isinstance(manifest, str) or not manifest:
        return None
    path = Path(manifest).expanduser()
    if not path.is_absolute():
        try:
            hydra = (yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text()) or {}).get("hydra") or {}
            cwd = (hydra.get("runtime") or {}).get("cwd")
        except (OSError, yaml.YAMLError, AttributeError):
            cwd = None
        path = Path(cwd) / path if cwd else path
    return str(path.resolve())


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _place(row: dict, held_out: str) -> str | None:
    where = row.get("where")
    if where == f"{held_out} spots":
        return "held-out spots"
    return where if where in ("plane", "volume") else None


def runs_by_seed(folder: str | Path, marker: str = "config.yaml", hint: str = "") -> dict[int, Path]:
    """``{seed: run folder}`` of the ``train.py`` runs under ``folder`` (a multirun) that hold
    ``marker``, each seed read from the run's ``config.yaml``. ``SystemExit`` with one line when
    two runs share a seed or none is found (``hint`` is added to that line)."""
    folder = Path(folder)
    out: dict[int, Path] = {}
    for found in sorted(folder.rglob(marker)):
        run = found.parent
        if ".hydra" in run.relative_to(folder).parts:
            continue  # Hydra's own record of a job (.hydra/config.yaml), not a run folder
        seed = int(yaml.safe_load((run / "config.yaml").read_text())["seed"])
        if seed in out:
            raise SystemExit(f"error: two runs with seed {seed} under {folder}: {out[seed]} and {run}")
        out[seed] = run
    if not out:
        raise SystemExit(f"error: {folder} holds no train.py runs with {marker}{hint}")
    return out


def collect_runs(dirs: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, scores)``: one row per run (experiment, configuration label, seed, model, split,
    patch, cost, probe notes) and one row per (run, volume, place, distance, predictor) with
    every metric. Runs without score rows (an older ``metrics.json``) are skipped with a note."""
    runs, scores = [], []
    for root in map(Path, dirs):
        # job folders in launch order (0, 1, 2, ..., 10), not string order
        found = sorted(root.rglob("metrics.json"), key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s)
                                                               for s in p.relative_to(root).parts])
        for metrics_path in found:
            run = metrics_path.parent
            metrics = json.loads(metrics_path.read_text())
            if not metrics.get("scores"):
                log.warning("%s has no per-volume score rows (written before they existed); skipped", metrics_path)
                continue
            over = dict(_split(o) for o in _overrides(run))
            config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
            shape = metrics.get("patch_shape_vox") or [math.nan] * 3
            voxel = metrics.get("voxel_size_um") or [math.nan] * 3
            run_id = len(runs)
            runs.append({
                "run_id": run_id,
                "experiment": over.get("experiment") or root.name,
                "run": str(run),
                "seed": int(over.get("seed", config.get("seed", 0))),
                "overrides": {k: v for k, v in over.items() if k != "seed"},
                "model": (config.get("model") or {}).get("backbone", {}).get("name")
                or str((config.get("model") or {}).get("_target_", "")).rsplit(".", 1)[-1],
                "train_seconds": metrics.get("train_seconds", math.nan),
                "epochs": metrics.get("epochs", math.nan),
                "parameters": metrics.get("parameters", math.nan),
                "depth_vox": shape[0], "width_vox": shape[-1],
                "depth_um": float(shape[0]) * float(voxel[0]), "width_um": float(shape[-1]) * float(voxel[-1]),
                "split": str((config.get("split") or {}).get("_target_", "")).rsplit(".", 1)[-1],
                "excluded": list((metrics.get("off_plane") or {}).get("excluded") or []),
                "max_patch_um": (metrics.get("off_plane") or {}).get("probe", {}).get("max_patch_um"),
                "probe_digest": (metrics.get("off_plane") or {}).get("digest"),
                "probed": bool(metrics.get("off_plane")),
                "cohort": _cohort(run, config),
                "root": str(root),
            })
            held_out = metrics.get("held_out_split", "test")
            for r in metrics["scores"]:
                place = _place(r, held_out)
                if place is None:
                    continue
                d = r.get("distance_um")
                scores.append({"run_id": run_id, "volume_id": str(r["volume_id"]), "condition": r.get("condition"),
                               "place": place, "distance_um": float(d) if d is not None else math.nan,
                               "predictor": r["predictor"], "n": r.get("n"),
                               **{m: (math.nan if r.get(m) is None else float(r[m])) for m in _METRICS}})
    runs_df = pd.DataFrame(runs)
    if len(runs_df):
        runs_df["config"] = _labels(runs_df)
    scores_df = pd.DataFrame(scores)
    if len(scores_df):
        scores_df["distance_um"] = scores_df["distance_um"].where(scores_df["place"] == "plane", math.nan)
        scores_df["group"] = _groups(scores_df)
    return runs_df, scores_df


def _groups(scores: pd.DataFrame) -> list[str]:
    """Per score row: its place, with unseen volumes split into animals of a condition the run
    trained on (animal shift alone) and animals of another condition (condition shift too)."""
    trained = {run: {c for c in g.loc[g["place"] != "volume", "condition"] if isinstance(c, str)}
               for run, g in scores.groupby("run_id")}
    return [(UNSEEN_SAME if isinstance(c, str) and c in trained.get(run, set()) else UNSEEN_OTHER) if p == "volume" else p
            for run, p, c in zip(scores["run_id"], scores["place"], scores["condition"])]


def _labels(runs: pd.DataFrame) -> list[str]:
    """Per run: the overrides that vary within its experiment (seed excluded), else the model."""
    labels = [""] * len(runs)
    for _, group in runs.groupby("experiment", sort=False):
        keys = sorted({k for o in group["overrides"] for k in o})
        varying = [k for k in keys if len({o.get(k) for o in group["overrides"]}) > 1]
        for i, o in zip(group.index, group["overrides"]):
            labels[runs.index.get_loc(i)] = " ".join(f"{k}={o.get(k)}" for k in varying) or str(runs.at[i, "model"])
    return labels


def _configs(runs: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(runs["experiment"], runs["config"])))


def _per_seed(runs: pd.DataFrame, scores: pd.DataFrame, exp: str, config: str, predictor: str, metric: str,
              where: dict[str, Any] | None = None, reduce: Callable[[pd.Series], float] | None = None) -> dict[int, float]:
    """``{seed: value}`` of one configuration's ``predictor`` ``metric``; ``where`` selects the
    score rows (column -> value); several rows per run are averaged (``reduce``, NaN-skipping)."""
    ids = runs[(runs["experiment"] == exp) & (runs["config"] == config)].set_index("run_id")["seed"]
    part = scores[scores["run_id"].isin(ids.index) & (scores["predictor"] == predictor)]
    for col, value in (where or {}).items():
        part = part[part[col].isna()] if isinstance(value, float) and math.isnan(value) else part[part[col] == value]
    out: dict[int, float] = {}
    for run_id, g in part.groupby("run_id"):
        v = pd.to_numeric(g[metric], errors="coerce").dropna()
        out[int(ids[run_id])] = float(reduce(v) if reduce else v.mean()) if len(v) else math.nan
    return out


def _mean_sd(values: dict[int, float]) -> tuple[float, float, int]:
    v = np.array([x for x in values.values() if np.isfinite(x)], float)
    if not len(v):
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def _fmt(values: dict[int, float]) -> str:
    mean, sd, n = _mean_sd(values)
    if n == 0:
        return "n/a" if values else "-"
    return format_score(mean) if not np.isfinite(sd) else f"{mean:.3f} ± {sd:.3f}"


def _places(scores: pd.DataFrame) -> list[tuple[str, str, float]]:
    """(volume, place, distance) in report order: trained animals' held-out spots and planes,
    then unseen volumes (of a trained condition first)."""
    keys = scores[_KEY].drop_duplicates()
    trained = sorted(set(keys.loc[keys["place"] != "volume", "volume_id"]))
    unseen = sorted(set(keys.loc[keys["place"] == "volume", "volume_id"]) - set(trained))
    conditions = _conditions(scores)
    trained_conditions = {conditions.get(v) for v in trained}
    out = []
    for vid in trained:
        mine = keys[keys["volume_id"] == vid]
        if (mine["place"] == "held-out spots").any():
            out.append((vid, "held-out spots", math.nan))
        out += [(vid, "plane", float(d)) for d in sorted(mine.loc[mine["place"] == "plane", "distance_um"])]
    unseen.sort(key=lambda v: (conditions.get(v) not in trained_conditions, v))
    return out + [(vid, "volume", math.nan) for vid in unseen]


def _conditions(scores: pd.DataFrame) -> dict[str, str | None]:
    return {str(v): (c if isinstance(c, str) else None) for v, c in zip(scores["volume_id"], scores["condition"])}


def _place_title(scores: pd.DataFrame, vid: str, place: str, d: float) -> str:
    conditions = _conditions(scores)
    cond = conditions.get(vid)
    trained = set(scores.loc[scores["place"] != "volume", "volume_id"])
    if place == "held-out spots":
        return f"{vid} ({cond or 'no condition'}, trained animal): held-out spots of its section"
    if place == "plane":
        return f"{vid} ({cond or 'no condition'}, trained animal): probe planes {d:g} µm from its section"
    seen = cond is not None and cond in {conditions.get(v) for v in trained}
    kind = "unseen animal of a trained condition" if seen else "unseen animal, condition not trained on"
    return f"{vid} ({cond or 'no condition'}, {kind}): whole volume"


def place_table(runs: pd.DataFrame, scores: pd.DataFrame, vid: str, place: str, d: float,
                comparisons: list[dict] | None = None) -> str:
    """The markdown table of one (volume, place, distance): one row per configuration with its
    baselines beside it. Paired differences are appended to ``comparisons``."""
    where = {"volume_id": vid, "place": place, "distance_um": d}
    head = ["experiment", "configuration", "seeds", "points", "r", "R²", "JSD", "AUC"]
    beside_cols: list[tuple[str, str, str, str]] = []
    for base, metric, label, delta in _BESIDE:
        if (scores.loc[(scores["volume_id"] == vid) & (scores["place"] == place), "predictor"] == base).any():
            if base == "animal_mean" and place == "volume":  # no section of this animal: the training mean stands in
                label, delta = "training mean R²", "ΔR² vs training mean"
            beside_cols.append((base, metric, label, delta))
            head += [label, delta]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for exp, config in _configs(runs):
        r = _per_seed(runs, scores, exp, config, "model", "pearson_mean", where)
        if not r:
            continue
        ids = runs[(runs["experiment"] == exp) & (runs["config"] == config)]["run_id"]
        npts = scores[scores["run_id"].isin(ids) & (scores["predictor"] == "model") & (scores["volume_id"] == vid)
                      & (scores["place"] == place) & ((scores["distance_um"] == d) | (np.isnan(d) & scores["distance_um"].isna()))]["n"]
        cells = [exp, config, str(len(r)), f"{npts.mean():.0f}" if len(npts) else "-",
                 _fmt(r), _fmt(_per_seed(runs, scores, exp, config, "model", "r2_mean", where)),
                 _fmt(_per_seed(runs, scores, exp, config, "model", "jsd_mean", where)),
                 _fmt(_per_seed(runs, scores, exp, config, "model", "macro_auc", where))]
        for base, metric, _, _ in beside_cols:
            b = _per_seed(runs, scores, exp, config, base, metric, where)
            m = _per_seed(runs, scores, exp, config, "model", metric, where)
            diff = paired_difference(m, b)
            cells += [_fmt(b), diff.text() if b else "-"]
            if comparisons is not None and b:
                comparisons.append(_comparison(f"{exp}: {config}", base, metric, vid, place, d, diff))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _comparison(a: str, b: str, metric: str, vid: str, place: str, d: float, diff: PairedDifference) -> dict:
    return {"a": a, "b": b, "metric": metric, "volume_id": vid, "place": place, "distance_um": d,
            "mean_difference": diff.mean, "ci_low": diff.lo, "ci_high": diff.hi, "seeds": diff.n, "verdict": diff.verdict}


def summarise_scores(runs: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds of every metric, per (experiment, configuration, volume, place,
    distance, predictor), with the number of seeds."""
    merged = scores.merge(runs[["run_id", "experiment", "config", "seed"]], on="run_id")
    keys = ["experiment", "config", "volume_id", "condition", "place", "distance_um", "predictor"]
    merged["condition"] = merged["condition"].fillna("")
    merged["distance_um"] = merged["distance_um"].fillna(-1.0)  # groupby drops NaN keys
    agg = merged.groupby(keys, sort=False).agg(
        n_seeds=("seed", "nunique"), points=("n", "mean"),
        **{f"{m}_mean": (m, "mean") for m in _METRICS}, **{f"{m}_sd": (m, "std") for m in _METRICS}).reset_index()
    agg["distance_um"] = agg["distance_um"].where(agg["distance_um"] >= 0, math.nan)
    return agg


# -- findings ---------------------------------------------------------------------------------------
def _run_mean(runs: pd.DataFrame, scores: pd.DataFrame, exp: str, config: str, predictor: str, metric: str,
              group: str) -> dict[int, float]:
    """Per seed: the mean over volumes (and distances) of one place group's per-volume scores
    (``held-out spots``, ``plane``, ``UNSEEN_SAME`` or ``UNSEEN_OTHER``)."""
    ids = runs[(runs["experiment"] == exp) & (runs["config"] == config)].set_index("run_id")["seed"]
    part = scores[scores["run_id"].isin(ids.index) & (scores["predictor"] == predictor) & (scores["group"] == group)]
    return {int(ids[i]): float(np.nanmean(g[metric])) if g[metric].notna().any() else math.nan
            for i, g in part.groupby("run_id")}


_PLACE_WORDS = {"plane": "on the probe planes (mean over trained animals and distances)",
                UNSEEN_SAME: "on unseen animals of a trained condition (mean over volumes)",
                UNSEEN_OTHER: "on animals of a condition not trained on (mean over volumes)",
                "held-out spots": "on held-out spots (mean over trained animals)"}
_VERB = {"higher": "beats", "lower": "loses to", "level": "is level with", "n<2": "(one seed) vs", "n/a": "vs"}


def _sentence(a_name: str, b_name: str, diff: PairedDifference, metric: str, place: str) -> str:
    label = "r" if metric == "pearson_mean" else "R²"
    return f"{a_name} {_VERB.get(diff.verdict, 'vs')} {b_name} {_PLACE_WORDS[place]}: Δ{label} {diff.text()}."


def findings(runs: pd.DataFrame, scores: pd.DataFrame, comparisons: list[dict] | None = None) -> list[str]:
    """Plain-language answers, each a paired difference with its 95 % interval over seeds, to the
    questions the benchmark asks, where its rows exist: 3D context vs 2D, field of view, the
    networks against their baselines (2D extrusion, same-patch ridge, per-animal mean), the
    paper's network against the small 3D CNN, and what the paper's random split flatters."""
    out: list[str] = []

    def compare(a: tuple[str, str], b: tuple[str, str] | str, metric: str, place: str, a_name: str, b_name: str) -> None:
        x = _run_mean(runs, scores, *a, "model", metric, place)
        y = _run_mean(runs, scores, *(b if isinstance(b, tuple) else a), "model" if isinstance(b, tuple) else b, metric, place)
        if not x or not y:
            return
        diff = paired_difference(x, y)
        if diff.n == 0:
            return
        out.append(_sentence(a_name, b_name, diff, metric, place))
        if comparisons is not None:
            comparisons.append(_comparison(a_name, b_name, metric, "mean", place, math.nan, diff))

    cfg = runs.drop_duplicates(["experiment", "config"]).set_index(["experiment", "config"])
    ctx = cfg.loc["context"] if "context" in cfg.index.get_level_values(0) else None
    if ctx is not None and len(ctx) > 1:
        base_width = ctx["width_vox"].mode().iloc[0]
        same_width = ctx[ctx["width_vox"] == base_width].sort_values("depth_vox")
        if len(same_width) > 1:
            flat, deep = same_width.index[0], same_width.index[-1]
            fd, dd = same_width.loc[flat, "depth_um"], same_width.loc[deep, "depth_um"]
            for place in ("plane", UNSEEN_SAME, UNSEEN_OTHER):
                compare(("context", deep), ("context", flat), "pearson_mean", place,
                        f"The {dd:g} µm deep patch ({deep})", f"the {fd:g} µm one ({flat})")
            for mid in same_width.index[1:-1]:
                compare(("context", mid), ("context", flat), "pearson_mean", "plane",
                        f"The {same_width.loc[mid, 'depth_um']:g} µm deep patch ({mid})", f"the {fd:g} µm one")
        ref = ctx[(ctx["width_vox"] == base_width)]
        for other in ctx[ctx["width_vox"] != base_width].index:
            match = ref[ref["depth_vox"] == ctx.loc[other, "depth_vox"]]
            if len(match):
                compare(("context", other), ("context", match.index[0]), "pearson_mean", "plane",
                        f"A {ctx.loc[other, 'width_um']:g} µm field of view ({other})",
                        f"{ctx.loc[match.index[0], 'width_um']:g} µm ({match.index[0]})")
    # the best model (probe planes; not the ridge baseline) against its own baselines
    nets = [(e, c) for e, c in _configs(runs) if cfg.loc[(e, c), "model"] != "RidgeBaseline"]
    def planes_r(key: tuple[str, str]) -> float:
        v = [x for x in _run_mean(runs, scores, *key, "model", "pearson_mean", "plane").values() if np.isfinite(x)]
        return float(np.mean(v)) if v else -math.inf

    ranked = sorted(nets, key=lambda k: -planes_r(k))
    if ranked and np.isfinite(planes_r(ranked[0])):
        best = ranked[0]
        name = f"The best model off the plane ({best[0]}: {best[1]})"
        compare(best, "extrusion", "pearson_mean", "plane", name, "2D extrusion")
        compare(best, "section_extrusion", "pearson_mean", "plane", name, "2D extrusion from every section spot")
        compare(best, "ridge", "pearson_mean", "plane", name, "the ridge on its patch")
        for group in (UNSEEN_SAME, UNSEEN_OTHER):
            compare(best, "ridge", "pearson_mean", group, name, "the ridge on its patch")
            compare(best, "animal_mean", "r2_mean", group, name, "the training mean")
    backbones = cfg.loc["backbones"] if "backbones" in cfg.index.get_level_values(0) else None
    if backbones is not None:
        paper = [c for c in backbones.index if backbones.loc[c, "model"] == "cnn3d_paper"]
        small = [c for c in backbones.index if backbones.loc[c, "model"] == "cnn3d"]
        if paper and small:
            for place in ("plane", UNSEEN_SAME, UNSEEN_OTHER):
                compare(("backbones", paper[0]), ("backbones", small[0]), "pearson_mean", place,
                        "The paper's network (cnn3d_paper)", "the small 3D CNN (cnn3d)")
    splits = cfg.loc["splits"] if "splits" in cfg.index.get_level_values(0) else None
    if splits is not None:
        strat = [c for c in splits.index if splits.loc[c, "split"] == "StratifiedRandomSplit"]
        blocks = [c for c in splits.index if splits.loc[c, "split"] == "SpatialBlocksSplit"]
        if strat and blocks:
            a, b = ("splits", strat[0]), ("splits", blocks[0])
            compare(a, b, "pearson_mean", "held-out spots", "The stratified random split", "spatial blocks")
            compare(a, b, "pearson_mean", "plane", "Trained under the stratified random split, the model", "under spatial blocks")
            gap = {}
            for key in (a, b):
                spots = _run_mean(runs, scores, *key, "model", "pearson_mean", "held-out spots")
                planes = _run_mean(runs, scores, *key, "model", "pearson_mean", "plane")
                gap[key] = {s: spots[s] - planes[s] for s in set(spots) & set(planes)}
            diff = paired_difference(gap[a], gap[b])
            if diff.n:
                out.append(f"What the random split flatters: held-out-spot r minus probe-plane r is {diff.text()} larger "
                           "under the stratified random split than under spatial blocks (paired by seed).")
                if comparisons is not None:
                    comparisons.append(_comparison("stratified: spots - planes", "blocks: spots - planes", "pearson_mean",
                                                   "mean", "held-out spots - plane", math.nan, diff))
    labels = cfg.loc["labels"] if "labels" in cfg.index.get_level_values(0) else None
    if labels is not None:
        fitted = [c for c in labels.index if "programs_fitted" in c]
        truth = [c for c in labels.index if c not in fitted]
        if fitted and truth:
            for place in ("held-out spots", "plane", UNSEEN_SAME, UNSEEN_OTHER):
                compare(("labels", fitted[0]), ("labels", truth[0]), "pearson_mean", place,
                        "The network trained on programs fitted from counts", "the same network trained on the noise-free programs")
    return out


# -- figure -----------------------------------------------------------------------------------------
def _ci(values: dict[int, float]) -> tuple[float, float]:
    from scipy import stats

    v = np.array([x for x in values.values() if np.isfinite(x)], float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else math.nan), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def plot_accuracy_vs_distance(runs: pd.DataFrame, scores: pd.DataFrame, out: Path) -> Path | None:
    """Pearson r (mean over seeds, 95 % interval) against distance from the trained section, one
    row of panels per experiment and one panel per trained animal (held-out spots at 0), with
    the 2D extrusion and kNN baselines (mean over the experiment's runs) in grey; a last panel
    per row gives each unseen animal."""
    places = _places(scores)
    trained = list(dict.fromkeys(v for v, p, _ in places if p != "volume"))
    unseen = [v for v, p, _ in places if p == "volume"]
    exps = list(dict.fromkeys(runs["experiment"]))
    if not exps or not places:
        return None
    ncols = len(trained) + (1 if unseen else 0)
    fig, axes = new_figure(len(exps), ncols, figsize=(4.6 * ncols + 2.5, 3.4 * len(exps)), squeeze=False)
    for i, exp in enumerate(exps):
        configs = [c for e, c in _configs(runs) if e == exp]
        for j, vid in enumerate(trained):
            ax = axes[i, j]
            mine = [(p, d) for v, p, d in places if v == vid]
            xs = [0.0 if p == "held-out spots" else d for p, d in mine]
            for config in configs:
                pts = [_ci(_per_seed(runs, scores, exp, config, "model", "pearson_mean",
                                     {"volume_id": vid, "place": p, "distance_um": d})) for p, d in mine]
                m = np.array([p[0] for p in pts])
                ax.errorbar(xs, m, yerr=[p[1] for p in pts], marker="o", ms=3, capsize=2, lw=1.2, label=config[:45])
            for base in ("extrusion", "knn", "section_extrusion"):
                colour, ls, marker = PREDICTOR_STYLE[base]
                vals = []
                for p, d in mine:
                    per = [v for c in configs for v in _per_seed(runs, scores, exp, c, base, "pearson_mean",
                                                                  {"volume_id": vid, "place": p, "distance_um": d}).values()]
                    vals.append(float(np.nanmean(per)) if per and np.isfinite(per).any() else math.nan)
                if np.isfinite(vals).any():
                    ax.plot(xs, vals, color="0.45", ls=ls, marker=marker, ms=3, lw=1.0,
                            label=f"{PREDICTOR_LABELS[base]} (mean over runs)")
            ax.set_xticks(xs, ["held-out\nspots" if p == "held-out spots" else f"{d:g}" for p, d in mine], fontsize=7)
            ax.set_xlabel("distance from the trained section (µm)", fontsize=8)
            ax.set_ylabel("Pearson r (mean over programs)", fontsize=8)
            ax.set_title(f"{exp}: {vid} (trained animal)", fontsize=9)
            ax.grid(alpha=0.3)
            lo, hi = ax.get_ylim()
            ax.set_ylim(max(lo, -1.05), min(hi, 1.05))  # r lies in [-1, 1]; wider intervals are cut
        if unseen:
            ax = axes[i, -1]
            width = 0.8 / max(len(configs), 1)
            for k, config in enumerate(configs):
                pts = [_ci(_per_seed(runs, scores, exp, config, "model", "pearson_mean",
                                     {"volume_id": v, "place": "volume"})) for v in unseen]
                ax.errorbar(np.arange(len(unseen)) + (k - (len(configs) - 1) / 2) * width, [p[0] for p in pts],
                            yerr=[p[1] for p in pts], marker="o", ms=3, capsize=2, ls="none")
            ax.set_xticks(range(len(unseen)), unseen, fontsize=7, rotation=20)
            ax.set_ylabel("Pearson r (mean over programs)", fontsize=8)
            ax.set_title(f"{exp}: unseen animals (the training mean has no r)", fontsize=9)
            ax.axhline(0, color="0.6", lw=0.6)
            ax.grid(alpha=0.3)
            lo, hi = ax.get_ylim()
            ax.set_ylim(max(lo, -1.05), min(hi, 1.05))
            ax.set_xlim(-0.6, len(unseen) - 0.4)
        axes[i, 0].legend(fontsize=6, loc="upper left", bbox_to_anchor=(0.0, -0.28), ncols=2, frameon=False)  # below: never over the data
    seeds = runs["seed"].nunique()
    fig.suptitle(f"Per-volume accuracy against the truth (error bars: 95 % t interval over {seeds} seed"
                 f"{'s' * (seeds != 1)}; an interval past r = ±1 is cut at the frame)", fontsize=10)
    return save_figure(fig, out)


# -- report -------------------------------------------------------------------------------------------
def baselines_table(runs: pd.DataFrame, scores: pd.DataFrame, comparisons: list[dict] | None = None) -> str:
    """Each configuration against its own baselines, averaged per run over a place group: r on the
    probe planes (mean over trained animals and distances) and on unseen animals (mean over
    volumes, animals of a trained condition apart from those of another condition)."""
    columns: list[tuple[str, str | None, str, str]] = [("plane", None, "pearson_mean", "planes r"),
                                                       ("plane", "extrusion", "pearson_mean", "Δr vs extrusion"),
                                                       ("plane", "section_extrusion", "pearson_mean", "Δr vs all-spot extrusion"),
                                                       ("plane", "ridge", "pearson_mean", "Δr vs ridge")]
    for group, short in ((UNSEEN_SAME, "unseen animal"), (UNSEEN_OTHER, "unseen condition")):
        if (scores["group"] == group).any():
            columns += [(group, None, "pearson_mean", f"{short} r"), (group, "ridge", "pearson_mean", f"{short}: Δr vs ridge"),
                        (group, "animal_mean", "r2_mean", f"{short}: ΔR² vs training mean")]
    head = ["experiment", "configuration"] + [c[3] for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for exp, config in _configs(runs):
        cells = [exp, config]
        for group, predictor, metric, _ in columns:
            model = _run_mean(runs, scores, exp, config, "model", metric, group)
            if predictor is None:
                cells.append(_fmt(model))
                continue
            base = _run_mean(runs, scores, exp, config, predictor, metric, group)
            diff = paired_difference(model, base)
            cells.append(diff.text() if base else "-")
            if comparisons is not None and base:
                comparisons.append(_comparison(f"{exp}: {config}", predictor, metric, "mean", group, math.nan, diff))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cost_table(runs: pd.DataFrame) -> str:
    lines = ["| experiment | configuration | seeds | patch (µm, depth x width) | train s | epochs | params |", "|---|---|---|---|---|---|---|"]
    for (exp, config), g in runs.groupby(["experiment", "config"], sort=False):
        params = int(g["parameters"].max()) if g["parameters"].notna().any() else -1
        lines.append(f"| {exp} | {config} | {g['seed'].nunique()} | {g['depth_um'].iloc[0]:.1f} x {g['width_um'].iloc[0]:.1f} | "
                     f"{g['train_seconds'].mean():.0f} | {g['epochs'].mean():.0f} | "
                     + (f"{params / 1e6:.2f}M" if params >= 1e4 else str(params)) + " |")
    return "\n".join(lines)


def check_one_cohort(runs: pd.DataFrame) -> None:
    """``SystemExit`` with one line when the runs trained on more than one cohort (manifest):
    cohorts share volume ids (``infected_0``) of different animals, so their rows never pool.
    Runs that record no manifest are not counted."""
    known = runs[runs["cohort"].notna()] if "cohort" in runs else runs.iloc[:0]
    cohorts = list(dict.fromkeys(known["cohort"]))
    if len(cohorts) < 2:
        return
    parts = []
    for cohort in cohorts:
        mine = known[known["cohort"] == cohort]
        roots = ", ".join(dict.fromkeys(mine["root"]))
        parts.append(f"{cohort} ({len(mine)} run{'s' if len(mine) != 1 else ''}, under {roots})")
    raise SystemExit(f"error: the runs trained on {len(cohorts)} cohorts: {'; '.join(parts)}; each cohort's volumes are "
                     "its own animals (the same volume id names a different animal in each), so their scores never "
                     "share a table: benchmark one cohort at a time (give only that cohort's run folders)")


def _probe_note(runs: pd.DataFrame) -> str | None:
    """One line when some or all runs were trained without the off-plane probe (no plane rows)."""
    probed = runs["probed"] if "probed" in runs else pd.Series(False, index=runs.index)
    if probed.all():
        return None
    missing = runs.loc[~probed]
    which = ("No run was scored off the plane, so the plane columns are empty" if probed.sum() == 0 else
             f"{len(missing)} of {len(runs)} runs ({', '.join(dict.fromkeys(missing['experiment'] + ': ' + missing['config']))}) "
             "were not scored off the plane, so their plane columns are empty")
    return f"{which}: the probe-plane scores need runs trained with `+off_plane=probe` (the benchmark's experiment configs include it)."


def write_report(dirs: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Collect the runs under ``dirs`` and write ``benchmark.md``, ``benchmark.csv``,
    ``comparisons.csv`` and ``accuracy_vs_distance.png`` into ``out``."""
    runs, scores = collect_runs(dirs)
    if runs.empty or scores.empty:
        raise SystemExit(f"error: no metrics.json with per-volume scores under {', '.join(map(str, dirs))}")
    check_one_cohort(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "benchmark.md", "csv": out / "benchmark.csv", "comparisons": out / "comparisons.csv"}
    summarise_scores(runs, scores).to_csv(paths["csv"], index=False)
    comparisons: list[dict] = []
    seeds = sorted(runs["seed"].unique())
    cohorts = list(dict.fromkeys(runs["cohort"].dropna()))
    probe_note = _probe_note(runs)
    text = ["# Benchmark", "",
            f"{len(runs)} runs ({len(_configs(runs))} configurations, seeds {', '.join(map(str, seeds))}) from: "
            + ", ".join(f"`{d}`" for d in dirs) + (f", all trained on the cohort `{cohorts[0]}`" if cohorts else ""), "",
            "Every score is computed on the points of one volume (never pooled across animals), against the "
            "phantom's truth, and averaged over the programs: Pearson r, R² (coefficient of determination), "
            "Jensen-Shannon divergence (bits) and macro AUC (one-vs-rest on the dominant program); cells are "
            "mean ± sd over seeds. A program whose truth varies by less than "
            f"{MIN_TRUTH_SD:g} (sd) within a volume has no correlation or R² there (left out of the means; n/a when "
            "none is left). Beside each row, its own baselines from the same runs: 2D extrusion (the nearest "
            "training spot's label, copied along the section normal), the features + ridge baseline on the same "
            "patch and training spots, and the per-animal mean (its r is n/a, so R² is compared); off the plane also "
            "all-spot extrusion, from every spot of the section including held-out ones (labels the model never "
            "trained on: a reference for what copying the whole measured section gives). "
            "Δ: mean paired difference over seeds (row minus baseline) with its 95 % t interval; "
            "'higher'/'lower' only when the interval excludes 0, else 'level'.", ""]
    notes = findings(runs, scores, comparisons)
    if notes:
        text += ["## What it shows", ""] + [f"- {n}" for n in notes] + [""]
    text += ["## Every configuration against its own baselines", "",
             "Per-volume scores averaged per run over the trained animals' probe planes (all distances) and over the "
             "unseen animals (those of a trained condition apart from those of another), then compared seed by seed.", ""]
    text += [probe_note, ""] if probe_note else []
    text += [baselines_table(runs, scores, comparisons), ""]
    text += ["## Per volume", ""]
    for vid, place, d in _places(scores):
        text += [f"### {_place_title(scores, vid, place, d)}", "", place_table(runs, scores, vid, place, d, comparisons), ""]
    text += ["## Cost", "", _cost_table(runs), ""]
    excluded = sorted({e for ex in runs["excluded"] for e in ex})
    probe = [p for p in runs["max_patch_um"] if p]
    digests = runs["probe_digest"].dropna().unique()
    text += ["## Probe set", ""]
    if not runs["probed"].any():
        text += ["No probe set: no run was scored off the plane (train with `+off_plane=probe` for the plane columns).", ""]
    elif len(digests) > 1:
        text += [f"{len(digests)} probe sets, not one: the rows' probe columns are not comparable (see the warning below).", ""]
    else:
        text += ["One probe set for all rows: the same points for every configuration and seed, drawn where the "
                 f"largest patch ({', '.join(f'{v:g}' for v in probe[0]) if probe else '?'} µm, depth x height x width) fits.", ""]
    if len(digests) == 1:
        text += [f"- every run with a probe was scored on the same points (probe set {digests[0]}, "
                 f"{int(runs['probe_digest'].notna().sum())} runs)"]
    elif len(digests) > 1:
        text += [f"- WARNING: the runs were scored on {len(digests)} different probe sets ({', '.join(digests)}): "
                 "their probe columns are not comparable"]
    text += [f"- {e}" for e in excluded] or ["- nothing excluded"]
    paths["md"].write_text("\n".join(text) + "\n")
    pd.DataFrame(comparisons).to_csv(paths["comparisons"], index=False)
    figure = plot_accuracy_vs_distance(runs, scores, out / "accuracy_vs_distance.png")
    if figure is not None:
        paths["figure"] = figure
    return paths


REPORT_FILES = ("benchmark.md", "benchmark.csv", "comparisons.csv", "accuracy_vs_distance.png")  # what write_report writes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="multirun or run folders (searched for metrics.json)")
    parser.add_argument("--out", help="report folder (default: the first folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not Path(d).is_dir()]
    if missing:
        parser.exit(2, f"error: not a folder: {', '.join(missing)} (give multirun or run folders)\n")
    out = Path(args.out or args.dirs[0])
    blocker = file_in_the_way(out)
    if blocker is not None:
        parser.exit(2, f"error: --out {out}: {blocker} is a file; give a folder for the report\n")
    taken = [name for name in REPORT_FILES if (out / name).exists()]
    if taken and not args.overwrite:
        parser.exit(2, f"error: {out} holds an earlier report ({', '.join(taken)}); choose another --out or pass "
                       "--overwrite\n")
    try:
        paths = write_report(args.dirs, out)
    except SystemExit as err:  # bad input: its one line, exit status 2
        if isinstance(err.code, str):
            parser.exit(2, err.code + "\n")
        raise
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()

"""Collect training runs into one benchmark table: ``python -m xpression.evaluation.benchmark DIR...``.

Every folder under the given multirun (or run) folders that holds a ``metrics.json`` is one run.
Runs are grouped by experiment (the ``experiment=`` override, else the multirun folder's name)
and, within an experiment, by configuration: the overrides that differ between its runs, the
seed left out. Each row gives the mean +- sd over seeds (sample sd, n - 1) of

- ``held-out spots``: Pearson r (mean over targets) on the held-out spots of the trained plane
  (the run's test split, else validation);
- ``<d> um``: Pearson r on probe planes ``d`` um from the trained sections, against the truth
  (``metrics["off_plane"]``, see ``xpression.evaluation.generalisation``);
- ``other volumes``: the same on volumes without a training section;

plus training time (s), epochs and parameters. Writes ``benchmark.csv`` (numbers),
``benchmark.md`` (the table) and ``accuracy_vs_distance.png`` (one panel per experiment).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

__all__ = ["collect_runs", "summarise_runs", "write_report", "main"]

_SCORE_PREFIX = "r/"
_OFF = "off-plane mean"  # mean over the distance columns of one run


def _overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])] if path.is_file() else []


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def collect_runs(dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run: experiment, overrides, seed, scores (``r/...`` columns), cost."""
    rows = []
    for root in map(Path, dirs):
        # job folders in launch order (0, 1, 2, ..., 10), not string order
        found = sorted(root.rglob("metrics.json"), key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s)
                                                               for s in p.relative_to(root).parts])
        for metrics_path in found:
            run = metrics_path.parent
            metrics = json.loads(metrics_path.read_text())
            over = dict(_split(o) for o in _overrides(run))
            config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
            row: dict[str, Any] = {
                "experiment": over.get("experiment") or root.name,
                "run": str(run),
                "seed": int(over.get("seed", config.get("seed", 0))),
                "overrides": {k: v for k, v in over.items() if k != "seed"},
                "model": (config.get("model") or {}).get("backbone", {}).get("name")
                or str((config.get("model") or {}).get("_target_", "")).rsplit(".", 1)[-1],
                f"{_SCORE_PREFIX}held-out spots": metrics.get("pearson_mean", math.nan),
                "train_seconds": metrics.get("train_seconds", math.nan),
                "epochs": metrics.get("epochs", math.nan),
                "parameters": metrics.get("parameters", math.nan),
                "depth_vox": (metrics.get("patch_shape_vox") or [math.nan])[0],
                "width_vox": (metrics.get("patch_shape_vox") or [math.nan] * 3)[-1],
                "split": str((config.get("split") or {}).get("_target_", "")).rsplit(".", 1)[-1],
            }
            off = metrics.get("off_plane") or {}
            for key, value in off.items():
                if isinstance(value, (int, float)):
                    label = "other volumes" if key == "other_volumes" else f"{float(key):g} um"
                    row[f"{_SCORE_PREFIX}{label}"] = value
            planes = [v for k, v in off.items() if k != "other_volumes" and isinstance(v, (int, float))]
            if planes:
                row[f"{_SCORE_PREFIX}{_OFF}"] = float(np.nanmean(planes))
            rows.append(row)
    return pd.DataFrame(rows)


def _labels(runs: pd.DataFrame) -> list[str]:
    """Per run: the overrides that vary within its experiment (seed excluded), else the model."""
    labels = [""] * len(runs)
    for _, group in runs.groupby("experiment", sort=False):
        keys = sorted({k for o in group["overrides"] for k in o})
        varying = [k for k in keys if len({o.get(k) for o in group["overrides"]}) > 1]
        for i, o in zip(group.index, group["overrides"]):
            labels[runs.index.get_loc(i)] = " ".join(f"{k}={o.get(k)}" for k in varying) or str(runs.at[i, "model"])
    return labels


def _score_columns(frame: pd.DataFrame) -> list[str]:
    cols = [c for c in frame.columns if c.startswith(_SCORE_PREFIX) and not c.endswith(("_mean", "_sd"))]

    def order(c: str) -> tuple[int, float]:
        name = c[len(_SCORE_PREFIX):]
        if name == "held-out spots":
            return (0, 0.0)
        if name == _OFF:
            return (1, math.inf)
        if name == "other volumes":
            return (2, 0.0)
        return (1, float(name.split()[0]))

    return sorted(dict.fromkeys(cols), key=order)


def summarise_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (experiment, configuration): ``n_seeds``, ``<score>_mean``/``_sd``, cost."""
    runs = runs.copy()
    runs["config"] = _labels(runs)
    scores = _score_columns(runs)
    rows = []
    for (exp, config), g in runs.groupby(["experiment", "config"], sort=False):
        row: dict[str, Any] = {"experiment": exp, "config": config, "n_seeds": int(g["seed"].nunique())}
        for c in scores:
            v = pd.to_numeric(g[c], errors="coerce").dropna() if c in g else pd.Series(dtype=float)
            row[f"{c}_mean"] = float(v.mean()) if len(v) else math.nan
            row[f"{c}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        row["train_seconds"] = float(g["train_seconds"].mean())
        row["epochs"] = float(g["epochs"].mean())
        row["parameters"] = int(g["parameters"].max()) if g["parameters"].notna().any() else -1
        for key in ("model", "split", "depth_vox", "width_vox"):
            row[key] = g[key].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(mean: float, sd: float) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.3f}" if not np.isfinite(sd) else f"{mean:.3f} ± {sd:.3f}"


def markdown_table(summary: pd.DataFrame) -> str:
    """The summary as a GitHub markdown table (scores as mean ± sd over seeds)."""
    scores = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    head = ["experiment", "configuration", "seeds"] + [c[len(_SCORE_PREFIX):] for c in scores] + ["train s", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        cells = [str(r["experiment"]), str(r["config"]), str(r["n_seeds"])]
        cells += [_fmt(r[f"{c}_mean"], r[f"{c}_sd"]) for c in scores]
        params = int(r["parameters"])
        cells += [f"{r['train_seconds']:.0f}", f"{params / 1e6:.2f}M" if params >= 1e4 else str(params)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_distance(summary: pd.DataFrame, out: Path) -> Path | None:
    """Mean r (error bars: sd over seeds) against distance from the trained plane, one line per
    configuration and one panel per experiment; other volumes as the right-most point."""
    from xpression.plotting import new_figure, save_figure

    scores = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean") and _OFF not in c]
    if summary.empty or not scores:
        return None
    names = [c[len(_SCORE_PREFIX):] for c in scores]
    xs = [0.0 if n == "held-out spots" else math.nan if n == "other volumes" else float(n.split()[0]) for n in names]
    far = max([x for x in xs if np.isfinite(x)] + [0.0])
    xs = [far + max(far * 0.25, 50.0) if not np.isfinite(x) else x for x in xs]
    exps = list(dict.fromkeys(summary["experiment"]))
    fig, axes = new_figure(1, len(exps), figsize=(5 * len(exps), 4), squeeze=False)
    for ax, exp in zip(axes[0], exps):
        for _, r in summary[summary["experiment"] == exp].iterrows():
            m = np.array([r[f"{c}_mean"] for c in scores], float)
            s = np.nan_to_num(np.array([r[f"{c}_sd"] for c in scores], float))
            ok = np.isfinite(m)
            near = ok & np.array([n != "other volumes" for n in names])
            line = ax.errorbar(np.array(xs)[near], m[near], yerr=s[near], marker="o", capsize=3, label=str(r["config"])[:40])
            far_ok = ok & ~near  # other volumes: a point of its own, not on the distance axis
            ax.errorbar(np.array(xs)[far_ok], m[far_ok], yerr=s[far_ok], marker="s", capsize=3, ls="none",
                        color=line[0].get_color())
        ax.set_xticks(xs, ["spots" if n == "held-out spots" else "other\nvolumes" if n == "other volumes" else n.split()[0] for n in names])
        ax.set_xlabel("distance from the trained plane (um)")
        ax.set_ylabel("Pearson r (mean over targets)")
        ax.set_title(exp)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out)


def _r(summary: pd.DataFrame, row: Any, col: str) -> str:
    return _fmt(row[f"{_SCORE_PREFIX}{col}_mean"], row[f"{_SCORE_PREFIX}{col}_sd"])


def _compare(summary: pd.DataFrame, a: Any, b: Any, col: str = _OFF) -> str:
    """"beats" / "does not beat", or "is level with" when the means differ by less than the
    larger of the two sds over seeds."""
    ma, mb = a[f"{_SCORE_PREFIX}{col}_mean"], b[f"{_SCORE_PREFIX}{col}_mean"]
    sd = np.nanmax([a[f"{_SCORE_PREFIX}{col}_sd"], b[f"{_SCORE_PREFIX}{col}_sd"], 0.0])
    if abs(ma - mb) < sd:
        return "is level with (within one sd)"
    return "beats" if ma > mb else "does not beat"


def findings(summary: pd.DataFrame) -> list[str]:
    """Plain-language answers, with the numbers, to the questions the benchmark asks (where
    its rows exist): 3D vs 2D away from the plane, the best model vs the ridge baseline and the
    paper's network, and how much the stratified random split flatters the held-out score."""
    off, spots = f"{_SCORE_PREFIX}{_OFF}_mean", f"{_SCORE_PREFIX}held-out spots_mean"
    if off not in summary:
        return []
    out = []
    ctx = summary[(summary["experiment"] == "context") & summary[off].notna()]
    flat = ctx[ctx["depth_vox"] == 1]
    if len(flat):
        f = flat.iloc[0]
        deep = ctx[(ctx["depth_vox"] > 1) & (ctx["width_vox"] == f["width_vox"])]  # same field of view
    if len(flat) and len(deep):
        d = deep.loc[deep[off].idxmax()]
        verdict = _compare(summary, d, f)
        out.append(f"3D context {verdict} 2D away from the trained plane: best 3D patch ({d['config']}) "
                   f"{_r(summary, d, _OFF)} vs 2D ({f['config']}) {_r(summary, f, _OFF)} off-plane mean r.")
    ridge = summary[summary["model"] == "RidgeBaseline"]
    nets = summary[(summary["model"] != "RidgeBaseline") & summary[off].notna()]
    if len(nets):
        best = nets.loc[nets[off].idxmax()]
        name = f"{best['experiment']}: {best['config']}"
        if len(ridge):
            rb = ridge.iloc[0]
            verdict = _compare(summary, best, rb)
            text = (f"The best network ({name}) {verdict} the features + ridge baseline off the plane: "
                    f"{_r(summary, best, _OFF)} vs {_r(summary, rb, _OFF)}; on held-out spots "
                    f"{_r(summary, best, 'held-out spots')} vs {_r(summary, rb, 'held-out spots')}")
            if "other volumes_mean" in "".join(summary.columns):
                text += f"; on other volumes {_r(summary, best, 'other volumes')} vs {_r(summary, rb, 'other volumes')}"
            out.append(text + ".")
        paper = nets[nets["model"] == "cnn3d_paper"]
        if len(paper):
            pb = paper.iloc[0]
            verdict = _compare(summary, best, pb)
            if best.name == pb.name:
                verdict = "is"
            out.append(f"The best network ({name}) {verdict} the paper's network ({pb['experiment']}: {pb['config']}): "
                       f"{_r(summary, best, _OFF)} vs {_r(summary, pb, _OFF)} off-plane mean r.")
    splits = summary[summary["experiment"] == "splits"]
    strat = splits[splits["split"] == "StratifiedRandomSplit"]
    blocks = splits[splits["split"] == "SpatialBlocksSplit"]
    if len(strat) and len(blocks):
        a, b = strat.iloc[0], blocks.iloc[0]
        out.append(f"The paper's stratified random split reports {_r(summary, a, 'held-out spots')} on held-out spots, "
                   f"spatial blocks {_r(summary, b, 'held-out spots')} (difference {a[spots] - b[spots]:+.3f}); "
                   f"off the plane, where nothing leaks, the same models score {_r(summary, a, _OFF)} and "
                   f"{_r(summary, b, _OFF)} (difference {a[off] - b[off]:+.3f}); held-out minus off-plane score: "
                   f"stratified {a[spots] - a[off]:+.3f}, spatial blocks {b[spots] - b[off]:+.3f}.")
    return out


def write_report(dirs: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Collect the runs under ``dirs`` and write ``benchmark.csv``, ``benchmark.md`` and the
    accuracy-vs-distance figure into ``out``."""
    runs = collect_runs(dirs)
    if runs.empty:
        raise SystemExit(f"no metrics.json under {', '.join(map(str, dirs))}")
    summary = summarise_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "benchmark.csv", "md": out / "benchmark.md"}
    summary.to_csv(paths["csv"], index=False)
    text = ["# Benchmark", "", f"{len(runs)} runs from: " + ", ".join(f"`{d}`" for d in dirs), "",
            "Pearson r between predicted and true targets (mean over targets), mean ± sd over seeds. "
            "`held-out spots`: the test spots of the trained plane; `<d> um`: probe planes at that "
            "distance from the trained sections, against the phantom truth; `other volumes`: volumes "
            "without a training section; `off-plane mean`: the mean of the distance columns.", "",
            markdown_table(summary), ""]
    notes = findings(summary)
    if notes:
        text += ["## What it shows", ""] + [f"- {n}" for n in notes] + [""]
    paths["md"].write_text("\n".join(text))
    figure = plot_accuracy_vs_distance(summary, out / "accuracy_vs_distance.png")
    if figure is not None:
        paths["figure"] = figure
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="multirun or run folders (searched for metrics.json)")
    parser.add_argument("--out", help="report folder (default: the first folder)")
    args = parser.parse_args(argv)
    paths = write_report(args.dirs, args.out or args.dirs[0])
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()

"""Scores against the number of labelled training spots (a label-budget curve).

    python benchmarks/label_curve.py RUNS_DIR... --out OUT [--names NAME...]

Each ``RUNS_DIR`` is one configuration's folder of training runs (a Hydra multirun, e.g. one
lever of ``benchmarks/levers.sh``, or the ``data.train_fraction`` / ``data.sections`` variants of
one recipe), all scored with the off-plane probe on one cohort. Per configuration it prints the
training spots per animal and, per volume and place (held-out spots, probe planes of a trained
animal, whole planes of an unseen one), Pearson r as mean ± sd over seeds, with extrusion of the
same run's training spots beside the trained animals' planes; ``OUT/label_curve.png`` plots r
against the training spots (one line per volume and place), ``OUT/label_curve.md`` keeps the
table (neither is overwritten: an ``OUT`` holding them is refused). Volumes are never pooled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from xpression.evaluation.benchmark import collect_runs

PLACE = {"held-out spots": "held-out spots", "plane": "probe planes", "volume": "unseen, whole planes"}


def training_spots(run: Path) -> dict[str, int]:
    """Training spots per volume of one run (from its ``predictions.csv``)."""
    path = run / "predictions.csv"
    if not path.is_file():
        raise SystemExit(f"{run}: no predictions.csv (train.py writes one per finished run); its training spots are unknown")
    table = pd.read_csv(path, usecols=["volume_id", "split"])
    return table[table["split"] == "train"].groupby("volume_id").size().astype(int).to_dict()


def collect(dirs: list[Path], names: list[str]) -> pd.DataFrame:
    """One row per (configuration, seed, volume, place, predictor): Pearson r, R² and the run's
    training spots (in all, and per volume)."""
    rows = []
    for name, root in zip(names, dirs):
        runs, scores = collect_runs([root])
        if runs.empty:
            raise SystemExit(f"{root}: no scored runs (metrics.json with score rows) under it")
        for run in runs.itertuples():
            spots = training_spots(Path(run.run))
            part = scores[scores["run_id"] == run.run_id]
            means = part.groupby(["volume_id", "place", "predictor"])[["pearson_mean", "r2_mean"]].mean().reset_index()
            for r in means.itertuples():
                rows.append({"config": name, "seed": run.seed, "volume_id": r.volume_id, "place": r.place,
                             "predictor": r.predictor, "r": r.pearson_mean, "r2": r.r2_mean,
                             "train_spots": sum(spots.values()), "spots_by_volume": spots})
    return pd.DataFrame(rows)


def _scores(df: pd.DataFrame, predictor: str, volume_id: str, place: str) -> pd.DataFrame:
    """The rows of one predictor on one volume and place."""
    return df[(df["predictor"] == predictor) & (df["volume_id"] == volume_id) & (df["place"] == place)]


def table(df: pd.DataFrame) -> str:
    """Markdown: one row per configuration, one column per (volume, place); r mean ± sd over seeds."""
    model = df[df["predictor"] == "model"]
    keys = sorted(set(zip(model["volume_id"], model["place"])), key=lambda k: (k[1] != "held-out spots", k[1] != "plane", k[0]))
    head = ["configuration", "seeds", "training spots (per animal)"] + [f"{v} {PLACE.get(p, p)}" for v, p in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(df["config"]):
        sub = df[df["config"] == name]
        per_run = sub.drop_duplicates("seed")["spots_by_volume"]
        per_animal = pd.DataFrame(list(per_run)).fillna(0).mean().sort_index()
        cells = [name, str(sub["seed"].nunique()), f"{sub['train_spots'].mean():.0f} ("
                 + ", ".join(f"{v} {n:.0f}" for v, n in per_animal.items()) + ")"]
        for vid, place in keys:
            m = _scores(sub, "model", vid, place)["r"]
            cell = "-" if m.empty else f"{m.mean():.3f} ± {m.std(ddof=1):.3f}" if len(m) > 1 else f"{m.mean():.3f}"
            ext = _scores(sub, "extrusion", vid, place)["r"]
            if place == "plane" and not m.empty and not ext.empty:
                cell += f" (extrusion {ext.mean():.3f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = df[df["predictor"] == "model"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for ax, place in zip(axes, ("held-out spots", "plane", "volume")):
        part = model[model["place"] == place]
        for vid, sub in part.groupby("volume_id"):
            g = sub.groupby("config", sort=False).agg(x=("train_spots", "mean"), r=("r", "mean"), sd=("r", "std")).sort_values("x")
            line = ax.errorbar(g["x"], g["r"], yerr=g["sd"].fillna(0), marker="o", capsize=3, label=vid)
            if place == "plane":
                ext = _scores(df, "extrusion", vid, place)
                e = ext.groupby("config", sort=False).agg(x=("train_spots", "mean"), r=("r", "mean")).sort_values("x")
                ax.plot(e["x"], e["r"], ls=":", marker="x", color=line[0].get_color(), label=f"{vid}: extrusion (no CT)")
        ax.set_title(PLACE[place])
        ax.set_xlabel("labelled training spots (all trained sections)")
        ax.grid(alpha=0.3)
        if len(part):
            ax.legend(fontsize=7)
    axes[0].set_ylabel("Pearson r (mean over programs; mean ± sd over seeds)")
    fig.suptitle("Scores against the label budget, per volume (never pooled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="one folder of training runs per configuration")
    p.add_argument("--names", nargs="+", help="a label per folder (default: the folder names)")
    p.add_argument("--out", type=Path, required=True, help="folder for label_curve.png and label_curve.md")
    args = p.parse_args(argv)
    names = args.names or [d.name for d in args.dirs]
    if len(names) != len(args.dirs):
        p.error(f"--names gives {len(names)} labels for {len(args.dirs)} folders")
    for d in args.dirs:
        if not d.is_dir():
            p.error(f"{d}: no such folder")
    taken = [f for f in (args.out / "label_curve.md", args.out / "label_curve.png") if f.exists()]
    if taken:
        p.error(f"{taken[0]} exists; choose another --out (nothing is overwritten)")
    df = collect(args.dirs, names)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(df)
    (args.out / "label_curve.md").write_text(text + "\n")
    figure(df, args.out / "label_curve.png")
    print(text)
    print(f"figure: {args.out / 'label_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two recipes' swept maps, per volume and place, paired by seed, beside the no-CT baselines.

    python benchmarks/seed_maps.py A_DIR B_DIR [--sweep] [--csv OUT.csv]

``A_DIR`` and ``B_DIR`` are multirun folders of ``train.py -m seed=...`` (one run per seed, e.g.
``benchmarks/default_recipe.sh``'s candidates). ``--sweep`` first runs ``infer.py`` on every run
without maps (into ``<run>/maps``; a run that has them is kept). Each run's ``maps/evaluation.csv``
(the swept maps scored against the phantom truth, with 2D extrusion, kNN and the training mean
from the same run's training spots) is read; for every volume and place (held-out spots, the
section plane, planes 100 and 200 um away, unseen whole volumes) it prints A and B (Pearson r,
mean over programs, mean +- sd over seeds; R² in brackets), the paired difference B - A with its
95 % t interval ("level" when it holds 0), and the baselines: 2D extrusion and extrusion from every
section spot (r), the training mean (R²), and B's paired difference with 2D extrusion.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xpression.evaluation.benchmark import runs_by_seed  # noqa: E402
from xpression.evaluation.stats import paired_difference  # noqa: E402


def sweep(run: Path, python: str) -> None:
    """``infer.py`` on ``run`` into ``run/maps`` unless it has finished maps there."""
    if (run / "maps" / "evaluation.csv").is_file():
        return
    subprocess.run([python, str(ROOT / "infer.py"), f"run={run}", f"output={run / 'maps'}", "progress=false",
                    "figures=false"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def scores(runs: dict[int, Path]) -> pd.DataFrame:
    """Every run's evaluation rows with its seed."""
    frames = []
    for seed, run in runs.items():
        path = run / "maps" / "evaluation.csv"
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing; sweep the run first (--sweep)")
        frames.append(pd.read_csv(path).assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


def per_seed(table: pd.DataFrame, predictor: str, column: str) -> dict[tuple, dict[int, float]]:
    """``{(volume, where, distance): {seed: value}}`` of one predictor's column."""
    rows = table[table["predictor"] == predictor].assign(distance_um=lambda t: t["distance_um"].fillna(-1.0))  # NaN keys never match
    out: dict[tuple, dict[int, float]] = {}
    for (vid, where, dist), part in rows.groupby(["volume_id", "where", "distance_um"], dropna=False, sort=False):
        out[(vid, where, dist)] = dict(zip(part["seed"], part[column]))
    return out


def summary(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str) -> pd.DataFrame:
    ra, rb = per_seed(a, "model", "pearson_mean"), per_seed(b, "model", "pearson_mean")
    qa, qb = per_seed(a, "model", "r2_mean"), per_seed(b, "model", "r2_mean")
    baselines = {name: per_seed(b, pred, col) for name, pred, col in
                 [("extrusion r", "extrusion", "pearson_mean"), ("all-spot extrusion r", "section_extrusion", "pearson_mean"),
                  ("training mean R²", "train_mean", "r2_mean")]}
    rows = []
    for key in ra:
        if key not in rb:
            continue
        vid, where, dist = key
        va, vb = np.array(list(ra[key].values())), np.array(list(rb[key].values()))
        row = {"volume": vid, "where": where, "um": "" if dist < 0 else f"{dist:g}", "seeds": len(vb),
               f"{name_a} r": f"{va.mean():.3f} ± {va.std(ddof=1):.3f} ({np.mean(list(qa[key].values())):.3f})",
               f"{name_b} r": f"{vb.mean():.3f} ± {vb.std(ddof=1):.3f} ({np.mean(list(qb[key].values())):.3f})",
               f"{name_b} - {name_a}": paired_difference(rb[key], ra[key]).text()}
        for name, values in baselines.items():
            v = [x for x in values.get(key, {}).values() if np.isfinite(x)]
            row[name] = f"{np.mean(v):.3f}" if v else "-"
        extrusion = baselines["extrusion r"].get(key)
        row[f"{name_b} - extrusion"] = paired_difference(rb[key], extrusion).text() if extrusion else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """A markdown table of ``table``'s cells as they are."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="multirun folder of recipe A")
    parser.add_argument("b", type=Path, help="multirun folder of recipe B")
    parser.add_argument("--sweep", action="store_true", help="run infer.py on every run without maps first")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    runs_a, runs_b = runs_by_seed(args.a), runs_by_seed(args.b)
    if args.sweep:
        for run in [*runs_a.values(), *runs_b.values()]:
            sweep(run, sys.executable)
    table = summary(scores(runs_a), scores(runs_b), args.a.name, args.b.name)
    print(markdown(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

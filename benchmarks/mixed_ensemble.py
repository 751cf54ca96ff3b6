"""Two models averaged point by point on the off-plane probe, scored per volume and paired by seed.

    python benchmarks/mixed_ensemble.py A_DIR B_DIR [--weight-b 0.5] [--csv OUT.csv]

``A_DIR`` and ``B_DIR`` are multirun folders (one run per seed) whose runs were scored on the
off-plane probe, so each holds ``probe_points.csv`` (every probe point, its truth, the model's
and the baselines' answers). The runs of A and B with the same seed must have scored the same
points (the same cohort, trained sections and probe settings: checked). Their models can be of
any kind and input (a network and a forest, say): only their answers are combined, as
``(1 - w) * A + w * B``.

Per volume and place, as the benchmark reports them (a trained animal's probe planes: the r of
each distance, averaged over distances; an unseen animal: its whole volume), it prints the mean
over seeds of A, B, the mix and the 2D-extrusion baseline of the same points (Pearson r, mean
over programs), and the mix's paired differences with A and with B (95 % t interval over seeds;
"level" when it includes 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xpression.evaluation.benchmark import runs_by_seed  # noqa: E402
from xpression.evaluation.scores import score_rows  # noqa: E402
from xpression.evaluation.stats import paired_difference  # noqa: E402

PLACE = ["volume_id", "where", "distance_um"]
WHERE_UM = ["z_um", "y_um", "x_um"]


def probe_runs(folder: Path) -> dict[int, Path]:
    """The runs under ``folder`` that kept their probe points, by seed."""
    return runs_by_seed(folder, "probe_points.csv", " (train with +off_plane=probe)")


def target_kind(run: Path) -> str:
    import json

    return json.loads((run / "metrics.json").read_text())["target_kind"]


def place_scores(table: pd.DataFrame, preds: dict[str, str], kind: str) -> dict[tuple[str, str], dict[str, float]]:
    """Mean Pearson r per (volume, place) for each predictor (``{label: column prefix}``); a
    volume's planes are averaged over distances, as the benchmark does."""
    names = [c.split("/", 1)[1] for c in table.columns if c.startswith("true/")]
    per: dict[tuple[str, str], dict[str, list[float]]] = {}
    for (vid, where, _), part in table.groupby(PLACE, dropna=False, sort=True):
        truth = part[[f"true/{n}" for n in names]].to_numpy(float)
        have = {label: part[[f"{p}/{n}" for n in names]].to_numpy(float) for label, p in preds.items()
                if f"{p}/{names[0]}" in part and part[f"{p}/{names[0]}"].notna().all()}
        for row in score_rows(have, truth, names, kind):
            per.setdefault((str(vid), str(where)), {}).setdefault(row["predictor"], []).append(row["pearson_mean"])
    return {k: {p: float(np.nanmean(v)) for p, v in d.items()} for k, d in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", type=Path, help="multirun folder of model A")
    ap.add_argument("b", type=Path, help="multirun folder of model B")
    ap.add_argument("--weight-b", type=float, default=0.5, help="B's weight in the mix, in [0, 1]")
    ap.add_argument("--csv", type=Path, default=None, help="also write the per-seed scores here")
    args = ap.parse_args()
    if not 0.0 <= args.weight_b <= 1.0:
        raise SystemExit(f"error: --weight-b must lie in [0, 1], got {args.weight_b}")
    runs_a, runs_b = probe_runs(args.a), probe_runs(args.b)
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        raise SystemExit(f"error: no seed in common: A has {sorted(runs_a)}, B has {sorted(runs_b)}")
    w = float(args.weight_b)
    rows = []
    for seed in seeds:
        a = pd.read_csv(runs_a[seed] / "probe_points.csv")
        b = pd.read_csv(runs_b[seed] / "probe_points.csv")
        same = len(a) == len(b) and (a["volume_id"] == b["volume_id"]).all() and np.allclose(a[WHERE_UM], b[WHERE_UM])
        if not same:
            raise SystemExit(f"error: seed {seed}: {runs_a[seed]} and {runs_b[seed]} scored different probe points")
        names = [c.split("/", 1)[1] for c in a.columns if c.startswith("true/")]
        mix = a[PLACE + WHERE_UM + [f"true/{n}" for n in names] + [f"extrusion/{n}" for n in names if f"extrusion/{n}" in a]].copy()
        for n in names:
            mix[f"A/{n}"] = a[f"model/{n}"]
            mix[f"B/{n}"] = b[f"model/{n}"]
            mix[f"mix/{n}"] = (1.0 - w) * a[f"model/{n}"] + w * b[f"model/{n}"]
        scores = place_scores(mix, {"A": "A", "B": "B", "mix": "mix", "extrusion": "extrusion"}, target_kind(runs_a[seed]))
        for (vid, where), by in scores.items():
            rows += [{"seed": seed, "volume_id": vid, "where": where, "predictor": p, "pearson_mean": r} for p, r in by.items()]
    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(f"A: {args.a}\nB: {args.b}\nmix: {1 - w:g} A + {w:g} B; seeds {seeds}; Pearson r, mean over programs, per volume")
    print(f"{'volume':14s} {'place':7s} {'A':>6s} {'B':>6s} {'mix':>6s} {'extr.':>6s}  mix - A                      mix - B")
    for (vid, where), part in table.groupby(["volume_id", "where"], sort=True):
        r = {p: dict(zip(g["seed"], g["pearson_mean"])) for p, g in part.groupby("predictor")}
        mean = {p: f"{np.nanmean(list(v.values())):6.3f}" for p, v in r.items()}
        print(f"{vid:14s} {where:7s} {mean.get('A', '-'):>6s} {mean.get('B', '-'):>6s} {mean.get('mix', '-'):>6s} "
              f"{mean.get('extrusion', '     -'):>6s}  {paired_difference(r['mix'], r['A']).text():28s} "
              f"{paired_difference(r['mix'], r['B']).text()}")


if __name__ == "__main__":
    main()

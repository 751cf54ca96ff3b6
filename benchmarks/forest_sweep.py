"""Where a forest's patch-by-patch sweep spends its time, in one profiled run of ``infer.py``.

    python benchmarks/forest_sweep.py RUN [--volume-id ID] [--out DIR] [infer.py key=value ...]

``RUN`` is a ``model=forest`` run (``make run``'s, say). One volume of its cohort (default: the
first) is swept by ``infer.py`` as a user runs it (``figures=false ct_preview=false``, no
scoring) under ``cProfile``; the table gives, per step of the patch path, its time (cumulative,
each counted once), its share of the sweep and the grid points per second the sweep reached:

- the sweep: ``_run_patch`` (every tile's patches, their features and the trees), and the whole
  command (start-up, mask, writes included);
- cutting each batch's patches and context views from the tile's block (``_windows``);
- the filter bank's Gaussian features (``ViewKernels.features``) and signed distances
  (``NearestFirst.distances``);
- the trees (``tree_leaves``).

Further ``key=value`` arguments go to ``infer.py`` (e.g. ``uncertainty=trees ood=true``).

The profile runs on one CPU thread (``--threads 1``): cProfile sees only the thread it runs in,
and a forest splits its rows over torch's threads (``map_rows``). ``--threads N`` times the
command on N threads as ``infer.py`` runs it, without the per-step rows.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import runpy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = [  # (label, file suffix, function name)
    ("sweep (_run_patch)", "inference/sweep.py", "_run_patch"),
    ("patches and context views cut", "inference/sweep.py", "_windows"),
    ("Gaussian features", "models/filterbank.py", "features"),
    ("signed distances", "models/filterbank.py", "distances"),
    ("trees", "models/forest.py", "tree_leaves"),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Cumulative seconds of the function ``name`` defined in a file ending with ``suffix``."""
    return sum(v[3] for (file, _, func), v in stats.stats.items() if file.endswith(suffix) and func == name)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a model=forest run folder")
    ap.add_argument("--volume-id", default=None, help="the volume to sweep (default: the cohort's first)")
    ap.add_argument("--out", type=Path, default=None, help="where the maps go (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the profile's steps; more: the whole command's time only)")
    args, extra = ap.parse_known_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    from xpression.data.manifest import load_manifest
    from xpression.inference.predictor import InferenceError
    from xpression.inference.runs import resolve_run

    try:
        info = resolve_run(args.run)
    except InferenceError as err:
        raise SystemExit(f"error: {err}") from None
    out = args.out or Path(tempfile.mkdtemp(prefix="forest_sweep_"))
    volume = [f"volumes=[{args.volume_id or load_manifest(info.manifest).volumes[0].id}]"]
    sys.argv = ["infer.py", f"run={args.run}", f"output={out}", "progress=false", "figures=false", "ct_preview=false",
                "infer/evaluation=none", *volume, *extra]
    profile = cProfile.Profile() if args.threads == 1 else None
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    try:
        runpy.run_path(str(ROOT / "infer.py"), run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    if profile is not None:
        profile.disable()
    total = time.perf_counter() - start
    import numpy as np

    from xpression.inference.writers import read_maps

    summary = json.loads((out / "summary.json").read_text())
    points = 0  # the tissue grid points the sweep predicted (the rest of the grid is NaN)
    for vid in summary["volumes"]:
        maps, _ = read_maps(out / vid / "maps.ome.zarr")
        points += int(np.isfinite(np.asarray(maps[0])).sum())
    print(f"\n{args.run}: {', '.join(summary['volumes'])}, {points:,} grid points; maps in {out}; "
          f"{args.threads} thread(s)\n")
    print("| step | seconds | share of the sweep | grid points/s |")
    print("|---|---|---|---|")
    print(f"| whole command{' (profiled)' if profile is not None else ''} | {total:.1f} | - | {points / total:,.0f} |")
    if profile is None:
        return 0
    stats = pstats.Stats(profile)
    sweep = cumulative(stats, *STEPS[0][1:])
    for label, suffix, name in STEPS:
        t = cumulative(stats, suffix, name)
        print(f"| {label} | {t:.1f} | {t / sweep:.0%} | {points / t:,.0f} |" if t else f"| {label} | 0 | - | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

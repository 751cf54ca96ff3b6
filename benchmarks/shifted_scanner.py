"""Do the uncertainty and ood channels rise on animals scanned differently from the trained ones?

    python benchmarks/shifted_scanner.py ENSEMBLE --out runs/shifted [--param noise_scale=3] [--cohort data/phantom_benchmark/cohort.yaml]

On the benchmark cohort the unseen animals are no harder than the trained ones (README,
"Uncertainty and out-of-distribution"), so neither the members' spread nor the ood distance has
reason to be higher there. This script makes them harder the way a real study can: the same
animals, the unseen ones re-scanned with another scanner setting. It

1. draws the cohort again with the same seed and preset but the parameters given with
   ``--param`` (default ``noise_scale=3``: three times each animal's noise; or e.g.
   ``psf_sigma_um=8``): every structure, section and label is identical, only the images differ,
2. writes a manifest that takes the trained animals' volumes from the original cohort and every
   other animal's from the re-scanned one (``<out>/cohort_unseen_<param>.yaml``),
3. sweeps ``ENSEMBLE`` (a multirun folder, ``infer.py uncertainty=ensemble ood=true``) over the
   original cohort and over that manifest, and
4. prints, per volume, mean |error|, mean SD and mean ood of both sweeps side by side.

The trained animals' volumes are the same files in both sweeps, so their rows must agree: a check
that the comparison is like for like.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xpression.phantom import generate_cohort  # noqa: E402


def trained_volumes(ensemble: Path, cohort: Path) -> set[str]:
    """Ids of the volumes in ``cohort`` whose sections the ensemble's members trained on (a run
    without ``data.sections`` trained on every section)."""
    from xpression.data.manifest import load_manifest

    configs = sorted(ensemble.glob("*/config.yaml"))
    if not configs:
        raise SystemExit(f"error: no run under {ensemble} (expected <ensemble>/<k>/config.yaml)")
    manifest = load_manifest(cohort)
    sections: set[str] = set()
    for config in configs:
        listed = yaml.safe_load(config.read_text())["data"].get("sections")
        sections |= set(listed) if listed else {s.id for s in manifest.sections}
    return {v.id for v in manifest.volumes if any(s.id in sections for s in v.sections)}


def absolute(manifest: dict, root: Path) -> dict:
    """The manifest with every relative file path made absolute against ``root``."""
    def fix(p: str) -> str:
        return p if Path(p).is_absolute() else str((root / p).resolve())
    m = yaml.safe_load(yaml.safe_dump(manifest))
    for v in m["volumes"]:
        v["image"] = fix(v["image"])
        for s in v.get("sections", []):
            s["adata"], s["landmarks"] = fix(s["adata"]), fix(s["landmarks"])
    m["truth"]["spec"] = fix(m["truth"]["spec"])
    m["truth"]["fields"] = {k: fix(p) for k, p in m["truth"]["fields"].items()}
    return m


def sweep(ensemble: Path, cohort: Path, out: Path) -> pd.DataFrame:
    """``infer.py`` over ``cohort`` into ``out`` (kept if already finished); its uncertainty.csv."""
    table = out / "uncertainty.csv"
    if not table.exists():
        subprocess.run([sys.executable, str(ROOT / "infer.py"), f"run={ensemble}", "uncertainty=ensemble", "ood=true",
                        f"cohort={cohort}", f"output={out}", "progress=false"], check=True, cwd=ROOT)
    return pd.read_csv(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ensemble", type=Path, help="multirun folder whose runs are the ensemble's members")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--param", action="append", default=None, metavar="KEY=VALUE",
                    help="a scanner parameter of the re-scan (repeatable; default noise_scale=3), e.g. psf_sigma_um=8")
    ap.add_argument("--cohort", type=Path, default=ROOT / "data/phantom_benchmark/cohort.yaml")
    ap.add_argument("--preset", default="benchmark")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.cohort.is_file():
        ap.error(f"--cohort: no such file: {args.cohort} (generate it as the README's Benchmark section says)")

    ensemble, cohort = args.ensemble.resolve(), args.cohort.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    params = {}
    for item in args.param or ["noise_scale=3"]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --param takes KEY=VALUE, got {item!r}")
        params[key] = yaml.safe_load(value)
    tag = "_".join(f"{k}{v}" for k, v in params.items())
    shifted_dir = out / f"cohort_{tag}"
    if not (shifted_dir / "cohort.yaml").exists():
        generate_cohort(shifted_dir, preset=args.preset, seed=args.seed, progress=False, **params)
    original = yaml.safe_load(cohort.read_text())
    shifted = absolute(yaml.safe_load((shifted_dir / "cohort.yaml").read_text()), shifted_dir)
    trained = trained_volumes(ensemble, cohort)
    mixed = absolute(original, cohort.parent)
    images = {v["id"]: v["image"] for v in shifted["volumes"]}
    for v in mixed["volumes"]:
        if v["id"] not in trained:
            v["image"] = images[v["id"]]
    manifest = out / f"cohort_unseen_{tag}.yaml"
    manifest.write_text(yaml.safe_dump(mixed, sort_keys=False))

    same = sweep(ensemble, cohort, out / "original").set_index("volume_id")
    moved = sweep(ensemble, manifest, out / f"unseen_{tag}").set_index("volume_id")
    cols = {"mean |error|": "abs_error_mean", "mean SD": "sd_mean", "ood mean": "ood_mean", "ood > training p99": "ood_above_train_p99",
            "Spearman SD~|error|": "spearman_sd_error"}
    missing = [c for c in cols.values() if c not in same.columns]
    if missing:
        raise SystemExit(f"error: uncertainty.csv lacks {missing}; it has {list(same.columns)}")
    print(f"\nTrained on {sorted(trained)}; unseen animals re-scanned with {', '.join(f'{k}={v}' for k, v in params.items())}")
    print("| volume | trained | " + " | ".join(f"{k}: same scanner / shifted" for k in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for vid in same.index:
        row = [f"{same.loc[vid, c]:.3f} / {moved.loc[vid, c]:.3f}" for c in cols.values()]
        print(f"| {vid} | {'yes' if vid in trained else 'no'} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

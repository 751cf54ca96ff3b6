"""Command line: python -m xpression.phantom --out DIR [--preset tiny|default|large] ..."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from .errors import PhantomError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xpression.phantom",
                                description="Write a synthetic micro-CT + Visium cohort (cohort.yaml and files).")
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--preset", default="tiny", help="tiny (tests), default, benchmark (make benchmark: two animals per condition, realism options on) or large")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out after success")
    p.add_argument("--tiff", action="store_true", help="also write each volume as a BigTIFF stack")
    p.add_argument("--tomography", action="store_true",
                   help="simulate projections + filtered back projection per slice (slow beyond default)")
    p.add_argument("--volumes", type=int, help="number of volumes (conditions cycle mock, infected, vaccinated)")
    p.add_argument("--sections", type=int, dest="sections_per_volume", help="sections per volume")
    p.add_argument("--size-um", type=float, nargs=3, metavar=("Z", "Y", "X"), help="volume size in um")
    p.add_argument("--voxel-um", type=float, help="isotropic voxel size in um")
    p.add_argument("--spot-pitch-um", type=float)
    p.add_argument("--spot-diameter-um", type=float)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any preset parameter (YAML value), e.g. --param fixed_calibration=true; repeatable")
    p.add_argument("--workers", type=int, help="threads (default: up to 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    return p


def parse_params(items: list[str]) -> dict:
    """``KEY=VALUE`` strings as a dict, each value read as YAML (true, 20, [600, 2500, 2500])."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PhantomError(f"--param {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise PhantomError(f"--param {item!r}: cannot read the value ({exc.problem})") from exc
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be a positive number of threads, got {args.workers}")
    err = Console(stderr=True)
    from .cohort import generate_cohort

    try:
        params = parse_params(args.param)
        generate_cohort(
            args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite, tiff=args.tiff,
            tomography=args.tomography, progress=not args.quiet, workers=args.workers,
            volumes=args.volumes, sections_per_volume=args.sections_per_volume,
            size_um=list(args.size_um) if args.size_um else None, voxel_um=args.voxel_um,
            spot_pitch_um=args.spot_pitch_um, spot_diameter_um=args.spot_diameter_um, **params)
    except PhantomError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mix several models' whole-volume maps and score the mix against the truth.

    python -m xpression.evaluation.mix OUTPUT SOURCE_A SOURCE_B [...] [--weights 0.5 0.5] [--overwrite]
                                       [--cohort COHORT.yaml] [--no-figures]

``SOURCE_*`` are ``infer.py`` output folders (``<volume_id>/maps.ome.zarr``) swept on the same
grid (the same ``spacing_um``, of runs trained on the same sections: each sweep lays its grid
through its run's trained section of the volume), e.g. of a ``model=multiscale_cnn3d`` run and of a ``model=forest`` run (the default). ``OUTPUT`` gets the mix's maps
(:func:`xpression.inference.mix.mix_maps`: the weighted mean of the targets, the mixture's SD
where every source has SD channels, no ``ood``) and ``summary.json``. When the cohort
(``--cohort``, else the one the first source was swept over, from its ``summary.json``) has a
truth spec, the mix is scored as ``infer.py`` scores its maps (the same table printed,
``evaluation.csv``, ``uncertainty.csv`` for SD channels, and the figures unless
``--no-figures``). The baselines without CT learn from the training spots of the first source's
run (the run its ``summary.json`` records; for an ensemble's maps, its members'), and the
sections that run trained on give the ``section plane`` and ``plane`` rows, as the table's title
says; that run's held-out spot rows are left out, as they score the run, not the mix.

Bad input ends in one line, ``error: <cause>``, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from xpression.evaluation.maps import DEFAULT_DISTANCES_UM, report_map_scores
from xpression.inference.mix import MixError, mix_maps, normalised_weights
from xpression.inference.writers import read_maps

__all__ = ["mix_and_score", "main"]


def _first_summary(source: Path) -> dict | None:
    path = source / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def mix_and_score(output: str | Path, sources: Sequence[str | Path], weights: Sequence[float] | None = None,
                  overwrite: bool = False, cohort: str | Path | None = None, figures: bool = True,
                  progress: bool = True) -> dict:
    """Mix the ``sources``' maps into ``output`` (equal weights by default), score them when the
    cohort has a truth spec (see the module doc) and write ``<output>/summary.json``; returns it."""
    from xpression.data.manifest import load_manifest

    sources, output = [Path(s) for s in sources], Path(output)
    weights = normalised_weights([1.0] * len(sources) if weights is None else weights, len(sources))
    first = _first_summary(sources[0]) if sources else None
    if cohort is not None and first is None:  # before anything is written
        raise MixError(f"--cohort: scoring needs {sources[0] / 'summary.json'} (the run and the sections it trained on)")
    cohort = cohort or (first or {}).get("cohort")
    manifest = load_manifest(cohort) if cohort else None
    stores = mix_maps(sources, weights, output, overwrite=overwrite, progress=progress)
    run_dir = (first or {}).get("run_dir")
    summary: dict[str, Any] = {
        "sources": [str(s) for s in sources], "weights": weights, "run_dir": run_dir,
        "cohort": str(cohort) if cohort else None,
        "volumes": {vid: {"path": str(p), "grid": read_maps(p)[1]["grid"],
                          "section_z_um": ((first or {}).get("volumes", {}).get(vid) or {}).get("section_z_um")}
                    for vid, p in stores.items()}}
    if manifest is not None and manifest.truth is not None and manifest.truth.spec:
        known = {v.id for v in manifest.volumes}
        volumes = {vid: job for vid, job in summary["volumes"].items() if vid in known}
        if volumes:
            _, meta = read_maps(Path(sources[0]) / next(iter(volumes)) / "maps.ome.zarr")
            distances = (meta.get("infer_config") or {}).get("eval_distances_um") or DEFAULT_DISTANCES_UM
            mix = " + ".join(f"{w:.3g} x {s}" for w, s in zip(weights, sources))
            title = (f"Accuracy per volume against the phantom truth: the mix ({mix}) and baselines without CT from "
                     f"the training spots of {run_dir} (the first source's run); planes and other volumes from the "
                     "mixed maps; no held-out spot rows (they score that run, not the mix)")
            summary["evaluation"] = report_map_scores(run_dir, output, volumes, manifest, list(distances), title,
                                                      figures=figures, spots_of=meta, held_out=False)
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpression.evaluation.mix", description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="folder for the mix's maps (<volume_id>/maps.ome.zarr)")
    parser.add_argument("sources", type=Path, nargs="+", help="infer.py output folders, swept on the same grid (same spacing_um, runs trained on the same sections)")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="one positive weight per source, normalised to sum 1 (default: equal)")
    parser.add_argument("--overwrite", action="store_true", help="replace the maps already in OUTPUT")
    parser.add_argument("--cohort", type=Path, default=None,
                        help="cohort manifest to score against (default: the first source's, from its summary.json)")
    parser.add_argument("--no-figures", dest="figures", action="store_false", help="score without the figures")
    args = parser.parse_args(argv)
    from xpression.cli import input_error

    try:
        summary = mix_and_score(args.output, args.sources, args.weights, args.overwrite, args.cohort, args.figures,
                                progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        print(f"\ninterrupted: {args.output} holds a partial mix; run the command again with --overwrite", file=sys.stderr)
        return 130
    except Exception as err:
        cause = input_error(err)
        if cause is None:
            raise
        print(f"error: {' '.join(str(cause).split())}", file=sys.stderr)
        return 2
    scored = " and scored (evaluation.csv)" if "evaluation" in summary else ""
    print(f"mixed maps of {len(summary['volumes'])} volume(s) in {args.output}{scored} "
          "(<volume>/maps.ome.zarr, summary.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

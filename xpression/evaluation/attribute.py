"""Attributions of a trained run at chosen points: which CT voxels drove each predicted program.

```
python -m xpression.evaluation.attribute RUN --points POINT [POINT ...] [--volume ID] [--out DIR]
        [--methods ig occlusion] [--steps 32] [--cube-um 19.2] [--stride-um ...] [--targets NAME ...]
        [--baseline zero|mean] [--cohort cohort.yaml] [--checkpoint best]
```

A ``POINT`` is either a spot barcode of one of the run's sections (``ACGT...-1``, or
``SECTION_ID:BARCODE`` when barcodes repeat across sections), taken at the spot's registered 3D
position, or a 3D position ``z,y,x`` in um (the volume's physical frame, voxel ``i`` at
``origin + i * voxel size``) in the volume ``--volume`` (default: the volume of the run's first
trained section). The patch the network sees there (normalised as in training and in the sweep)
is attributed with integrated gradients (``ig``: baseline ``zero``, the normalised value of air,
or the patch ``mean``; ``--steps`` midpoints on the path) and occlusion (a cube of ``--cube-um``
um slid by ``--stride-um``, default the cube, filled with the baseline).

A multi-scale model (patch and context view) is attributed one view at a time, the other held
as it is: the patch's voxels (``f(patch, view) - f(baseline, view)``) and the context view's
(``f(patch, view) - f(patch, baseline)``), the view read as the sweep reads it.

Writes, per point and method, ``<out>/<point>_<method>.png`` (the patch's slices, CT in grey with
the attribution overlaid, one row per program, labelled colour bars, a scale bar in um; for a
multi-scale model also ``<point>_<method>_context.png``, the context view's),
``<out>/<point>.npz`` (patch, baseline, attributions; ``context`` and ``context_<method>``) and
``<out>/attributions.csv`` (per point, view, method and program: f(x), f(baseline), the
attributions' sum and, for ig, the completeness gap).
Default ``--out``: ``RUN/attributions``; existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from xpression.evaluation.attribution import Attribution, integrated_gradients, occlusion

__all__ = ["AttributionPoint", "parse_point", "resolve_points", "read_patch", "attribute_points", "plot_attribution", "main"]

log = logging.getLogger(__name__)

METHODS = {"ig": "integrated gradients", "occlusion": "occlusion"}
_POSITION = re.compile(r"^\s*(-?[\d.eE+-]+)\s*,\s*(-?[\d.eE+-]+)\s*,\s*(-?[\d.eE+-]+)\s*$")


class AttributionError(ValueError):
    """A point or option that cannot be attributed; raised before any network compute."""


@dataclass
class AttributionPoint:
    """``label``: file-name-safe name; ``volume_id``; ``position_um`` (z, y, x)."""

    label: str
    volume_id: str
    position_um: np.ndarray
    spot: str | None = None


def parse_point(token: str) -> tuple[float, float, float] | str:
    """A ``z,y,x`` um position as 3 floats, else the token as a spot barcode."""
    m = _POSITION.match(token)
    if m:
        try:
            return tuple(float(v) for v in m.groups())  # type: ignore[return-value]
        except ValueError:
            pass
    return token.strip()


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def resolve_points(tokens: Sequence[str], cohort: Any, trained: Sequence[str] | None, volume_id: str | None) -> list[AttributionPoint]:
    """Every token as a point in a volume of ``cohort``; spot barcodes are looked up in the
    sections ``trained`` (default: all) and placed at their registered 3D position."""
    from xpression.data.sections import load_section
    from xpression.data.volume import open_volume

    sections = [s for s in cohort.sections if trained is None or s.id in set(trained)] or list(cohort.sections)
    default_volume = volume_id or (sections[0].volume_id if sections else cohort.volumes[0].id)
    if volume_id is not None and volume_id not in [v.id for v in cohort.volumes]:
        raise AttributionError(f"--volume {volume_id!r} is not in {cohort.path}; volumes: {[v.id for v in cohort.volumes]}")
    loaded: dict[str, Any] = {}
    points = []
    for token in tokens:
        parsed = parse_point(token)
        if isinstance(parsed, tuple):
            label = f"{default_volume}_z{parsed[0]:g}_y{parsed[1]:g}_x{parsed[2]:g}"
            points.append(AttributionPoint(_safe(label), default_volume, np.asarray(parsed, float)))
            continue
        section_id, _, barcode = parsed.rpartition(":")
        candidates = [s for s in sections if not section_id or s.id == section_id]
        if section_id and not candidates:
            raise AttributionError(f"point {token!r}: no section {section_id!r} among {[s.id for s in sections]}")
        hits = []
        for entry in candidates:
            if entry.id not in loaded:
                volume = cohort.volume(entry.volume_id)
                voxel = open_volume(volume.image, volume.voxel_size_um).voxel_size_um  # landmarks in px need it
                loaded[entry.id] = load_section(entry, voxel_size_um=voxel)
            sec = loaded[entry.id]
            where = np.flatnonzero(sec.barcodes == barcode)
            hits += [(sec, int(i)) for i in where]
        if not hits:
            raise AttributionError(f"point {token!r} is neither a position z,y,x in um nor a spot barcode of the "
                                   f"sections {[s.id for s in candidates]}")
        if len(hits) > 1:
            raise AttributionError(f"spot {barcode!r} is in several sections ({[s.id for s, _ in hits]}); "
                                   "write SECTION_ID:BARCODE")
        sec, i = hits[0]
        points.append(AttributionPoint(_safe(f"{sec.id}_{barcode}"), sec.volume_id, np.asarray(sec.points_um[i], float), barcode))
    return points


def read_patch(volume: Any, position_um: np.ndarray, patch_shape: Sequence[int], normalize: Any,
               label: str = "point") -> tuple[np.ndarray, np.ndarray]:
    """The normalised ``(D, H, W)`` patch centred on the voxel nearest ``position_um`` and that
    voxel's index; raises :class:`AttributionError` when the patch reaches outside the volume."""
    vs = np.asarray(volume.voxel_size_um, float)
    origin = np.asarray(getattr(volume, "origin_um", (0.0, 0.0, 0.0)), float)
    centre = np.rint((np.asarray(position_um, float) - origin) / vs).astype(int)
    half = np.asarray(patch_shape, int) // 2
    lo, hi = centre - half, centre - half + np.asarray(patch_shape, int)
    if np.any(lo < 0) or np.any(hi > np.asarray(volume.shape)):
        raise AttributionError(f"{label}: the {tuple(int(p) for p in patch_shape)}-voxel patch at "
                               f"{np.round(position_um, 1).tolist()} um reaches outside the volume "
                               f"({list(volume.shape)} voxels of {vs.tolist()} um)")
    raw = np.asarray(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    return np.asarray(normalize(raw), np.float32), centre


def _baseline(patch: np.ndarray, kind: str) -> np.ndarray:
    if kind == "zero":  # the robust normaliser maps air (its low percentile) to 0
        return np.zeros_like(patch)
    if kind == "mean":
        return np.full_like(patch, float(patch.mean()))
    raise AttributionError(f"--baseline must be 'zero' or 'mean', got {kind!r}")


def attribute_points(fn: Any, patches: dict[str, np.ndarray], methods: Sequence[str], steps: int,
                     cube_vox: Sequence[int], stride_vox: Sequence[int] | None, targets: Sequence[int] | None,
                     baseline: str = "zero", progress: Callable[[str], None] | None = None
                     ) -> dict[str, dict[str, Attribution]]:
    """``{point label: {method: Attribution}}`` for the normalised ``patches``; ``fn`` is one
    network for every patch, or ``{label: network}``. ``progress`` gets one line as each point and
    method starts, with the seconds so far (a forest's occlusion takes seconds a point)."""
    out: dict[str, dict[str, Attribution]] = {}
    chosen = [m for m in ("ig", "occlusion") if m in methods]
    total, done, t0 = len(patches) * len(chosen), 0, time.perf_counter()
    for label, patch in patches.items():
        net = fn[label] if isinstance(fn, dict) else fn
        base = _baseline(patch, baseline)
        out[label] = {}
        for method in chosen:
            done += 1
            if progress is not None:
                progress(f"attributing {label}: {method} ({done} of {total}, {time.perf_counter() - t0:.0f} s so far)")
            out[label][method] = (integrated_gradients(net, patch, base, steps=steps, targets=targets) if method == "ig" else
                                  occlusion(net, patch, base, cube_vox, stride_vox, targets=targets))
    return out


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def with_view_fixed(net: Any, fixed: np.ndarray, channel: int) -> Any:
    """A multi-scale ``net`` as a single-view network of the other view: ``(B, 1, D, H, W)`` ->
    ``(B, T)`` with ``fixed`` (``(D, H, W)``) as its input channel ``channel`` (0 the patch, 1
    the context view)."""
    import torch

    held = torch.as_tensor(np.asarray(fixed, np.float32))[None, None]

    def fn(x: Any) -> Any:
        other = held.expand(x.shape[0], -1, -1, -1, -1)
        return net(torch.cat([x, other] if channel == 1 else [other, x], dim=1))

    return fn


def read_context_view(context: Any, centre: np.ndarray) -> np.ndarray:
    """The normalised context view centred on model voxel ``centre`` (z, y, x), read as the
    sweep reads it (``context``: the sweep's :class:`~xpression.inference.sweep.ContextSource`)."""
    view, span = context.view, np.asarray(context.view.span_shape)
    lo = np.asarray(centre, int) - span // 2
    block = np.asarray(context.normalize(context.volume.read_block(tuple(lo), tuple(lo + span), fill=0)), np.float32)
    return np.ascontiguousarray(view.window(block, span // 2))


def _slices(depth: int, n: int = 7) -> list[int]:
    return list(range(depth)) if depth <= n else sorted(set(np.linspace(0, depth - 1, n).round().astype(int).tolist()))


def plot_attribution(patch: np.ndarray, attribution: Attribution, names: Sequence[str], voxel_size_um: Sequence[float],
                     out: str | Path, title: str = "", value_label: str = "program proportion") -> Path:
    """The patch's slices (columns) with the CT on top and, below, one row per program: the CT in
    grey with the attribution overlaid (red raises the program, blue lowers it; opacity grows
    with magnitude), a colour bar per row and a scale bar in um."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from xpression.plotting import add_scale_bar, new_figure, save_figure

    depth, h, w = patch.shape
    cols = _slices(depth)
    vs = np.asarray(voxel_size_um, float)
    extent = (-w * vs[2] / 2, w * vs[2] / 2, h * vs[1] / 2, -h * vs[1] / 2)
    rows = 1 + len(names)
    fig, axes = new_figure(rows, len(cols), figsize=(1.55 * len(cols) + 1.6, 1.5 * rows + 0.5), squeeze=False)
    centre = depth // 2
    lo, hi = np.percentile(patch, [1, 99]) if patch.max() > patch.min() else (0.0, 1.0)
    for j, z in enumerate(cols):
        dz = (z - centre) * vs[0]
        ax = axes[0, j]
        ax.imshow(patch[z], cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
        ax.set_title(f"z {dz:+.1f} µm", fontsize=7)
    ct_bar = ScalarMappable(Normalize(lo, hi), "gray")
    fig.colorbar(ct_bar, ax=list(axes[0]), shrink=0.85, pad=0.01).set_label("CT (normalised)", fontsize=6)
    method = METHODS.get(attribution.method.split("_")[0], attribution.method.replace("_", " "))
    for i, name in enumerate(names):
        values = attribution.values[i]
        vmax = float(np.abs(values).max()) or 1.0
        norm = Normalize(-vmax, vmax)
        for j, z in enumerate(cols):
            ax = axes[1 + i, j]
            ax.imshow(patch[z], cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
            alpha = np.clip(np.abs(values[z]) / vmax, 0.0, 1.0) ** 0.6
            ax.imshow(values[z], cmap="RdBu_r", norm=norm, alpha=alpha, extent=extent, interpolation="nearest")
        axes[1 + i, 0].set_ylabel(f"{name}\nf = {attribution.output[i]:.3f}", fontsize=7)
        bar = fig.colorbar(ScalarMappable(norm, "RdBu_r"), ax=list(axes[1 + i]), shrink=0.85, pad=0.01)
        # occlusion: f(x) - f(x occluded), what the voxels' cubes add; ig: each voxel's share of f(x) - f(baseline)
        label = f"{value_label} lost\nwhen occluded" if attribution.method == "occlusion" else f"Δ {value_label}\nper voxel"
        bar.set_label(label, fontsize=6)
        bar.ax.tick_params(labelsize=5)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.plot([0], [0], marker="+", color="yellow", markersize=5, markeredgewidth=0.8)
    add_scale_bar(axes[0, 0], w * vs[2])
    fig.suptitle(f"{title}\n{method}: which voxels raised (red) or lowered (blue) each program", fontsize=8)
    return save_figure(fig, out, dpi=130)


def _summary_rows(label: str, point: AttributionPoint, result: dict[str, Attribution], names: Sequence[str],
                  view: str = "patch") -> list[dict]:
    rows = []
    for method, att in result.items():
        for i, name in enumerate(names):
            rows.append({"point": label, "spot": point.spot, "volume_id": point.volume_id, "view": view,
                         "z_um": point.position_um[0], "y_um": point.position_um[1], "x_um": point.position_um[2],
                         "method": method, "target": name, "f_x": float(att.output[i]), "f_baseline": float(att.baseline_output[i]),
                         "sum_attributions": float(att.values[i].sum()),
                         "completeness_gap": None if att.delta is None else float(att.delta[i])})
    return rows


def _methods_for(net: Any, methods: Sequence[str] | None) -> list[str]:
    """The methods asked for, or by default ``ig`` and ``occlusion``; a model without gradients
    (the closed-form ``forest`` and ``ridge``: trees and hand-made statistics) takes occlusion only."""
    from xpression.models.closed_form import ClosedFormModel

    differentiable = not isinstance(net, ClosedFormModel)
    if methods is None:
        return ["ig", "occlusion"] if differentiable else ["occlusion"]
    if "ig" in methods and not differentiable:
        raise AttributionError(f"--methods ig: {type(net).__name__} has no gradients (it is fitted, not trained); "
                               "use --methods occlusion")
    return list(methods)


def run(args: argparse.Namespace) -> Path:
    """The whole command: check everything, then attribute and write (returns the output folder)."""
    import pandas as pd
    from omegaconf import OmegaConf

    from xpression.data.manifest import load_manifest
    from xpression.inference.pipeline import _prepare, plan_jobs  # the sweep's own volume opening and patch path
    from xpression.inference.runs import load_predictor, resolve_run

    unknown = [m for m in args.methods or [] if m not in METHODS]
    if unknown:
        raise AttributionError(f"--methods: {unknown} not among {list(METHODS)}")
    if args.steps < 1 or args.cube_um <= 0 or (args.stride_um is not None and args.stride_um <= 0):
        raise AttributionError("--steps must be >= 1, --cube-um and --stride-um positive")
    info = resolve_run(args.run, args.checkpoint)
    multiscale = info.spec.context is not None
    out = Path(args.out) if args.out else info.run_dir / "attributions"
    manifest = args.cohort or info.manifest
    if not manifest:
        raise AttributionError(f"run {info.run_dir} records no cohort; give --cohort cohort.yaml")
    cohort = load_manifest(manifest)
    points = resolve_points(args.points, cohort, info.trained_sections, args.volume)
    pred = load_predictor(info, "cpu", "fp32")
    args.methods = _methods_for(pred.net, args.methods)
    names = list(pred.target_names or [])
    kind = info.spec.targets.get("kind") or "composition"
    if args.targets:
        missing = [t for t in args.targets if t not in names]
        if missing:
            raise AttributionError(f"--targets {missing} not among the run's targets {names}")
    chosen = [names.index(t) for t in args.targets] if args.targets else list(range(len(names)))
    taken = [p for p in [out / "attributions.csv"] + [out / f"{pt.label}_{m}{v}.png" for pt in points for m in args.methods
                                                      for v in ("", "_context")] if p.exists()]
    if taken:
        raise AttributionError(f"{taken[0]} exists; choose another --out (nothing is overwritten)")
    patches, voxel, contexts = {}, {}, {}
    volumes: dict[str, Any] = {}
    for pt in points:
        if pt.volume_id not in volumes:
            cfg = OmegaConf.create({"output": str(out), "volume": None, "cohort": str(cohort.path), "volumes": [pt.volume_id],
                                    "resample": True})
            (job,), _ = plan_jobs(cfg, info)
            _prepare(job, info)
            volumes[pt.volume_id] = (job.volume, job.normalize, job.context)
        volume, normalize, context = volumes[pt.volume_id]
        patches[pt.label], centre = read_patch(volume, pt.position_um, pred.patch_shape, normalize, f"point {pt.label}")
        voxel[pt.label] = tuple(float(v) for v in volume.voxel_size_um)
        if multiscale:
            contexts[pt.label] = read_context_view(context, centre)
    vs = np.asarray(next(iter(voxel.values())), float)
    cube = np.maximum(1, np.rint(args.cube_um / vs)).astype(int)
    stride = None if args.stride_um is None else np.maximum(1, np.rint(args.stride_um / vs)).astype(int)
    net = pred.net
    if not multiscale:
        results = attribute_points(net, patches, args.methods, args.steps, cube, stride, chosen, args.baseline, _say)
        context_results: dict[str, dict[str, Attribution]] = {}
    else:  # one view at a time, the other held as it is
        step = np.asarray(info.spec.context.step_um, float)
        results = attribute_points({k: with_view_fixed(net, contexts[k], 1) for k in patches}, patches, args.methods,
                                   args.steps, cube, stride, chosen, args.baseline, lambda line: _say(line + ", the patch"))
        context_results = attribute_points(
            {k: with_view_fixed(net, patches[k], 0) for k in patches}, contexts, args.methods, args.steps,
            np.maximum(1, np.rint(args.cube_um / step)).astype(int),
            None if args.stride_um is None else np.maximum(1, np.rint(args.stride_um / step)).astype(int), chosen, args.baseline,
            lambda line: _say(line + ", the context view"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    value_label = "program proportion" if kind == "composition" else "predicted value"
    for pt in points:
        result = results[pt.label]
        sel = [names[i] for i in chosen]
        where = f"spot {pt.spot}" if pt.spot else "point"
        for method, att in result.items():
            title = (f"{pt.volume_id}, {where} at z {pt.position_um[0]:.0f}, y {pt.position_um[1]:.0f}, "
                     f"x {pt.position_um[2]:.0f} µm")
            if method == "occlusion":
                title += f" (cube {' x '.join(f'{c * v:g}' for c, v in zip(cube, vs))} µm)"
            plot_attribution(patches[pt.label], att, sel, voxel[pt.label], out / f"{pt.label}_{method}.png",
                             title + (" — the patch, its context view held" if multiscale else ""), value_label)
        extra: dict[str, Any] = {}
        if multiscale:
            step_um = tuple(float(v) for v in info.spec.context.step_um)
            for method, att in context_results[pt.label].items():
                plot_attribution(contexts[pt.label], att, sel, step_um, out / f"{pt.label}_{method}_context.png",
                                 f"{pt.volume_id}, {where}: the context view (every {list(info.spec.context.stride)} voxels), "
                                 "the patch held", value_label)
            extra = {"context": contexts[pt.label], "context_step_um": np.asarray(step_um),
                     **{f"context_{m}": a.values for m, a in context_results[pt.label].items()}}
            rows += _summary_rows(pt.label, pt, context_results[pt.label], sel, view="context")
        np.savez_compressed(out / f"{pt.label}.npz", patch=patches[pt.label], baseline=_baseline(patches[pt.label], args.baseline),
                            targets=np.asarray(sel), voxel_size_um=np.asarray(voxel[pt.label]), position_um=pt.position_um,
                            **{m: a.values for m, a in result.items()}, **extra)
        rows += _summary_rows(pt.label, pt, result, sel)
    pd.DataFrame(rows).to_csv(out / "attributions.csv", index=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpression.evaluation.attribute", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a train.py run folder (or a checkpoint in one)")
    parser.add_argument("--points", nargs="+", required=True,
                        help="spot barcodes (or SECTION_ID:BARCODE) and/or 3D positions z,y,x in um")
    parser.add_argument("--volume", default=None, help="volume id of the z,y,x positions (default: the first trained section's)")
    parser.add_argument("--out", default=None, help="output folder (default RUN/attributions)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="ig and/or occlusion (default: both; occlusion alone for model=forest or ridge)")
    parser.add_argument("--steps", type=int, default=32, help="integrated gradients: midpoints on the path")
    parser.add_argument("--cube-um", type=float, default=19.2, help="occlusion cube edge (um; rounded to voxels per axis)")
    parser.add_argument("--stride-um", type=float, default=None, help="occlusion stride (um; default: the cube)")
    parser.add_argument("--targets", nargs="+", default=None, help="program names to attribute (default: all)")
    parser.add_argument("--baseline", default="zero", help="zero (air after normalisation) or mean (the patch mean)")
    parser.add_argument("--cohort", default=None, help="cohort manifest (default: the run's)")
    parser.add_argument("--checkpoint", default="best", help="best, last or a file under checkpoints/")
    args = parser.parse_args(argv)
    from xpression.cli import input_error
    from xpression.plotting import file_in_the_way

    blocker = None if args.out is None else file_in_the_way(args.out)
    if blocker is not None:
        print(f"error: --out {args.out}: {blocker} is a file; give a folder for the attributions", file=sys.stderr)
        return 1
    try:
        out = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted before anything was written; run the command again", file=sys.stderr)
        return 130
    except Exception as err:
        cause = err if isinstance(err, AttributionError) else input_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 1
    print(f"attributions: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

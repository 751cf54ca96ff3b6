"""generate_cohort: write a complete synthetic cohort (manifest, volumes, sections, truth)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from .ct import render_region, render_tomography_slab
from .errors import PhantomError
from .phantom import Phantom
from .presets import resolve_params
from .spec import build_spec, rng_for
from .visium import simulate_section, write_landmarks
from .writers import chunk_grid, create_volume, downsample_level, write_h5ad, write_manifest, write_program_field, write_tiff

TAG_VISIUM = 5


def _bounded_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """Like Executor.map but unordered with at most 2 x workers results in flight."""
    items = iter(items)
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = set()
        for item in items:
            pending.add(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        for f in pending:
            yield f.result()


def _check_target(out: Path, overwrite: bool) -> list[Path]:
    """Validate the output location; create missing parents and return those created."""
    if out.exists() and not out.is_dir():
        raise PhantomError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PhantomError(f"output folder {out} is not empty; pass --overwrite to replace it")
    anc = out.parent
    missing = []
    while not anc.exists():
        missing.append(anc)
        anc = anc.parent
    if not anc.is_dir():
        raise PhantomError(f"cannot create {out}: {anc} is not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PhantomError(f"cannot write to {anc} (permission denied)")
    try:
        for p in reversed(missing):
            p.mkdir()
    except OSError as exc:
        raise PhantomError(f"cannot create {out.parent}: {exc.strerror or exc}") from exc
    return missing


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished cohort into place; an old folder is removed only after the move. The
    private temporary folder (mode 0700) gets the mode a new folder would (0777 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "cohort")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def generate_cohort(out: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False,
                    tiff: bool = False, tomography: bool = False, progress: bool = True,
                    workers: int | None = None, console: Console | None = None,
                    **overrides: Any) -> Path:
    """Write a synthetic cohort to `out` and return the path of its cohort.yaml.

    overrides: any preset parameter (see presets.py), e.g. volumes=4, size_um=[z, y, x],
    voxel_um=6.4, sections_per_volume=2, spot_pitch_um=100. Sizes are in um.
    Raises PhantomError for bad parameters or output locations; on any failure nothing
    is left at `out` (an existing cohort there is kept).
    """
    t0 = time.perf_counter()
    params = resolve_params(preset, **overrides)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PhantomError(f"seed must be a non-negative integer, got {seed!r}")
    workers = int(workers or min(2, os.cpu_count() or 1))
    console = console or Console()
    out = Path(out).expanduser().absolute()
    created = _check_target(out, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise PhantomError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
    try:
        summary = _build(tmp, params, int(seed), preset, tiff, tomography, progress, workers, console)
        _commit(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:
            shutil.rmtree(p, ignore_errors=True) if not any(p.iterdir()) else None
        if isinstance(exc, OSError):
            raise PhantomError(f"failed writing the cohort under {out.parent}: {exc}") from exc
        raise
    if progress:
        _print_summary(console, out, summary, time.perf_counter() - t0)
    return out / "cohort.yaml"


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, disable=not enabled, transient=False)


def _build(root: Path, params: dict[str, Any], seed: int, preset: str, tiff: bool, tomography: bool,
           progress: bool, workers: int, console: Console) -> dict[str, Any]:
    ph = Phantom(build_spec(params, seed, preset))
    spec = ph.spec
    for sub in ("volumes", "sections", "truth"):
        (root / sub).mkdir()
    chunk = params["chunk"]
    manifest_vols, fields, rows = [], {}, []
    with _progress(console, progress) as bar:
        for vol in spec["volumes"]:
            vid, shape, vox = vol["id"], tuple(vol["shape"]), vol["voxel_size_um"]
            zpath = root / "volumes" / f"{vid}.ome.zarr"
            group, levels = create_volume(zpath, vid, shape, vox, chunk)
            arr0 = group["0"]
            if tomography:
                slabs = [(z0, min(z0 + chunk, shape[0])) for z0 in range(0, shape[0], chunk)]
                task = bar.add_task(f"{vid}: CT (tomography)", total=shape[0])

                def tomo(zr, vid=vid):
                    return zr, render_tomography_slab(ph, vid, zr)

                for (z0, z1), data in _bounded_map(tomo, slabs, workers):
                    arr0[z0:z1] = data
                    bar.advance(task, z1 - z0)
            else:
                grid = chunk_grid(shape, chunk)
                task = bar.add_task(f"{vid}: CT chunks", total=len(grid))

                def one(idx, vid=vid, shape=shape):
                    rg = [(i * chunk, min((i + 1) * chunk, n)) for i, n in zip(idx, shape)]
                    return rg, render_region(ph, vid, *rg)

                for rg, data in _bounded_map(one, grid, workers):
                    arr0[tuple(slice(a, b) for a, b in rg)] = data
                    bar.advance(task)
            task = bar.add_task(f"{vid}: pyramid", total=levels - 1)
            for lv in range(1, levels):
                downsample_level(group, lv, chunk, lambda f, it: _bounded_map(f, it, workers))
                bar.advance(task)
            if tiff:
                write_tiff(root / "volumes" / f"{vid}.tif", arr0, vox)

            task = bar.add_task(f"{vid}: truth + sections", total=1 + len(vol["sections"]))
            fpath = root / "truth" / f"{vid}_programs.ome.zarr"
            write_program_field(fpath, vid, program_field(ph, vid, params["truth_spacing_um"]),
                                params["truth_spacing_um"], ph.program_names)
            fields[vid] = f"truth/{fpath.name}"
            bar.advance(task)
            sections = []
            for k, sec in enumerate(vol["sections"]):
                res = simulate_section(ph, vid, sec, rng_for(seed, vol["index"], TAG_VISIUM, k))
                write_h5ad(res.adata, root / "sections" / f"{sec['id']}.h5ad")
                write_landmarks(root / "sections" / f"{sec['id']}_landmarks.csv", res.landmarks)
                listed = {"id": sec["id"], "adata": f"sections/{sec['id']}.h5ad",
                         "landmarks": f"sections/{sec['id']}_landmarks.csv", "z_um": sec.get("z_recorded_um", sec["z_um"])}
                if params["spot_pitch_um"] != 100.0:  # the manifest's default is Visium's pitch
                    listed["spot_pitch_um"] = params["spot_pitch_um"]
                sections.append(listed)
                rows.append((vid, sec["id"], res.adata.n_obs))
                bar.advance(task)
            entry = {"id": vid, "image": f"volumes/{vid}.ome.zarr", "voxel_size_um": list(vox),
                     "condition": vol["condition"], "sections": sections}
            manifest_vols.append(entry)
    ph.to_json(root / "truth" / "phantom.json")
    write_manifest(root / "cohort.yaml", {
        "name": spec["name"],
        "volumes": manifest_vols,
        "truth": {"spec": "truth/phantom.json", "programs": ph.program_names, "fields": fields},
    })
    return {"phantom": ph, "spots": rows, "tiff": tiff, "tomography": tomography}


def program_field(ph: Phantom, vid: str, spacing_um: float, slab: int = 8) -> np.ndarray:
    """True programs (P, z, y, x) float32 on a grid of spacing_um covering the volume."""
    vol = ph.volume(vid)
    ext = [(n - 1) * v for n, v in zip(vol["shape"], vol["voxel_size_um"])]
    axes = [np.arange(int(e // spacing_um) + 1) * spacing_um for e in ext]
    field = np.empty((len(ph.program_names),) + tuple(len(a) for a in axes), np.float32)
    yy, xx = np.meshgrid(axes[1], axes[2], indexing="ij")
    for z0 in range(0, len(axes[0]), slab):
        zs = axes[0][z0:z0 + slab]
        pts = np.column_stack([np.repeat(zs, yy.size), np.tile(yy.ravel(), len(zs)), np.tile(xx.ravel(), len(zs))])
        progs = ph.programs_at(vid, pts)
        field[:, z0:z0 + len(zs)] = progs.T.reshape(-1, len(zs), *yy.shape)
    return field


def _print_summary(console: Console, out: Path, summary: dict[str, Any], seconds: float) -> None:
    ph: Phantom = summary["phantom"]
    spots: dict[str, list[str]] = {}
    for vid, _, n in summary["spots"]:
        spots.setdefault(vid, []).append(str(n))
    vox = ph.spec["params"]["voxel_um"]
    table = Table(title=f"{ph.spec['name']} (seed {ph.spec['seed']}), voxel {vox:g} um")
    for col in ("volume", "condition", "voxels zyx", "mm zyx", "lesions", "spots"):
        table.add_column(col, overflow="fold")
    for vol in ph.spec["volumes"]:
        size = [(n * v) / 1000 for n, v in zip(vol["shape"], vol["voxel_size_um"])]
        table.add_row(vol["id"], vol["condition"], "x".join(map(str, vol["shape"])),
                      "x".join(f"{s:.3g}" for s in size),
                      str(len(vol["lesions"])), ", ".join(spots.get(vol["id"], [])))
    console.print(table)
    extra = [k for k in ("tiff", "tomography") if summary[k]]
    console.print(f"programs: {', '.join(ph.program_names)}; genes: {len(ph.spec['expression']['genes'])}"
                  + (f"; {', '.join(extra)}" if extra else ""))
    console.print(f"manifest: {out / 'cohort.yaml'}  time: {seconds:.1f} s")

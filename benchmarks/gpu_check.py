"""Every GPU figure of the project in one run: the sweep, the training loop, the loader.

    benchmarks/gpu_check.sh [--cpu-smoke]        (installs the carried wheels, then runs this)
    python benchmarks/gpu_check.py --out DIR [--cpu-smoke] [--budget-s 300] [--cohort COHORT.yaml]

Stages, each in its own process with its own time limit (a failure or a time-out costs that
stage only), within one overall budget; a stage that would start with too little time left is
skipped. Output of every stage goes to ``DIR/gpu_check.txt`` as it comes; the figures to
``DIR/gpu_check.json`` after every stage; one table is printed last.

1. ``volume``: a 336 x 2048 x 2048 uint8 OME-Zarr (1.4 GB; 1.6 um voxels, 64^3 chunks, zstd;
   a random texture, not zeros) written with the project's writer, several slabs at once.
2. ``sweep``: ``benchmarks/sweep.py --model published`` over it on the GPU: end to end
   (read, normalise, network, store) against the bare trunk, dense vs patch, a kernel profile.
3. ``cohort``: the tiny phantom, 256 x 1600 x 1600 um (6.4 um voxels), for the training stages.
4. ``train_cnn3d_paper``, ``train_timm_resnet18``, ``loader``: ``benchmarks/train_speed.py``
   (with the phases of a step) and ``benchmarks/loader.py`` (with where a batch's time goes) at
   1.6 um (21 x 129 x 129 patches), batch 32; ``post_fit``: ``benchmarks/post_fit.py``, the
   scoring after a fit without the model, in parts (CPU work, on this machine's CPUs).
5. ``sweep_compile``: the sweep with ``torch.compile``, only if time is left.

``--cpu-smoke`` runs every stage tiny on the CPU (6.4 um voxels, the small ``cnn3d``), so
tests prove the stages' Python works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def make_volume(path: Path, shape: tuple[int, int, int], voxel_um: float, chunk: int = 64, seed: int = 0) -> dict:
    """A uint8 OME-Zarr of ``shape`` with a random texture, written slab by slab on threads."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from xpression.data.omezarr import OmeZarrWriter

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=shape[1:], dtype=np.uint8) // 2
    noise = rng.integers(0, 96, size=(8,) + tuple(shape[1:]), dtype=np.uint8)
    writer = OmeZarrWriter(path, shape, np.uint8, voxel_um, chunk=(chunk,) * 3, levels=1, overwrite=True, name="gpu_check")

    def write(z0z1: tuple[int, int]) -> None:
        z0, z1 = z0z1
        slab = np.empty((z1 - z0,) + tuple(shape[1:]), np.uint8)
        for z in range(z0, z1):
            np.add(np.roll(base, 3 * z, axis=1), noise[z % 8], out=slab[z - z0])
        writer.write_slab(z0, slab)

    with ThreadPoolExecutor(min(8, len(writer.slabs()))) as pool:
        list(pool.map(write, writer.slabs()))
    sec = time.perf_counter() - t0
    voxels = int(np.prod(shape))
    return {"shape": list(shape), "voxel_um": voxel_um, "chunk": chunk, "seconds": sec, "mvox_s": voxels / sec / 1e6,
            "bytes_on_disk": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}


class Stages:
    """Runs stages as subprocesses under one budget, logging as they go."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.deadline = out, time.monotonic() + budget_s
        self.log = out / "gpu_check.txt"
        self.results: dict = {"stages": {}}
        self.json_dir = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def say(self, text: str, echo: bool = True) -> None:
        with open(self.log, "a") as fh:
            fh.write(text + "\n")
        if echo:
            print(text, flush=True)

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], limit_s: float, need_s: float = 20.0) -> dict | None:
        """Run ``cmd``; its ``--json`` (if it takes one, as ``{json}``) is returned."""
        left = self.left()
        if left < need_s:
            self.results["stages"][name] = {"status": f"skipped ({left:.0f} s left)"}
            self.say(f"== {name}: skipped, {left:.0f} s of the budget left")
            self.save()
            return None
        limit = min(limit_s, left)
        jpath = self.json_dir / f"{name}.json"
        cmd = [str(c).replace("{json}", str(jpath)) for c in cmd]
        self.say(f"== {name} (limit {limit:.0f} s): {' '.join(cmd)}")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=os.environ.copy())

        def pump() -> None:
            with open(self.log, "a") as fh:
                for line in proc.stdout:  # type: ignore[union-attr]
                    fh.write(line)
                    fh.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=limit)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
            for sig in (signal.SIGTERM, signal.SIGKILL):  # the stage and its children (loader workers)
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        reader.join(timeout=5)
        sec = time.monotonic() - t0
        figures = json.loads(jpath.read_text()) if jpath.exists() else None
        self.results["stages"][name] = {"status": status, "seconds": round(sec, 1)}
        if figures is not None:
            self.results[name] = figures
        self.save()
        self.say(f"== {name}: {status} in {sec:.1f} s")
        if status != "ok":
            tail = self.log.read_text().splitlines()[-15:]
            print("\n".join("   | " + t for t in tail), flush=True)
        return figures


def environment(smoke: bool) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cpus": os.cpu_count(), "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
        for q in (["-L"], ["--query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu",
                          "--format=csv"]):
            try:
                env["nvidia-smi " + q[0]] = subprocess.run(["nvidia-smi", *q], capture_output=True, text=True, timeout=20).stdout.strip()
            except (OSError, subprocess.TimeoutExpired) as exc:
                env["nvidia-smi " + q[0]] = f"unavailable: {exc}"
    elif not smoke:
        env["warning"] = "no CUDA device: the GPU stages will fail; use --cpu-smoke on a CPU"
    return env


def _fmt(v, spec: str = ".1f", unit: str = "") -> str:
    try:
        return f"{v:{spec}}{unit}"
    except (TypeError, ValueError):
        return "-"


def table(res: dict) -> str:
    """The summary: one row per figure, '-' where a stage did not deliver."""
    g = lambda *keys: _get(res, *keys)  # noqa: E731
    rows = [("device", f"{g('env', 'gpu') or 'CPU'} ({g('env', 'gpu_memory_gib') or '-'} GiB), torch {g('env', 'torch')}, "
                       f"CUDA {g('env', 'cuda')}, cuDNN {g('env', 'cudnn')}, {g('env', 'cpus')} CPUs")]
    v = res.get("volume") or {}
    rows.append(("volume written (uint8 OME-Zarr)", f"{tuple(v.get('shape', ())) or '-'} in {_fmt(v.get('seconds'))} s "
                                                     f"({_fmt(v.get('mvox_s'), '.0f')} MVoxel/s)"))
    s = res.get("sweep") or {}
    t = g("sweep", "e2e", "timed") or {}
    rows += [
        ("sweep: tiles", f"{tuple(s.get('tile_vox', ())) or '-'} voxels, {s.get('tiles_tissue', '-')} tiles, {s.get('precision', '-')}, "
                         f"cuDNN autotune {'on' if s.get('cudnn_benchmark') else 'off'}"),
        ("sweep end to end, MVoxel/s (whole run | steady)", f"{_fmt(t.get('mvox_s'))} | {_fmt(t.get('mvox_s_steady'))}"),
        ("sweep grid points/s", _fmt(t.get("points_s"), ".0f")),
        ("reading alone, MVoxel/s", f"{_fmt(g('sweep', 'read_only', 'mvox_s'))} ({g('sweep', 'read_only', 'readers') or '-'} threads)"),
        ("reading steps, MVoxel/s: files | decoding | pageable | pinned",
         " | ".join(_fmt(g("sweep", "read_parts", k + "_mvox_s")) for k in ("files", "decode", "pageable", "pinned"))
         + f" ({_fmt(g('sweep', 'read_parts', 'files_mb_s'), '.0f')} MB/s of files)"),
        ("bare trunk MVoxel/s (cuDNN autotune off | on)", f"{_fmt(g('sweep', 'bare_cudnn_benchmark_off', 'mvox_s'))} | "
                                                         f"{_fmt(g('sweep', 'bare_cudnn_benchmark_on', 'mvox_s'))}"
                                                         if "bare_cudnn_benchmark_on" in s else _fmt(g("sweep", "bare", "mvox_s"))),
        ("bare trunk, cuDNN's 3D kernels only, MVoxel/s", _fmt(g("sweep", "bare_depth_fold_off", "mvox_s"))),
        ("conv ways, ms (3d/depth[/depth+x/depth+x8]) -> chosen", "; ".join(
            f"{'x'.join(map(str, c['weight'][:2]))}: " + "/".join(f"{t:.1f}" for t in _ways_ms(c).values())
            + f" ms -> {c.get('chosen') or ('depth' if c.get('folded') else '3d')}"
            for c in s.get("fold_choices", [])) or "-"),
        ("end to end / bare trunk (whole | steady)", f"{_fmt(s.get('ratio_e2e_bare'), '.2f')} | {_fmt(s.get('ratio_steady_bare'), '.2f')}"),
        ("whole lung 2000x9000x9000, extrapolated", _fmt(s.get("lung_minutes"), ".1f", " min")),
        ("peak GPU memory (sweep)", _fmt(t.get("peak_gpu_gib"), ".1f", " GiB")),
        ("dense / patch speed-up (max |dense - patch|)", f"{_fmt(s.get('dense_patch_speedup'))}x ({_fmt(s.get('max_abs_dense_minus_patch'), '.1e')})"),
        ("patch mode, patches/s", _fmt(s.get("patch_points_s"), ".0f")),
    ]
    for name in ("train_cnn3d_paper", "train_timm_resnet18", "train_cnn3d", "train_timm_resnet18_smoke"):
        r = res.get(name)
        if not r:
            if name in ("train_cnn3d_paper", "train_timm_resnet18"):
                rows.append((f"{name}", "-"))
            continue
        lit = r.get("lightning") or {}
        post = r.get("post_fit") or {}
        rows.append((f"{name}: bare step | Lightning, patches/s", f"{_fmt(r.get('bare_patches_s'), '.0f')} | {_fmt(lit.get('patches_s'), '.0f')} "
                                                                  f"= {_fmt(r.get('ratio_lightning_bare'), '.2f')}"))
        b = r.get("step_breakdown") or {}
        if b:
            rows.append((f"{name}: ms per step: loader+copy | float+augment | step",
                         " | ".join(_fmt(b.get(k), ".2f") for k in ("fetch_ms", "augment_ms", "step_ms"))
                         + f" (bare step {_fmt(1e3 * r['batch_size'] / r['bare_patches_s'] if r.get('bare_patches_s') else None, '.2f')})"))
        rows.append((f"{name}: epoch s | post-fit s | outside steps (10 ep)",
                     f"{_fmt(min(lit.get('epoch_seconds') or [float('nan')]), '.2f')} | "
                     f"{_fmt((post.get('predict_spots_seconds') or 0) + (post.get('off_plane_seconds') or 0), '.1f')} | "
                     f"{_fmt(r.get('outside_steps_10_epochs'), '.0%')} "
                     f"({_fmt(r.get('outside_steps_10_epochs_with_startup'), '.0%')} with start-up "
                     f"{_fmt(r.get('setup_seconds'), '.1f')} s, imports {_fmt(r.get('imports_seconds'), '.1f')} s)"))
        if "probe_model_seconds" in post:
            rest = post["off_plane_seconds"] - post["ridge_fit_seconds"] - post["probe_model_seconds"]
            rows.append((f"{name}: post-fit s: spots | ridge fit | probe model | probe rest",
                         " | ".join(_fmt(v, ".2f") for v in (post.get("predict_spots_seconds"), post["ridge_fit_seconds"],
                                                            post["probe_model_seconds"], rest))
                         + f" ({r.get('torch_threads', '-')} torch threads)"))
        if lit.get("checkpoint_saves"):
            rows.append((f"{name}: checkpoints, training thread s | saves",
                         f"{_fmt(lit.get('checkpoint_seconds'), '.2f')} | {lit['checkpoint_saves']} "
                         f"({', '.join(lit.get('checkpoint_plugins') or []) or '-'})"))
    ld = g("loader", "loader_patches_s") or {}
    if ld:
        counts = sorted(ld, key=int)
        rates = " | ".join(f"{w}: {ld[w]:.0f}" for w in counts)
        ratio = ld[counts[-1]] / ld[counts[0]] if ld[counts[0]] else float("nan")
        rows.append(("loader patches/s by workers", f"{rates} ({counts[-1]}/{counts[0]} workers: {ratio:.1f}x)"))
        per = g("loader", "loader_ms_per_batch") or {}
        rows.append(("loader ms per batch: waiting | to device + augment | pin copy", "; ".join(
            f"{w}: " + " | ".join(_fmt(per[w].get(k), ".2f") for k in ("wait_ms", "to_device_augment_ms", "pin_copy_ms"))
            for w in sorted(per, key=int)) or "-"))
    else:
        rows.append(("loader patches/s by workers", "-"))
    pf = g("post_fit", "seconds") or {}
    if pf:
        rows.append(("post-fit without the model, s (CPU)", ", ".join(f"{k} {v:.2f}" for k, v in pf.items())))
    c = g("sweep_compile", "e2e", "timed") or {}
    if c:
        rows.append(("sweep with torch.compile, MVoxel/s (steady)", f"{_fmt(c.get('mvox_s_steady'))}; bare {_fmt(g('sweep_compile', 'bare', 'mvox_s'))}"))
    for name, st in res.get("stages", {}).items():
        rows.append((f"stage {name}", f"{st.get('status')}" + (f", {st['seconds']} s" if "seconds" in st else "")))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def _ways_ms(choice: dict) -> dict:
    """ms per way of one folded layer: ``ms`` now, ``ms_3d`` / ``ms_folded`` in older results."""
    return choice.get("ms") or {k: choice[f"ms_{k}"] for k in ("3d", "folded") if f"ms_{k}" in choice}


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "gpu_check_out")))
    ap.add_argument("--cpu-smoke", action="store_true", help="every stage tiny on the CPU (tests)")
    ap.add_argument("--budget-s", type=float, default=None, help="overall time for the stages (default 420; smoke 600)")
    ap.add_argument("--cohort", type=Path, default=None, help="an existing phantom cohort for the training stages")
    ap.add_argument("--no-post-fit", action="store_true", help="skip the post-fit scoring in the training stage")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--make-volume", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--voxel-um", type=float, default=1.6, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_volume is not None:  # the volume stage's own process
        res = make_volume(args.make_volume, tuple(args.shape), args.voxel_um)
        print(json.dumps(res))
        if args.json:
            args.json.write_text(json.dumps(res))
        return

    smoke = args.cpu_smoke
    args.out.mkdir(parents=True, exist_ok=True)
    st = Stages(args.out, args.budget_s or (600.0 if smoke else 420.0))
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    work.mkdir(parents=True, exist_ok=True)
    st.say(f"gpu_check {'(CPU smoke)' if smoke else ''} started {time.strftime('%Y-%m-%d %H:%M:%S')}; out {args.out}; work {work}")
    st.results["env"] = environment(smoke)
    st.say(json.dumps(st.results["env"], indent=2))
    st.save()

    dev = "cpu" if smoke else "cuda"
    vol = work / "volume.ome.zarr"
    if smoke:
        shape, voxel, model = (40, 160, 160), 6.4, "cnn3d"
        sweep_args = ["--tile-vox", "32", "96", "96", "--batch-size", "16", "--patch-points", "16", "--threads", "2",
                      "--bare-seconds", "0.5"]
    else:
        shape, voxel, model = (336, 2048, 2048), 1.6, "published"
        sweep_args = ["--tile-vox", "auto", "--batch-size", "32", "--patch-points", "512", "--threads", "4"]
    st.run("volume", [PY, __file__, "--make-volume", vol, "--shape", *shape, "--voxel-um", voxel, "--json", "{json}"], 90)
    if vol.exists():
        st.run("sweep", [PY, "benchmarks/sweep.py", "--model", model, "--device", dev, "--volume", vol, "--no-rss",
                         "--tmp", work, "--json", "{json}", "--profile", args.out / "sweep_profile.txt", *sweep_args], 150, 40)

    cohort = args.cohort
    if cohort is None:
        cohort = work / "cohort" / "cohort.yaml"
        size = ["256", "1600", "1600"]
        st.run("cohort", [PY, "-m", "xpression.phantom", "--out", cohort.parent, "--preset", "tiny", "--size-um", *size,
                          "--workers", "4", "--quiet"], 90)
    if cohort.exists():
        if smoke:
            common = ["--manifest", cohort, "--device", dev, "--batch-size", "8", "--workers", "0", "--epochs", "2",
                      "--steps", "2", "--threads", "2", "--limit-batches", "3"]
            st.run("train_cnn3d", [PY, "benchmarks/train_speed.py", "--model", "cnn3d", *common, "--json", "{json}"], 300)
            st.run("train_timm_resnet18_smoke", [PY, "benchmarks/train_speed.py", "--model", "timm_resnet18", *common,
                                                 "--no-post-fit", "--json", "{json}"], 300)
            st.run("loader", [PY, "benchmarks/loader.py", "--manifest", cohort, "--device", dev, "--batch-size", "8",
                              "--num-workers", "0", "1", "--seconds", "1", "--no-model", "--json", "{json}"], 120)
            st.run("post_fit", [PY, "benchmarks/post_fit.py", "--manifest", cohort, "--repeat", "1",
                                "--json", "{json}"], 120)
        else:
            common = ["--manifest", cohort, "--device", dev, "--voxel-size-um", "1.6", "--batch-size", "32", "--workers", "6",
                      "--epochs", "3", "--steps", "20"]
            post = ["--no-post-fit"] if args.no_post_fit else []
            st.run("train_cnn3d_paper", [PY, "benchmarks/train_speed.py", "--model", "cnn3d_paper", *common, *post, "--json", "{json}"],
                   110, 40)
            st.run("train_timm_resnet18", [PY, "benchmarks/train_speed.py", "--model", "timm_resnet18", *common,
                                           "--no-post-fit", "--json", "{json}"], 90, 40)
            st.run("loader", [PY, "benchmarks/loader.py", "--manifest", cohort, "--device", dev, "--voxel-size-um", "1.6",
                              "--batch-size", "32", "--num-workers", "0", "4", "8", "--seconds", "4", "--no-model",
                              "--json", "{json}"], 80, 30)
            st.run("post_fit", [PY, "benchmarks/post_fit.py", "--manifest", cohort, "--voxel-size-um", "1.6", "--repeat", "1",
                                "--json", "{json}"], 60, 30)
    if not smoke and vol.exists():
        st.run("sweep_compile", [PY, "benchmarks/sweep.py", "--model", model, "--device", dev, "--volume", vol, "--no-rss",
                                 "--no-patch", "--compile", "--tmp", work, "--json", "{json}", *sweep_args], 150, 90)
    st.say(f"finished {time.strftime('%H:%M:%S')}; figures in {args.out / 'gpu_check.json'}", echo=False)
    summary = table(st.results)
    st.say("\n" + summary, echo=False)
    print("\n" + summary, flush=True)


if __name__ == "__main__":
    main()

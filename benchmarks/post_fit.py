"""What a training run computes on the CPU around its model: the slab cache, and the scoring after
the fit without the model's own forward passes.

    python benchmarks/post_fit.py --manifest COHORT.yaml [--voxel-size-um 1.6] [--threads 2] [--repeat 2]
                                  [--json PATH]

``train.py`` scores every run after its fit (``xpression.evaluation.run_scores.evaluate_run``):
the features + ridge baseline fitted on the run's patch (one pass over every spot), then the
off-plane probe (``conf/off_plane/probe.yaml``): the probe patches read as training reads them,
the model and the ridge on them, the baselines without CT. On a GPU the model's share is small,
so the rest bounds the share of a run spent outside training steps (``benchmarks/train_speed.py``).

Here the model is free (a constant), so what is timed is everything else, split into its parts:
the data module's set-up (sections, targets, the slab cache at the model's voxel size), the
loader's pass for the spot predictions (in the main process, as every pass over all spots is:
``predict_dataloader``), the ridge's fit pass, the probe's patch reads and the ridge on the probe
patches. Each part is the median over ``--repeat`` runs in one process. One table is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class FreeModel(torch.nn.Module):
    """A model that costs nothing: every patch gets the same composition, as a module
    (``predict_spots``) and as a per-patch predictor (the probe)."""

    def __init__(self, n_targets: int):
        super().__init__()
        self.n_targets = n_targets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), self.n_targets), 1.0 / self.n_targets)

    def predict_patches(self, patches: np.ndarray) -> np.ndarray:
        return self(patches).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--voxel-size-um", type=float, default=None, help="model voxel size (default: the volume's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if not Path(args.manifest).is_file():
        ap.error(f"--manifest: no such file: {args.manifest}")

    from omegaconf import OmegaConf

    from benchmarks._timing import timed_methods
    from xpression.callbacks import predict_spots
    from xpression.data.datamodule import XPressionDataModule
    from xpression.data.sampling import StratifiedSampler
    from xpression.data.splits import StratifiedRandomSplit
    from xpression.evaluation import generalisation
    from xpression.evaluation.run_scores import evaluate_run
    from xpression.models.closed_form import ClosedFormModel
    from xpression.models.ridge import RidgeBaseline

    if args.threads:
        torch.set_num_threads(args.threads)
    runs: list[dict[str, float]] = []
    for _ in range(args.repeat):
        seconds: dict[str, float] = defaultdict(float)
        t0 = time.perf_counter()
        dm = XPressionDataModule(args.manifest, sampler=StratifiedSampler(voxel_size_um=args.voxel_size_um),
                                 split=StratifiedRandomSplit(), batch_size=32, seed=0)
        dm.setup("fit")
        seconds["set-up (sections, targets, slab cache)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        table = predict_spots(FreeModel(len(dm.target_spec.names)), dm)
        seconds["spot predictions (the loader's pass)"] = time.perf_counter() - t0
        probe = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "off_plane" / "probe.yaml"))
        probe["max_patch_um"] = [float(v) for v in dm.sampler.geometry.extent_um(dm.voxel_size_um)]
        parts = {"ridge: fit pass over every spot": (ClosedFormModel, "fit_predict"),
                 "probe: patch reads": (generalisation, "read_patches"),
                 "probe: the ridge on its patches": (RidgeBaseline, "predict_patches")}
        with timed_methods(parts, seconds):
            t0 = time.perf_counter()
            metrics, _ = evaluate_run(FreeModel(len(dm.target_spec.names)), dm, table, off_plane=probe)
            seconds["scoring after the fit, all of it"] = time.perf_counter() - t0
        points = sum((metrics.get("off_plane") or {}).get("n_points", {}).values())
        runs.append(dict(seconds))
    print(f"{args.manifest}: {len(dm.spots)} spots, patch {dm.patch_shape_vox} voxels of {dm.voxel_size_um} um, "
          f"{points} probe points, torch threads {torch.get_num_threads()}, median of {args.repeat} runs")
    print(f"{'part':45s} {'seconds':>8s}")
    median = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
    for key, sec in median.items():
        print(f"{key:45s} {sec:8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"spots": len(dm.spots), "probe_points": points, "seconds": median,
                                         "threads": torch.get_num_threads(), "repeat": args.repeat}, indent=2))


if __name__ == "__main__":
    main()

"""The pretraining loop: AdamW with linear warm-up and cosine decay, random batches of the pool,
in-plane symmetries and z flips, fresh block masks every step.

A fixed held-out batch (its own patches and masks) is scored every ``eval_every`` steps, beside
the loss of filling each blanked voxel with its patch's visible mean (what a network that learnt
nothing about structure would reach), so the history says how far the encoder got.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from xpression.data.augment import Augment
from xpression.data.patches import image_to_float
from xpression.models.masked import MaskedReconstruction, block_mask, visible_mean
from xpression.models.module import cosine_warmup

__all__ = ["PretrainSettings", "fit", "mean_fill_loss"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSettings:
    """``steps`` optimizer steps of ``batch_size`` patches (stopped early after ``max_minutes``);
    blocks of ``mask_block_um`` (z, y, x um) blanked with probability ``mask_ratio``."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    mask_block_um: tuple[float, float, float] = (19.2, 51.2, 51.2)
    mask_ratio: float = 0.5
    max_minutes: float | None = None
    eval_every: int = 100
    eval_patches: int = 256
    progress: bool = True

    def block_vox(self, voxel_size_um: Sequence[float]) -> tuple[int, int, int]:
        """The mask block in model voxels (at least one per axis)."""
        return tuple(max(1, int(round(b / v))) for b, v in zip(self.mask_block_um, voxel_size_um))  # type: ignore[return-value]


def mean_fill_loss(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean squared error over the blanked voxels of filling each with its patch's visible mean."""
    return float((visible_mean(x, mask).expand_as(x) - x).square()[mask].mean())


def _held_out(pool: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``n`` random patches (or a quarter of a small pool) off the pool: (train, held out)."""
    n = min(int(n), len(pool) // 4)
    order = torch.randperm(len(pool), generator=generator)
    return pool[order[n:]], pool[order[:n]]


def fit(model: MaskedReconstruction, pool: torch.Tensor, settings: PretrainSettings,
        voxel_size_um: Sequence[float], seed: int, history_csv: Path | None = None) -> dict:
    """Pretrain ``model`` on ``pool`` (``(N, 1, D, H, W)`` stored levels) in place; returns the
    history (``first_loss``/``last_loss``: held-out masked-voxel MSE at the start and the end,
    ``mean_fill_loss``, ``steps``, ``seconds``, ``stopped``) and writes it per evaluation to
    ``history_csv``."""
    generator = torch.Generator().manual_seed(int(seed))
    train, held = _held_out(pool, settings.eval_patches, generator)
    block = settings.block_vox(voxel_size_um)
    held_x = image_to_float(held)
    held_mask = block_mask(len(held_x), held_x.shape[2:], block, settings.mask_ratio, generator)
    baseline = mean_fill_loss(held_x, held_mask) if len(held_x) else float("nan")
    augment = Augment(dihedral=True, z_flip=True, intensity_scale=0.0, intensity_shift=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": settings.weight_decay},
                             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=settings.lr)
    total = max(int(settings.steps), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_warmup(s, total, settings.warmup_steps))

    def evaluate() -> float:
        if not len(held_x):
            return float("nan")
        model.eval()
        with torch.no_grad():
            value = float(model.loss(held_x, held_mask))
        model.train()
        return value

    rows = [{"step": 0, "train_loss": float("nan"), "held_out_loss": evaluate(), "lr": 0.0, "seconds": 0.0}]
    log.info("pretraining: %d patches (%d held out), %d steps of %d, mask blocks %s voxels at ratio %.2f; "
             "held-out masked MSE %.5f at start, %.5f filling with the visible mean",
             len(train), len(held_x), total, settings.batch_size, list(block), settings.mask_ratio,
             rows[0]["held_out_loss"], baseline)
    start, stopped, recent = time.monotonic(), "steps", []
    model.train()
    bar = tqdm(total=total, desc="pretrain", unit="step", disable=not settings.progress, mininterval=5.0)
    step = 0
    for step in range(1, total + 1):
        idx = torch.randint(len(train), (settings.batch_size,), generator=generator)
        x = augment(image_to_float(train[idx]), generator)
        mask = block_mask(len(x), x.shape[2:], block, settings.mask_ratio, generator)
        loss = model.loss(x, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent.append(float(loss.detach()))
        bar.update(1)
        elapsed = time.monotonic() - start
        out_of_time = settings.max_minutes is not None and elapsed > 60.0 * settings.max_minutes
        if step % settings.eval_every == 0 or step == total or out_of_time:
            rows.append({"step": step, "train_loss": float(np.mean(recent)), "held_out_loss": evaluate(),
                         "lr": sched.get_last_lr()[0], "seconds": round(elapsed, 1)})
            bar.set_postfix(loss=f"{rows[-1]['train_loss']:.4f}", held_out=f"{rows[-1]['held_out_loss']:.4f}")
            recent = []
        if out_of_time:
            stopped = f"max_minutes={settings.max_minutes} reached"
            break
    bar.close()
    model.eval()
    if history_csv is not None:
        with open(history_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    summary = {"steps": step, "seconds": round(time.monotonic() - start, 1), "stopped": stopped,
               "first_loss": rows[0]["held_out_loss"], "last_loss": rows[-1]["held_out_loss"],
               "mean_fill_loss": baseline, "first_train_loss": rows[1]["train_loss"] if len(rows) > 1 else float("nan"),
               "last_train_loss": rows[-1]["train_loss"]}
    log.info("pretraining: %d steps in %.0f s (stopped: %s); held-out masked MSE %.5f -> %.5f (visible-mean fill %.5f)",
             summary["steps"], summary["seconds"], stopped, summary["first_loss"], summary["last_loss"], baseline)
    return summary

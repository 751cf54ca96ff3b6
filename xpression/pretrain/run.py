"""One pretraining run, from a composed config (conf/pretrain.yaml) to a run folder:
``encoder.ckpt`` (for ``model.init_from``), ``pretrain_history.csv`` (held-out masked-voxel MSE per
evaluation) and ``pretrain.json`` (the summary). Every check that needs no voxels (the output, the
volumes, the patch against each volume and against the backbone) runs first."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from xpression.config import ConfigError, check_pretrain_config
from xpression.models.masked import MaskedReconstruction, save_encoder
from xpression.pretrain.loop import PretrainSettings, fit
from xpression.pretrain.pool import draw_pool, open_cohort_volumes

__all__ = ["pretrain", "settings_from"]

log = logging.getLogger(__name__)

DROPOUT_KEYS = ("dropout", "drop_rate", "drop_path_rate")  # the backbone configs' names for dropout


def settings_from(node: DictConfig) -> PretrainSettings:
    """The loop's settings from the ``pretrain`` node."""
    return PretrainSettings(
        steps=int(node.steps), batch_size=int(node.batch_size), lr=float(node.lr), weight_decay=float(node.weight_decay),
        warmup_steps=int(node.warmup_steps), mask_block_um=tuple(float(b) for b in node.mask_block_um),  # type: ignore[arg-type]
        mask_ratio=float(node.mask_ratio), max_minutes=None if node.max_minutes is None else float(node.max_minutes),
        eval_every=int(node.eval_every), eval_patches=int(node.eval_patches), progress=bool(node.progress))


def pretrain(cfg: DictConfig) -> dict:
    """Pretrain ``cfg.model.backbone`` on the volumes of ``cfg.data.manifest``; returns the summary."""
    check_pretrain_config(cfg)
    if OmegaConf.select(cfg, "model.backbone", default=None) is None:
        raise ConfigError([f"model: {OmegaConf.select(cfg, 'model._target_', default='this model')} has no network "
                           "backbone to pretrain (a fitted model such as forest or ridge); choose a network, e.g. "
                           "model=cnn3d"])
    node = cfg.pretrain
    out_dir = Path(cfg.paths.output_dir)
    ckpt = Path(node.out) if node.get("out") else out_dir / "encoder.ckpt"
    if ckpt.exists():
        raise ConfigError([f"pretrain.out: {ckpt} exists; pretraining never overwrites a checkpoint (name another)"])
    settings = settings_from(node)
    data = open_cohort_volumes(cfg.data.manifest, node.volumes, cfg.patch.size_um, cfg.patch.voxel_size_um,
                               cfg.data.intensity, cfg.data.intensity_reference, int(cfg.seed))
    backbone = OmegaConf.to_container(cfg.model.backbone, resolve=True)
    if node.get("dropout") is not None:  # no weights change: the fine-tuned network keeps the model's own
        backbone = {k: float(node.dropout) if k in DROPOUT_KEYS else v for k, v in backbone.items()}  # type: ignore[union-attr]
    torch.manual_seed(int(cfg.seed))
    try:
        model = MaskedReconstruction(backbone, data.patch_shape, int(node.decoder_channels))  # type: ignore[arg-type]
    except ValueError as err:
        raise ConfigError([f"model.backbone: {err}"]) from err
    log.info("pretraining backbone %s on %d volumes (%s), patch %s voxels = %s um at %s um voxels",
             backbone, len(data.volumes), ", ".join(data.volumes), list(data.patch_shape),
             [round(s, 1) for s in data.patch_size_um], list(data.voxel_size_um))
    pool = draw_pool(data, int(node.patches_per_volume), str(cfg.data.cache_dtype), int(cfg.seed), int(node.planes_per_volume))
    out_dir.mkdir(parents=True, exist_ok=True)
    history = fit(model, pool, settings, data.voxel_size_um, int(cfg.seed), out_dir / "pretrain_history.csv")
    record = {"method": "masked_reconstruction", "seed": int(cfg.seed), "data": data.describe(),
              "settings": asdict(settings), "decoder_channels": int(node.decoder_channels), "history": history}
    save_encoder(ckpt, model, record)
    summary = {**record, "backbone": backbone, "patch_shape": list(data.patch_shape), "checkpoint": str(ckpt)}
    (out_dir / "pretrain.json").write_text(json.dumps(summary, indent=2))
    log.info("encoder checkpoint: %s (fine-tune with model.init_from=%s and the same model= and patch)", ckpt, ckpt)
    return summary

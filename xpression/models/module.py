"""``XPressionModule``: training, evaluation and prediction of an ``XPressionNet``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from xpression.data.input_spec import INPUT_SPEC_KEY, InputSpec
from xpression.metrics import regression_metrics
from xpression.models.ema import EMA
from xpression.models.losses import build_loss
from xpression.models.masked import ENCODER_KEY, InitFromError, load_encoder
from xpression.models.net import XPressionNet, build_net
from xpression.models.targets import as_target_spec, spec_to_dict

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _plain(x: Any) -> Any:
    """OmegaConf containers -> plain python (checkpoints then load without omegaconf types)."""
    if OmegaConf.is_config(x):
        return OmegaConf.to_container(x, resolve=True)
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


class XPressionModule(pl.LightningModule):
    """Trains ``XPressionNet`` on batches ``{"image": (B,1,D,H,W), "target": (B,T), "index": (B,)}``.

    Args:
        backbone: ``{"name": <registered backbone>, **kwargs}``.
        target_spec: ``TargetSpec`` (or ``{"names", "kind"}``): picks the head and checks the loss.
        patch_shape: ``(D, H, W)`` of the input patch, voxels.
        loss: a loss name or ``{"name": ..., **kwargs}``; ``None`` = the kind's default
            (composition: kl, log_expression: mse, counts: poisson).
        spot_radius_vox: spot radius in in-plane voxels (used by ``unet``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay, applied to weight matrices/kernels only.
        scheduler: ``"cosine"`` (linear warmup then cosine to ``min_lr_ratio * lr`` over the
            trainer's total steps) or ``"none"``.
        warmup_steps: optimizer steps of linear warmup.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (cosine).
        ema_decay: keep an EMA of the weights with this decay, used for val/test/predict.
        init_from: a checkpoint of this module to start from (its EMA weights if it kept them).
            It must predict the same targets (names and kind) with the same backbone config.
            Or an encoder checkpoint of ``python -m xpression.pretrain`` (same backbone config
            and patch): the backbone starts from it, the head from scratch.
        freeze_encoder: train the head only (backbone frozen, kept in eval mode).
        init_from_source: record only: the ``init_from`` a saved run started from.
        input_spec: the data's input contract (``InputSpec``; ``train.py`` passes the data
            module's). Every checkpoint keeps it, with this model recorded, under
            ``INPUT_SPEC_KEY``: ``infer.py`` needs nothing else.
    """

    def __init__(self, backbone: Mapping[str, Any], target_spec: Any, patch_shape: Sequence[int],
                 loss: str | Mapping[str, Any] | None = None, spot_radius_vox: float | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.01, scheduler: str = "cosine",
                 warmup_steps: int = 0, min_lr_ratio: float = 0.0, ema_decay: float | None = None,
                 init_from: str | None = None, freeze_encoder: bool = False,
                 init_from_source: str | None = None, input_spec: InputSpec | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if scheduler not in ("cosine", "none", None):
            raise ValueError(f"scheduler must be 'cosine' or 'none', got {scheduler!r}")
        backbone, loss = _plain(backbone), _plain(loss)
        self.target_spec = as_target_spec(_plain(target_spec))
        patch_shape = [int(s) for s in _plain(patch_shape)]
        # init_from is applied once here; a saved checkpoint already holds those weights, so it
        # reloads with init_from=None and keeps the origin in init_from_source.
        self.save_hyperparameters({
            "backbone": backbone, "target_spec": spec_to_dict(self.target_spec),
            "patch_shape": patch_shape, "loss": loss, "spot_radius_vox": spot_radius_vox,
            "lr": lr, "weight_decay": weight_decay, "scheduler": scheduler or "none",
            "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio, "ema_decay": ema_decay,
            "init_from": None, "freeze_encoder": freeze_encoder,
            "init_from_source": str(init_from) if init_from else init_from_source})
        self.loss_fn = build_loss(loss, self.target_spec.kind)
        self.net: XPressionNet = build_net(backbone, self.target_spec, patch_shape, spot_radius_vox)
        if init_from:
            load_net_weights(self.net, init_from, self.hparams)
        if freeze_encoder:
            self.net.backbone.requires_grad_(False)
        self.ema = EMA(self.net, ema_decay) if ema_decay else None
        self.input_spec = self._checked_spec(input_spec)
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {s: [] for s in SPLITS}

    # -- the input contract -------------------------------------------------------------------
    def _checked_spec(self, spec: InputSpec | Mapping[str, Any] | None) -> InputSpec | None:
        if spec is None:
            return None
        spec = spec if isinstance(spec, InputSpec) else InputSpec.from_dict(dict(spec))
        if spec.target_spec.names != self.target_spec.names or spec.target_spec.kind != self.target_spec.kind:
            raise ValueError(f"input_spec targets {spec.targets} differ from the module's {spec_to_dict(self.target_spec)}")
        if tuple(spec.patch_shape_vox) != tuple(self.hparams.patch_shape):
            raise ValueError(f"input_spec patch {list(spec.patch_shape_vox)} differs from the module's {self.hparams.patch_shape}")
        views = int(getattr(self.net.backbone, "views", 1))
        if spec.views != views:
            raise ValueError(
                f"backbone {self.hparams.backbone.get('name')!r} takes the patch and a context view, but patch.context_um is null; "
                "set it (e.g. patch.context_um=[172.8,600,600])" if views == 2 else
                f"patch.context_um={list(spec.context_um or [])} gives a context view, but backbone "
                f"{self.hparams.backbone.get('name')!r} takes the patch only; use a multi-scale model (e.g. model=multiscale_cnn3d)")
        return spec

    def checkpoint_spec(self) -> dict | None:
        """The input spec a checkpoint keeps: the data's, with this model's class, backbone and
        dense geometry recorded."""
        if self.input_spec is None:
            return None
        net = self.net
        stride = net.output_stride
        return self.input_spec.with_model(**{
            "class": f"{type(self).__module__}.{type(self).__qualname__}", "family": self.hparams.backbone.get("name"),
            "backbone": dict(self.hparams.backbone), "dense_equivalent": net.dense_equivalent,
            "output_stride": None if stride is None else [int(s) for s in stride],
            "dense": hasattr(net.backbone, "dense_features")}).to_dict()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        spec = self.checkpoint_spec()
        if spec is not None:
            checkpoint[INPUT_SPEC_KEY] = spec

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get(INPUT_SPEC_KEY) is not None:
            self.input_spec = self._checked_spec(checkpoint[INPUT_SPEC_KEY])

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> "XPressionModule":
        """The module a loaded checkpoint dict holds (weights, EMA copy and input spec)."""
        module = cls(**checkpoint["hyper_parameters"])
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
        return module

    # -- networks -----------------------------------------------------------------------------
    @property
    def eval_net(self) -> XPressionNet:
        """The network used for val/test/predict: the EMA copy when there is one."""
        return self.ema.net if self.ema is not None else self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> ``(B, T)`` predictions in target units."""
        return self.eval_net(x)

    def train(self, mode: bool = True) -> "XPressionModule":
        super().train(mode)
        if self.hparams.freeze_encoder:
            self.net.backbone.eval()
        return self

    # -- steps --------------------------------------------------------------------------------
    def _step(self, batch: Mapping[str, torch.Tensor], split: str) -> torch.Tensor:
        net = self.net if split == "train" else self.eval_net
        raw = net.forward_raw(batch["image"])
        target = batch["target"].to(raw.dtype)
        loss = self.loss_fn(raw, target)
        bs = target.shape[0]
        # Not in the progress bar on training steps: Lightning turns a step's progress-bar values
        # into Python numbers after every step, a device sync that keeps the host from preparing
        # the next step while this one runs (xpression.callbacks.ProgressBar shows it every n steps).
        self.log(f"{split}/loss", loss, on_step=split == "train", on_epoch=True, prog_bar=split != "train",
                 batch_size=bs, sync_dist=split != "train")
        pred = net.head.activate(raw.detach()).float()
        # kept on the device until the epoch ends: a copy to the host here would wait for the
        # step to finish and leave the GPU idle while the next one is prepared
        index = batch.get("index", torch.full((bs,), -1, dtype=torch.int64))
        self._outputs[split].append((pred, target.detach().float(), index.detach()))
        return loss

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int,
                     dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """``{"index": (B,), "prediction": (B, T)}`` (plus ``"target"`` when the batch has one)."""
        out = {"index": batch["index"], "prediction": self.eval_net(batch["image"])}
        if "target" in batch:
            out["target"] = batch["target"]
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.net)

    # -- epoch metrics ------------------------------------------------------------------------
    def _epoch_metrics(self, split: str) -> None:
        """The split's metrics over the epoch, per volume and then averaged over volumes (never
        pooled across animals, as the post-fit scores), gathered from every rank first."""
        outs, self._outputs[split] = self._outputs[split], []
        if self.trainer is not None and self.trainer.sanity_checking:
            return
        t = len(self.target_spec.names)
        pred = torch.cat([o[0] for o in outs]).cpu() if outs else torch.zeros(0, t)
        target = torch.cat([o[1] for o in outs]).cpu() if outs else torch.zeros(0, t)
        index = torch.cat([o[2] for o in outs]).cpu() if outs else torch.zeros(0, dtype=torch.int64)
        if self.trainer is not None and self.trainer.world_size > 1:
            # every rank joins the gather, even one that saw no batch
            pred, target, index = self._gather(pred), self._gather(target), self._gather(index)
        if not len(pred):
            return
        per_volume = [regression_metrics(pred[rows].numpy(), target[rows].numpy(), self.target_spec.names,
                                         self.target_spec.kind) for rows in self._volume_rows(index.numpy())]
        m = {k: float(np.nanmean([v[k] for v in per_volume])) if any(np.isfinite(v[k]) for v in per_volume) else 0.0
             for k in per_volume[0]}
        # identical on every rank after the gather; sync_dist only keeps Lightning from warning
        self.log_dict({f"{split}/{k}": float(np.float32(v)) for k, v in m.items()},
                      batch_size=len(pred), sync_dist=self.trainer is not None and self.trainer.world_size > 1)

    def _volume_rows(self, index: np.ndarray) -> list[np.ndarray]:
        """Positions of ``index`` (spot-table rows of the data module) grouped by volume; one group
        when the spots' volumes are unknown (no data module, or batches without indices)."""
        spots = getattr(getattr(self._trainer, "datamodule", None), "spots", None)
        if spots is None or "volume_id" not in spots or len(index) == 0 or index.min() < 0:
            return [np.arange(len(index))]
        volume = spots["volume_id"].to_numpy()[index]
        return [np.flatnonzero(volume == v) for v in dict.fromkeys(volume)]

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``(N_rank, T)`` from every rank (ranks may hold different ``N``)."""
        n = self.all_gather(torch.tensor(len(x), device=self.device)).flatten()
        pad = torch.zeros(int(n.max()) - len(x), *x.shape[1:], dtype=x.dtype)
        full = self.all_gather(torch.cat([x, pad]).to(self.device))
        return torch.cat([full[r, : int(n[r])] for r in range(len(n))]).cpu()

    def on_train_epoch_start(self) -> None:
        self._outputs["train"] = []

    def on_validation_epoch_start(self) -> None:
        self._outputs["val"] = []

    def on_test_epoch_start(self) -> None:
        self._outputs["test"] = []

    def on_train_epoch_end(self) -> None:
        self._epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_metrics("test")

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.net.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr)
        if hp.scheduler in ("none", None):
            return opt
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("scheduler='cosine' needs a known number of steps (trainer max_epochs or max_steps); "
                             "with neither limit use scheduler='none'")
        total = max(int(total), 1)
        if hp.warmup_steps >= total:
            log.warning("model.warmup_steps=%d is not shorter than the whole run (%d optimizer steps): the learning "
                        "rate never reaches model.lr=%g and the cosine decay never starts; lower model.warmup_steps",
                        hp.warmup_steps, total, hp.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: cosine_warmup(step, total, hp.warmup_steps, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def cosine_warmup(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear ``0 -> 1`` over ``warmup`` steps, then cosine ``1 -> min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def load_net_weights(net: XPressionNet, path: str | Path, hparams: Mapping[str, Any]) -> None:
    """Load a checkpoint's network weights (its EMA copy if it has one) into ``net``, or, from an
    encoder checkpoint of ``xpression.pretrain``, the backbone's weights alone.

    Raises :class:`~xpression.models.masked.InitFromError` (a ``ValueError``) if the checkpoint
    predicts other targets or holds another network.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_from checkpoint not found: {path}")
    # our own Lightning checkpoint (trusted local file): it also holds optimizer/loop state
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ENCODER_KEY in ckpt:  # an encoder pretrained without labels (xpression.pretrain): the head starts fresh
        load_encoder(net.backbone, ckpt, path, hparams["backbone"], hparams["patch_shape"])
        return
    src_hp = ckpt.get("hyper_parameters", {})
    src, dst = src_hp.get("target_spec"), hparams["target_spec"]
    if src is None:
        raise InitFromError(f"init_from {path} holds no target_spec: neither an XPressionModule checkpoint "
                            f"nor an encoder of python -m xpression.pretrain")
    if list(src["names"]) != list(dst["names"]) or src["kind"] != dst["kind"]:
        raise InitFromError(
            f"init_from {path} predicts {src['kind']} targets {list(src['names'])}, but this run "
            f"predicts {dst['kind']} targets {list(dst['names'])}; the target sets must match")
    state = ckpt["state_dict"]
    prefix = "ema.net." if any(k.startswith("ema.net.") for k in state) else "net."
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(sub)
    except RuntimeError as e:
        raise InitFromError(f"init_from {path}: its network (backbone {src_hp.get('backbone')}) does "
                         f"not match this one (backbone {hparams['backbone']}): {e}") from e

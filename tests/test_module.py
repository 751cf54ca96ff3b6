"""XPressionModule: overfitting, logging, prediction, EMA, init_from, Hydra configs."""

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from xpression.config import compose

from xpression.models import XPressionModule
from xpression.models.module import cosine_warmup
from xpression.models.targets import TargetSpec

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[1] / "conf"
PATCH = (5, 33, 33)  # the data module's default: odd, spot at the centre voxel
SPEC = TargetSpec(names=["alveolar", "airway", "vascular"], kind="composition")
SMALL = {"name": "cnn3d", "widths": [8, 16, 16], "dense_width": 32, "dropout": 0.0}


def batches(n=3, b=4, seed=0, spec=SPEC):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = torch.rand(b, len(spec.names), generator=g) * 3
        out.append({"image": torch.rand(b, 1, *PATCH, generator=g),
                    "target": torch.softmax(t, 1) if spec.kind == "composition" else t,
                    "index": torch.arange(i * b, (i + 1) * b)})
    return out


def trainer(**kw):
    kw = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "max_steps": 5, **kw}
    return pl.Trainer(**kw)


def make(**kw):
    args = {"backbone": SMALL, "target_spec": SPEC, "patch_shape": PATCH, "lr": 3e-3,
            "scheduler": "none", "weight_decay": 0.0, **kw}
    return XPressionModule(**args)


def loader(data):
    return DataLoader(data, batch_size=None)


def eval_loss(module, data):
    module.eval()
    with torch.no_grad():
        loss = sum(module.loss_fn(module.eval_net.forward_raw(b["image"]), b["target"])
                   for b in data).item() / len(data)
    module.train()
    return loss


def test_overfits_fixed_batches():
    torch.manual_seed(0)
    data = batches()
    m = make(scheduler="cosine", warmup_steps=10)
    start = eval_loss(m, data)
    tr = trainer(max_steps=300, limit_val_batches=0)
    tr.fit(m, loader(data))
    end = eval_loss(m, data)
    print(f"overfit: loss {start:.4f} -> {end:.6f}")
    assert start > 0.05 and end < 0.01 * start + 1e-3, (start, end)
    assert "train/loss" in tr.callback_metrics and "train/pearson_mean" in tr.callback_metrics


def test_logs_metrics_per_split_and_predicts():
    data = batches()
    m = make(scheduler="cosine", warmup_steps=2)
    tr = trainer(max_steps=3, limit_val_batches=2)
    tr.fit(m, loader(data), loader(data))
    keys = set(tr.callback_metrics)
    assert {"val/loss", "val/pearson_mean", "val/pearson/alveolar", "val/r2_mean",
            "val/jsd_mean", "val/dominant_acc"} <= keys
    assert math.isfinite(float(tr.callback_metrics["val/pearson_mean"]))
    tr.test(m, loader(data), verbose=False)
    assert "test/spearman/airway" in tr.callback_metrics
    preds = tr.predict(m, loader(data))
    assert torch.equal(preds[1]["index"], data[1]["index"])
    assert preds[0]["prediction"].shape == (4, 3)
    torch.testing.assert_close(preds[0]["prediction"].sum(1), torch.ones(4))
    assert m.hparams.target_spec == {"names": SPEC.names, "kind": "composition"}


def test_epoch_metrics_are_per_volume_means():
    """Two volumes whose spots differ in level: the epoch metric is each volume's score averaged,
    as the post-fit scores are, not one correlation pooled across animals."""
    import numpy as np
    import pandas as pd

    from xpression.metrics import regression_metrics

    m = make()
    spots = pd.DataFrame({"volume_id": ["a"] * 6 + ["b"] * 6})
    m._trainer = type("T", (), {"datamodule": type("D", (), {"spots": spots})(), "world_size": 1,
                                "sanity_checking": False})()
    g = torch.Generator().manual_seed(1)
    target = torch.softmax(torch.rand(12, 3, generator=g) * 3, 1)
    pred = target + 0.05 * torch.randn(12, 3, generator=g)
    pred[6:] += 0.3  # volume b predicted higher: pooled r drops, per-volume r does not
    index = torch.randperm(12, generator=g)
    m._outputs["val"] = [(pred[index], target[index], index)]
    logged = {}
    m.log_dict = lambda d, **kw: logged.update(d)
    m._epoch_metrics("val")
    per = [regression_metrics(pred[r].numpy(), target[r].numpy(), SPEC.names, "composition")["pearson_mean"]
           for r in (slice(0, 6), slice(6, 12))]
    pooled = regression_metrics(pred.numpy(), target.numpy(), SPEC.names, "composition")["pearson_mean"]
    assert logged["val/pearson_mean"] == pytest.approx(np.mean(per), abs=1e-6)
    assert abs(pooled - np.mean(per)) > 0.05


def test_cosine_warmup_schedule():
    assert cosine_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_warmup(9, 100, 10) == pytest.approx(1.0)
    assert cosine_warmup(55, 100, 10) == pytest.approx(0.5)
    assert cosine_warmup(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_a_cosine_schedule_without_any_limit_is_refused_in_one_line():
    """Lightning's max_epochs=-1 and no max_steps: the cosine schedule has no end (Lightning's own
    estimate is infinite)."""
    with pytest.raises(ValueError, match="scheduler='cosine' needs a known number of steps"):
        trainer(max_steps=-1, max_epochs=-1).fit(make(scheduler="cosine"), loader(batches()))
    trainer(max_steps=3).fit(make(scheduler="cosine"), loader(batches()))  # a limit: fine


def test_ema_used_for_eval(tmp_path):
    data = batches()
    m = make(ema_decay=0.9)
    tr = trainer(max_steps=4, limit_val_batches=0)
    tr.fit(m, loader(data))
    assert int(m.ema.num_updates) == 4
    w, e = m.net.head.fc.weight, m.ema.net.head.fc.weight
    assert not torch.allclose(w, e) and not e.requires_grad
    x = data[0]["image"]
    torch.testing.assert_close(m(x), m.ema.net(x))


def _checkpoint(tmp_path, **kw):
    m = make(**kw)
    tr = trainer(max_steps=2, limit_val_batches=0)
    tr.fit(m, loader(batches()))
    path = tmp_path / "src.ckpt"
    tr.save_checkpoint(path)
    return m, path


def test_init_from_with_frozen_encoder(tmp_path):
    src, path = _checkpoint(tmp_path)
    m = make(init_from=str(path), freeze_encoder=True)
    for a, b in zip(src.net.state_dict().values(), m.net.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in m.net.backbone.parameters())
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    tr = trainer(max_steps=3, limit_val_batches=0)
    tr.fit(m, loader(batches(seed=1)))
    after = m.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    # the fine-tuned checkpoint reloads on its own (the source file is not needed again)
    out = tmp_path / "ft.ckpt"
    tr.save_checkpoint(out)
    path.unlink()
    re = XPressionModule.load_from_checkpoint(out)
    assert re.hparams.init_from is None and re.hparams.init_from_source == str(path)
    torch.testing.assert_close(re.net.head.fc.weight, m.net.head.fc.weight)


def test_init_from_prefers_ema(tmp_path):
    src, path = _checkpoint(tmp_path, ema_decay=0.5)
    m = make(init_from=str(path))
    torch.testing.assert_close(m.net.head.fc.weight, src.ema.net.head.fc.weight)


def test_init_from_mismatch_errors(tmp_path):
    _, path = _checkpoint(tmp_path)
    other = TargetSpec(names=["alveolar", "airway", "immune"], kind="composition")
    with pytest.raises(ValueError, match="target sets must match"):
        make(target_spec=other, init_from=str(path))
    with pytest.raises(ValueError, match="target sets must match"):
        make(target_spec=TargetSpec(names=SPEC.names, kind="log_expression"), loss="mse",
             init_from=str(path))
    with pytest.raises(ValueError, match="does not match"):
        make(backbone={**SMALL, "dense_width": 16}, init_from=str(path))
    with pytest.raises(FileNotFoundError):
        make(init_from=str(tmp_path / "nope.ckpt"))


def test_construction_errors():
    with pytest.raises(ValueError, match="valid names"):
        make(backbone={"name": "nope"})
    with pytest.raises(ValueError, match="valid names"):
        make(loss="nope")
    with pytest.raises(ValueError, match="accepts targets of kind"):
        make(target_spec=TargetSpec(names=["g"], kind="log_expression"), loss="kl")
    with pytest.raises(ValueError, match="too small"):
        make(patch_shape=(5, 16, 16))


NETWORK_CONFIGS = sorted(p.stem for p in (CONF / "model").glob("*.yaml")  # the presets on conf/model/_module.yaml
                         if not p.stem.startswith("_") and "- _module" in p.read_text())


def test_every_model_config_is_tested():
    """Every conf/model entry is a network (tested below) or a closed-form model (the ridge
    baseline, the forest: their own tests); `_module.yaml` is the base the network presets build on."""
    others = {p.stem for p in (CONF / "model").glob("*.yaml") if not p.stem.startswith("_")} - set(NETWORK_CONFIGS)
    assert others <= {"ridge", "forest"}
    assert {"cnn3d", "cnn3d_paper", "unet"} <= set(NETWORK_CONFIGS)


@pytest.mark.parametrize("model", NETWORK_CONFIGS)
def test_model_configs_instantiate(model):
    patch = (8, 32, 32) if model == "cnn3d_paper" else PATCH
    for loss in ("kl", "mix"):
        cfg = compose("train", [f"model={model}", f"loss={loss}"])  # the preset on conf/model/_module.yaml
        m = instantiate(cfg.model)(target_spec=SPEC, patch_shape=list(patch), spot_radius_vox=4.3)
        assert isinstance(m, XPressionModule)
        assert m.loss_fn.name == loss
        assert m.hparams.loss == OmegaConf.to_container(cfg.loss)
    views = getattr(m.net.backbone, "views", 1)  # 2: a multi-scale model's patch and context view
    assert m(torch.rand(2, views, *patch)).shape == (2, 3)


@pytest.mark.parametrize("loss", sorted(p.stem for p in (CONF / "loss").glob("*.yaml")))
def test_loss_configs_build(loss):
    from xpression.models import build_loss

    kind = {"poisson": "counts"}.get(loss, "composition")
    fn = build_loss(OmegaConf.to_container(OmegaConf.load(CONF / "loss" / f"{loss}.yaml")), kind)
    raw, y = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    assert torch.isfinite(fn(raw, y))


def test_removing_the_summary_callback_removes_the_summary():
    """`~callbacks.model_summary` leaves no callback summary, and Lightning's own is turned off
    too; a summary callback or an explicit trainer flag is left as it is."""
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import RichModelSummary

    from xpression.training import model_summary_flag

    assert model_summary_flag(OmegaConf.create({"max_epochs": 1}), []) == {"enable_model_summary": False}
    assert model_summary_flag(OmegaConf.create({"max_epochs": 1}), [RichModelSummary()]) == {}
    assert model_summary_flag(OmegaConf.create({"enable_model_summary": True}), []) == {}


def test_training_steps_read_nothing_back_from_the_device_but_every_n_steps_loss(tmp_path):
    """A value read from the device (``.item()``, ``float()``) waits for the GPU. With the default
    callbacks (``conf/callbacks/default.yaml``: checkpoints, early stopping, throughput, learning
    rate, progress bar, summary) and logger, training steps read on the steps the logger writes
    (``trainer.log_every_n_steps``) and the epoch's first and last, not after every step
    (Lightning does that for any per-step progress-bar metric). Counted on the CPU, where the
    reads are the same calls."""
    import traceback

    from xpression.callbacks import ProgressBar

    reads: list[str] = []
    item, to_float = torch.Tensor.item, torch.Tensor.__float__

    def counted(original):
        def read(self):
            callers = [f.filename for f in traceback.extract_stack(limit=8)[:-1]]
            if not any("torch/optim" in c for c in callers):  # CPU Adam reads its step count: no device there
                reads.append(callers[-1])
            return original(self)
        return read

    class Steps(pl.Callback):  # the training steps that read something (their hooks and the loop's logging included)
        marks: list[int] | None = None

        def on_train_epoch_start(self, trainer, pl_module):
            reads.clear()
            self.marks = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.marks.append(len(reads))

        def on_validation_start(self, trainer, pl_module):
            if self.marks is not None and not hasattr(self, "reading"):  # the epoch's steps are over
                self.marks.append(len(reads))
                self.reading = [i for i in range(1, len(self.marks)) if self.marks[i] > self.marks[i - 1]]

    cfg = compose("train", ["model=cnn3d", f"paths.output_dir={tmp_path}"])
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert any(isinstance(c, ProgressBar) for c in callbacks) and len(callbacks) >= 6
    steps = Steps()
    data = batches(n=24, b=2)
    torch.Tensor.item, torch.Tensor.__float__ = counted(item), counted(to_float)
    try:
        tr = trainer(max_epochs=1, max_steps=-1, limit_val_batches=2, enable_progress_bar=True, enable_model_summary=True,
                     enable_checkpointing=True, logger=instantiate(cfg.logger.csv), log_every_n_steps=cfg.trainer.log_every_n_steps,
                     callbacks=[*callbacks, steps])
        tr.fit(make(), loader(data), loader(data))
    finally:
        torch.Tensor.item, torch.Tensor.__float__ = item, to_float
    assert tr.global_step == 24 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert cfg.trainer.log_every_n_steps == 10
    assert steps.reading == [1, 10, 20, 24], reads  # the loggers' steps, and the epoch's first and last
    with pytest.raises(ValueError, match="loss_every_n_steps"):
        ProgressBar(loss_every_n_steps=0)


def test_a_warmup_as_long_as_the_run_is_warned_about(caplog):
    """model.warmup_steps=50 on a 16-step run: the rate never reaches model.lr, silently."""
    import logging

    def optimizers(warmup: int) -> list[str]:
        from types import SimpleNamespace

        module = make(scheduler="cosine", warmup_steps=warmup)
        module._trainer = SimpleNamespace(estimated_stepping_batches=16)  # all the optimizer set-up asks of it
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="xpression.models.module"):
            module.configure_optimizers()
        return [r.getMessage() for r in caplog.records]

    lines = optimizers(50)
    assert len(lines) == 1 and lines[0].startswith("model.warmup_steps=50 is not shorter than the whole run (16 optimizer steps)")
    assert optimizers(4) == []

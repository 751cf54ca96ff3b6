"""Starting or continuing a training run without losing or mixing anything.

`train.py resume=RUN` continues an interrupted run in its own folder with the config it was
started with (`RUN/config.yaml`, else `RUN/.hydra/config.yaml`; after a restart, the restart's),
whatever the command line composes. Only the keys of `RESUMABLE_OVERRIDES` may be changed on the command line (e.g. more
epochs); any other override, a config group or a checkpoint recorded with another config is
refused unless `allow_config_change=true`. Every checkpoint records the config of its run
(`RecordRunConfig`), so `ckpt_path=` alone is checked the same way.

Nothing the run wrote is overwritten: `config.yaml` stays as it was and each restart records
the config it used in `config.resumed-<n>.yaml`; the CSV log (`metrics.csv`) keeps its rows up
to the checkpoint and goes on from there, so it and the training curves cover every epoch (the
file as it was before the restart is kept as `metrics.before-resume-<n>.csv`).
"""

from __future__ import annotations

import csv
import datetime
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from xpression.runfolder import RUN_CONFIG_KEY, RUN_OUTPUTS, run_config_path

__all__ = ["RESUMABLE_OVERRIDES", "ResumeError", "RunStart", "RecordRunConfig", "start_run", "output_dir",
           "run_config_path", "write_run_config", "continue_metrics_history"]

log = logging.getLogger(__name__)

# Keys a resumed run may change on the command line: they change how long or how fast it
# trains, not what it learns from. More epochs stretch the cosine learning-rate schedule: the
# run continues from its step on the longer schedule.
RESUMABLE_OVERRIDES = (
    "trainer.max_epochs",
    "trainer.max_time",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "trainer.plugins",  # how checkpoints are written (runs recorded before it wrote them on the training thread)
    "figures",
)
# How a run is started, not what it trains: never compared.
_START_KEYS = ("resume", "ckpt_path", "allow_config_change", "task_name")
# evaluation.: the post-fit steps repeat baselines, off_plane and figures (compared there); patch.: the
# sampler repeats it (sampler.patch_size_um, sampler.voxel_size_um are compared).
_IGNORED_PREFIXES = ("paths.", "hydra.", "evaluation.", "patch.")
CONFIG_KEY = RUN_CONFIG_KEY  # where a checkpoint records its run's config
# Keys added after checkpoints began recording their config: for a checkpoint that lacks one, the
# value that reproduces its run, from its recorded config (flat keys), or ANY_VALUE where the key
# did not act on that run (it then matches whatever the current config holds).
ANY_VALUE = object()


def _edges_then(sampler: str) -> Callable[[dict[str, Any]], Any]:
    """The context view read raw 0 past the volume's faces; a run without a view never read one."""
    return lambda recorded: "fill" if recorded.get(f"{sampler}.context_um") is not None else ANY_VALUE


ADDED_LATER: dict[str, Callable[[dict[str, Any]], Any]] = {
    "data.train_fraction": lambda recorded: 1.0,  # every training spot
    # the sampler, and its copy that data.sampler interpolates
    **{f"{node}.context_edges": _edges_then(node) for node in ("sampler", "data.sampler")},
}
_RUN_PLACEHOLDER = "<run folder>"


class ResumeError(ValueError):
    """A run cannot be started or continued as asked; the message says why and what to do."""


@dataclass(frozen=True)
class RunStart:
    """How a training run starts: fresh (``checkpoint`` None) or from a checkpoint, whose
    ``epoch`` (last completed) and ``global_step`` it continues; ``restart`` numbers the
    restarts of the run folder (0: the folder's first start)."""

    out_dir: Path
    checkpoint: Path | None = None
    epoch: int = -1
    global_step: int = 0
    restart: int = 0
    changed: tuple[str, ...] = ()


class RecordRunConfig(pl.Callback):
    """Store the run's resolved config in every checkpoint it saves; when a checkpoint of a run
    folder that has since moved is loaded, move the paths its callbacks kept (checkpoint folder,
    best checkpoint so far) with it, so the best checkpoint is still tracked."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        old = ((checkpoint.get(CONFIG_KEY) or {}).get("paths") or {}).get("output_dir")
        new = (self.config.get("paths") or {}).get("output_dir")
        if old and new and old != new and "callbacks" in checkpoint:  # runs before callbacks load their states
            checkpoint["callbacks"] = _replace_prefix(checkpoint["callbacks"], str(old), str(new))


def start_run(cfg: DictConfig) -> tuple[DictConfig, RunStart]:
    """The config to train with (``cfg``, or the run's own for ``resume=RUN``) and how the run
    starts, checked before anything is read.

    Raises:
        ResumeError: nothing to resume, a refused override or a checkpoint of another config,
            or a fresh run asked to train into a folder that already holds a run.
    """
    allow = bool(OmegaConf.select(cfg, "allow_config_change", default=False))
    if OmegaConf.select(cfg, "resume", default=None):
        cfg = _restore(cfg, Path(str(cfg.resume)).expanduser().absolute(), allow)
    out_dir = output_dir(cfg)
    ckpt = OmegaConf.select(cfg, "ckpt_path", default=None)
    has_run = (out_dir / "config.yaml").exists()
    if not ckpt:
        # Ranks > 0 of a multi-process run start after rank 0 has written config.yaml.
        if has_run and _global_rank() == 0:
            raise ResumeError(f"{out_dir} already holds a training run (config.yaml); continue it with "
                              f"`train.py resume={out_dir}`, or train into a new folder")
        taken = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
        if taken and _global_rank() == 0:
            raise ResumeError(f"{out_dir} already holds {', '.join(taken)}, which a training run writes; train into a "
                              "new folder (nothing there is overwritten)")
        return cfg, RunStart(out_dir)
    ckpt = Path(str(ckpt)).expanduser().absolute()
    if not ckpt.is_file():
        raise ResumeError(f"ckpt_path: checkpoint {ckpt} not found")
    import torch

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)  # our own Lightning checkpoint
    recorded = checkpoint.get(CONFIG_KEY)
    changed: tuple[str, ...] = ()
    if recorded is None:
        if not (allow or OmegaConf.select(cfg, "resume", default=None)):
            raise ResumeError(f"checkpoint {ckpt} records no run config (written before checkpoints did), so it "
                              "cannot be checked against this config; pass allow_config_change=true to continue it anyway")
        log.warning("checkpoint %s records no run config; continuing with the run folder's config", ckpt)
    else:
        changed = tuple(_differences(recorded, cfg))
        if changed and not allow:
            raise ResumeError(
                f"checkpoint {ckpt} was written with another config: {'; '.join(_describe(recorded, cfg, changed))}. "
                f"Continue its own run with `train.py resume=RUN` (RUN: the folder above checkpoints/), "
                "or pass allow_config_change=true to continue it with this config")
        if changed:
            log.warning("continuing %s with a changed config (allow_config_change=true): %s", ckpt, ", ".join(changed))
    _refuse_a_finished_run(cfg, out_dir, int(checkpoint.get("epoch", -1)) + 1)
    restart = _next_restart(out_dir) if has_run else 0
    start = RunStart(out_dir, ckpt, int(checkpoint.get("epoch", -1)), int(checkpoint.get("global_step", 0)), restart, changed)
    return cfg, start


def _refuse_a_finished_run(cfg: DictConfig, out_dir: Path, epochs: int) -> None:
    """``resume=`` of a run that reached its ``trainer.max_epochs`` and was scored (metrics.json)
    would only score it again, into a new config.resumed-<n>.yaml: refused, naming the way on."""
    limit = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if not OmegaConf.select(cfg, "resume", default=None) or not (out_dir / "metrics.json").is_file():
        return
    if isinstance(limit, int) and 0 <= limit <= epochs:
        raise ResumeError(f"resume={out_dir}: the run finished its {epochs} epoch{'s' * (epochs != 1)} "
                          f"(trainer.max_epochs={limit}) and was scored; to train it further, raise "
                          f"trainer.max_epochs (e.g. trainer.max_epochs={epochs + 10})")


def output_dir(cfg: DictConfig) -> Path:
    """The run folder: ``paths.output_dir``, else Hydra's output folder."""
    if "paths" in cfg:
        return Path(str(cfg.paths.output_dir)).absolute()
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir).absolute()


def write_run_config(start: RunStart, config: dict) -> Path:
    """Write the config a run (re)starts with (on global rank 0): ``config.yaml`` for a new run
    folder, else ``config.resumed-<n>.yaml`` with a header saying from where it continued."""
    if _global_rank() != 0:
        return start.out_dir / "config.yaml"
    start.out_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(OmegaConf.create(config))
    if start.restart == 0:
        path = start.out_dir / "config.yaml"
    else:
        path = start.out_dir / f"config.resumed-{start.restart}.yaml"
        header = [f"# restart {start.restart} at {datetime.datetime.now().isoformat(timespec='seconds')} from "
                  f"{start.checkpoint} (epoch {start.epoch}, step {start.global_step})"]
        if start.changed:
            header.append(f"# differs from the checkpoint's config at: {', '.join(start.changed)}")
        text = "\n".join(header) + "\n" + text
    path.write_text(text)
    return path


def continue_metrics_history(loggers: list[Any], start: RunStart) -> None:
    """On a restart, keep each CSV logger's rows up to the checkpoint (``step`` below its
    ``global_step``) in ``metrics.csv`` and let the logger append the rest; the file as it was
    is kept as ``metrics.before-resume-<n>.csv``. Call before the logger writes anything."""
    if start.checkpoint is None or _global_rank() != 0:
        return
    for logger in loggers:
        if not isinstance(logger, pl.loggers.CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header, rows = list(reader.fieldnames or []), list(reader)
        kept = [row for row in rows if row.get("step") not in (None, "") and float(row["step"]) < start.global_step]
        path.rename(path.with_name(f"metrics.before-resume-{max(start.restart, 1)}.csv"))
        with warnings.catch_warnings():  # Lightning warns it will clear the folder's metrics.csv: moved aside above
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            writer = logger.experiment
        with open(path, "w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=header)
            out.writeheader()
            out.writerows(kept)
        writer.metrics_keys = list(header)
        log.info("%s: kept %d of %d rows (steps before %d), appending from there", path, len(kept), len(rows), start.global_step)


def _global_rank() -> int:
    """This process's rank in a multi-process run, from the launcher's environment (0 alone)."""
    return int(getattr(pl.utilities.rank_zero_only, "rank", 0))


# -- restoring a run's config -------------------------------------------------------------------

def _restore(cfg: DictConfig, run_dir: Path, allow: bool) -> DictConfig:
    """The run's own config, with the command line's allowed overrides applied."""
    if OmegaConf.select(cfg, "ckpt_path", default=None):
        raise ResumeError("give either resume=RUN (continues RUN/checkpoints/last.ckpt) or ckpt_path=, not both")
    saved_path = run_config_path(run_dir)
    if not saved_path.is_file():
        raise ResumeError(f"resume={run_dir}: not a training run folder (no config.yaml or .hydra/config.yaml)")
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ResumeError(f"resume={run_dir}: no checkpoints/last.ckpt to continue from (runs with callbacks=none "
                          "save one only when they finish)")
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    old_dir = str((saved.get("paths") or {}).get("output_dir") or run_dir)
    if old_dir != str(run_dir):  # the folder was moved: its own paths move with it
        saved = _replace_prefix(saved, old_dir, str(run_dir))
    restored = OmegaConf.create(saved)
    _apply_overrides(cfg, restored, allow, run_dir)
    # The saved config is resolved: the post-fit figure step keeps the `figures` it started with
    # unless it follows the (resumable) top-level key again.
    if OmegaConf.select(restored, "evaluation.run_figures") is not None:
        OmegaConf.update(restored, "evaluation.run_figures.enabled", bool(restored.get("figures", True)))
    OmegaConf.update(restored, "paths.output_dir", str(run_dir), force_add=True)
    for key, value in (("resume", str(run_dir)), ("ckpt_path", str(last)), ("allow_config_change", allow)):
        OmegaConf.update(restored, key, value, force_add=True)
    return restored


def _apply_overrides(cfg: DictConfig, restored: DictConfig, allow: bool, run_dir: Path) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    groups = set(hydra_cfg.runtime.choices)
    refused = []
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if key in ("resume", "allow_config_change") or key.startswith(("hydra.", "hydra/")):
            continue
        if key in groups:
            raise ResumeError(f"resume={run_dir} keeps the run's config groups; `{override.input_line}` would change "
                              "what it learns: start a new run instead (model.init_from=RUN/checkpoints/last.ckpt "
                              "starts from its weights)")
        if key not in RESUMABLE_OVERRIDES and not allow:
            refused.append(override.input_line)
            continue
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(restored, parent) if parent else restored
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
            continue
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        OmegaConf.update(restored, key, value, force_add=True)
    if refused:
        raise ResumeError(f"resume={run_dir}: {', '.join(refused)} would change the run's config; a resumed run may "
                          f"only change {', '.join(RESUMABLE_OVERRIDES)} (pass allow_config_change=true to change "
                          "anything else)")


def _replace_prefix(node: Any, old: str, new: str) -> Any:
    """``node`` with every string (value or key) under the folder ``old`` moved under ``new``."""
    if isinstance(node, dict):
        return {_replace_prefix(k, old, new): _replace_prefix(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_prefix(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old.rstrip("/") + "/")):
        return new + node[len(old):]
    return node


def _next_restart(out_dir: Path) -> int:
    latest = run_config_path(out_dir)
    return int(latest.stem.rpartition("-")[2]) + 1 if latest.name.startswith("config.resumed-") else 1


# -- comparing configs --------------------------------------------------------------------------

def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _compared(key: str) -> bool:
    return not (key in _START_KEYS or key in RESUMABLE_OVERRIDES or key.startswith(_IGNORED_PREFIXES))


def _normalise(value: Any, out_dir: str) -> Any:
    return _replace_prefix(value, out_dir, _RUN_PLACEHOLDER) if out_dir else value


def _differences(recorded: dict, cfg: DictConfig) -> list[str]:
    """Keys whose values differ between a checkpoint's recorded config and ``cfg``. Values are
    resolved one key at a time and the cohort manifest last, so a config that differs elsewhere
    is refused before its `${phantom:...}` cohort would be generated."""
    rec_dir = str((recorded.get("paths") or {}).get("output_dir") or "")
    cur_dir = str(OmegaConf.select(cfg, "paths.output_dir", default="") or "")
    theirs = {k: _normalise(v, rec_dir) for k, v in _leaves(recorded).items() if _compared(k)}
    mine: dict[str, Any] = {}
    for key in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if _compared(key) and key != "data.manifest":
            value = _select(cfg, key)  # an interpolated node may resolve to a whole sub-config
            mine.update(_leaves(value, f"{key}.") if isinstance(value, dict) and value else {key: value})
    mine = {k: _normalise(v, cur_dir) for k, v in mine.items()}
    for key, rule in ADDED_LATER.items():
        if key not in theirs:
            value = rule(theirs)
            theirs[key] = mine.get(key, _Absent) if value is ANY_VALUE else value
    differ = [k for k in dict.fromkeys([*theirs, *mine]) if k != "data.manifest" and theirs.get(k, _Absent) != mine.get(k, _Absent)]
    if not differ and _normalise(_select(cfg, "data.manifest"), cur_dir) != theirs.get("data.manifest", _Absent):
        differ.append("data.manifest")
    return differ


class _Absent:
    """Marks a key one of two configs lacks."""


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_Absent)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _show(value: Any) -> str:
    return "(absent)" if value is _Absent else repr(value)


def _describe(recorded: dict, cfg: DictConfig, keys: tuple[str, ...], limit: int = 4) -> list[str]:
    rec = _leaves(recorded)
    parts = []
    for key in keys[:limit]:
        parts.append(f"{key} = {_show(rec.get(key, _Absent))} in the checkpoint, {_show(_select(cfg, key))} now")
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more ({', '.join(keys[limit:])})")
    return parts

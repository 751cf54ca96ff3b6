"""Checks of a composed `train.py` / `infer.py` config, before any file is read.

`check_train_config` and `check_infer_config` look at the values a user sets (sizes, fractions,
batch size, learning rate, epochs, ...) and raise one :class:`ConfigError` listing every problem,
each with its key, as `load_manifest` does for a cohort. Keys absent from the config (another
model's options, a group not selected) are skipped; only the keys named here are resolved, so a
check never triggers an interpolation's side effect (such as generating the synthetic cohort).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ConfigError", "check_train_config", "check_infer_config", "check_output_writable"]


class ConfigError(ValueError):
    """A composed config cannot be used; the message lists every problem with its key."""

    def __init__(self, problems: list[str], what: str = "config"):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = f"invalid {what}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"invalid {what} ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


@dataclass(frozen=True)
class _Rule:
    expect: str
    ok: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _numbers(v: Any, n: int) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == n and all(_is_number(x) for x in v)


POSITIVE_INT = _Rule("a positive integer", lambda v: _is_int(v) and v >= 1)
NON_NEGATIVE_INT = _Rule("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE = _Rule("a positive number", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE = _Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)
FRACTION = _Rule("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1)
BELOW_ONE = _Rule("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
BOOL = _Rule("true or false", lambda v: isinstance(v, bool))
POSITIVE_TRIPLE = _Rule("3 positive numbers [z, y, x] in um", lambda v: _numbers(v, 3) and all(x > 0 for x in v))
POSITIVE_INT_TRIPLE = _Rule("3 positive integers [z, y, x]", lambda v: _numbers(v, 3) and all(_is_int(x) and x >= 1 for x in v))
EPOCHS = _Rule("a positive integer (or -1: no limit)", lambda v: _is_int(v) and (v >= 1 or v == -1))
BATCH_LIMIT = _Rule("an integer >= 0 (batches) or a fraction in [0, 1]",
                    lambda v: (_is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1))
VOXEL_SIZE = _Rule("null, a positive number or 3 positive numbers [z, y, x] in um",
                   lambda v: v is None or (_is_number(v) and v > 0) or POSITIVE_TRIPLE.ok(v))
NON_NEGATIVE_LIST = _Rule("a list of numbers >= 0", lambda v: isinstance(v, (list, tuple)) and all(_is_number(x) and x >= 0 for x in v))


def _optional(rule: _Rule) -> _Rule:
    return _Rule(f"null or {rule.expect}", lambda v: v is None or rule.ok(v))


def _choice(*options: Any) -> _Rule:
    return _Rule("one of " + ", ".join(repr(o) for o in options), lambda v: v in options)


TRAIN_RULES: dict[str, _Rule] = {
    "seed": NON_NEGATIVE_INT,
    "data.batch_size": POSITIVE_INT,
    "data.num_workers": NON_NEGATIVE_INT,
    "data.max_residual_um": POSITIVE,
    "data.max_drop_fraction": FRACTION,
    "data.slab_margin_um": NON_NEGATIVE,
    "data.cache_dtype": _choice("uint8", "float16"),
    "sampler.patch_size_um": _Rule("3 positive numbers [depth, height, width] in um",
                                   lambda v: _numbers(v, 3) and all(x > 0 for x in v)),
    "sampler.voxel_size_um": VOXEL_SIZE,
    "sampler.cap": NON_NEGATIVE_INT,
    "sampler.fraction": NON_NEGATIVE,
    "split.block_um": POSITIVE,
    "split.buffer_um": _optional(NON_NEGATIVE),
    "split.val_fraction": BELOW_ONE,
    "target.kind": _choice("composition", "log_expression", "counts"),
    "target.renormalize": BOOL,
    "target.n_top": _optional(POSITIVE_INT),
    "target.target_sum": _optional(POSITIVE),
    "target.n_programs": _Rule("an integer >= 2", lambda v: _is_int(v) and v >= 2),
    "target.n_genes": POSITIVE_INT,
    "target.n_pcs": POSITIVE_INT,
    "model.lr": POSITIVE,
    "model.weight_decay": NON_NEGATIVE,
    "model.warmup_steps": NON_NEGATIVE_INT,
    "model.min_lr_ratio": FRACTION,
    "model.ema_decay": _optional(_Rule("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1)),
    "model.scheduler": _choice("cosine", "none", None),
    "model.backbone.dropout": BELOW_ONE,
    "model.backbone.drop_rate": BELOW_ONE,
    "trainer.max_epochs": EPOCHS,
    "trainer.min_epochs": NON_NEGATIVE_INT,
    "trainer.gradient_clip_val": _optional(NON_NEGATIVE),
    "trainer.log_every_n_steps": POSITIVE_INT,
    "trainer.check_val_every_n_epoch": _optional(POSITIVE_INT),
    "trainer.limit_train_batches": BATCH_LIMIT,
    "trainer.limit_val_batches": BATCH_LIMIT,
    "trainer.limit_test_batches": BATCH_LIMIT,
    "callbacks.early_stopping.patience": NON_NEGATIVE_INT,
    "off_plane.n_points": POSITIVE_INT,
    "off_plane.distances_um": NON_NEGATIVE_LIST,
    "off_plane.batch_size": POSITIVE_INT,
}

INFER_RULES: dict[str, _Rule] = {
    "spacing_um": POSITIVE_TRIPLE,
    "tile_vox": _Rule("'auto' or 3 positive integers [z, y, x]", lambda v: v == "auto" or POSITIVE_INT_TRIPLE.ok(v)),
    "mode": _choice("dense", "patch"),
    "overlap": _optional(BELOW_ONE),
    "batch_size": POSITIVE_INT,
    "prefetch": _optional(NON_NEGATIVE_INT),
    "readers": _optional(POSITIVE_INT),
    "pad_tiles": _optional(BOOL),
    "cudnn_benchmark": BOOL,
    "compile": BOOL,
    "precision": _choice("auto", "fp32", "bf16"),
    "levels": POSITIVE_INT,
    "voxel_size_um": VOXEL_SIZE,
    "resample": BOOL,
    "overwrite": BOOL,
    "mask.window_um": POSITIVE,
    "mask.stride_um": POSITIVE,
    "mask.min_object_um2": NON_NEGATIVE,
    "mask.feature": _choice("std", "mean"),
    "eval_distances_um": NON_NEGATIVE_LIST,
    "genes": _optional(_Rule("a list of gene names", lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                             and all(isinstance(g, str) and g for g in v))),
}

_ABSENT = object()


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _apply(cfg: DictConfig, rules: dict[str, _Rule]) -> list[str]:
    problems = []
    for key, rule in rules.items():
        value = _value(cfg, key)
        if value is not _ABSENT and not rule.ok(value):
            problems.append(f"{key}: must be {rule.expect}, got {value!r}")
    return problems


def _split_fractions(cfg: DictConfig) -> list[str]:
    value = _value(cfg, "split.fractions")
    if value is _ABSENT:
        return []
    if not (_numbers(value, 3) and all(x >= 0 for x in value)):
        return [f"split.fractions: must be 3 numbers >= 0 (train, val, test), got {value!r}"]
    if value[0] <= 0 or value[1] <= 0:
        return [f"split.fractions: the train and val fractions must be positive (validation picks the "
                f"checkpoint and stops early), got {value!r}"]
    return []


def _epochs(cfg: DictConfig) -> list[str]:
    low, high = _value(cfg, "trainer.min_epochs"), _value(cfg, "trainer.max_epochs")
    if _is_int(low) and _is_int(high) and high != -1 and low > high:
        return [f"trainer.min_epochs ({low}) is larger than trainer.max_epochs ({high})"]
    return []


def _genes(cfg: DictConfig) -> list[str]:
    target = _value(cfg, "target._target_")
    if not (isinstance(target, str) and target.endswith("GenesTarget")):
        return []
    if (_value(cfg, "target.genes") is None) == (_value(cfg, "target.n_top") is None):
        return ["target: give exactly one of target.genes (a list) and target.n_top (an int)"]
    return []


def check_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every out-of-range value of a `train.py` config."""
    problems = _apply(cfg, TRAIN_RULES) + _split_fractions(cfg) + _epochs(cfg) + _genes(cfg)
    if problems:
        raise ConfigError(problems, "training config")


def check_infer_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every out-of-range value of an `infer.py` config."""
    problems = _apply(cfg, INFER_RULES)
    if _value(cfg, "run") in (_ABSENT, None, ""):
        problems.append("run: give the training run folder (or a checkpoint in one): infer.py run=RUN")
    if problems:
        raise ConfigError(problems, "inference config")


def check_output_writable(path: str | os.PathLike, key: str = "output") -> None:
    """Raise :class:`ConfigError` unless ``path`` is, or can be created as, a writable folder.

    Checks the folder itself or its nearest existing parent, by creating (and at once removing)
    a temporary file there: permissions, read-only file systems and files in the way all show.
    """
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise ConfigError([f"{key}: {path} {where}, not a folder"], "output")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError([f"{key}: cannot write to {existing} ({err.strerror or err})"], "output") from None

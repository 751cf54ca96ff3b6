"""Checks of a composed `train.py` / `infer.py` config, before any file is read.

`check_train_config` and `check_infer_config` raise one :class:`ConfigError` listing every
problem, each with its key, as `load_manifest` does for a cohort:

- unknown keys: a node with a `_target_` may hold its callable's parameters; every other node
  has a schema here (a dataclass: its fields are the keys the node may hold, their annotations
  the types its values must have), so a misspelt key in a config file or a `+key=` override
  fails instead of being ignored;
- wrong types (from the schemas) and out-of-range values (`TRAIN_RULES`, `INFER_RULES`: sizes,
  fractions, batch size, learning rate, epochs, ...).

Keys absent from the config (another model's options, a group not selected, a run folder written
before a key existed) are skipped; only the keys named by a rule or typed by a schema are
resolved, so a check never triggers an interpolation's side effect (such as generating the
synthetic cohort). `compose` builds the config of the entry points outside a Hydra app (tests,
benchmarks, notebooks).
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
import types
import typing
from collections import abc
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

__all__ = ["ConfigError", "check_train_config", "check_infer_config", "check_output_writable", "schema_problems",
           "compose", "sync_patch", "CONF_DIR", "TrainConfig", "InferConfig", "PatchConfig"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


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
FRACTION_LIST = _Rule("a list of numbers in [0, 1]", lambda v: isinstance(v, (list, tuple)) and all(FRACTION.ok(x) for x in v))


def _optional(rule: _Rule) -> _Rule:
    return _Rule(f"null or {rule.expect}", lambda v: v is None or rule.ok(v))


def _choice(*options: Any) -> _Rule:
    return _Rule("one of " + ", ".join(repr(o) for o in options), lambda v: v in options)


TRAIN_RULES: dict[str, _Rule] = {
    "seed": NON_NEGATIVE_INT,
    "data.seed": NON_NEGATIVE_INT,
    "data.manifest": _Rule("the path of a cohort manifest, e.g. data.manifest=my/cohort.yaml",
                           lambda v: isinstance(v, str) and bool(v.strip())),
    "data.batch_size": POSITIVE_INT,
    "data.num_workers": NON_NEGATIVE_INT,
    "data.max_residual_um": POSITIVE,
    "data.max_drop_fraction": FRACTION,
    "data.train_fraction": _Rule("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "data.slab_margin_um": NON_NEGATIVE,
    "data.cache_dtype": _choice("uint8", "float16"),
    "patch.size_um": _Rule("3 positive numbers [depth, height, width] in um",
                           lambda v: _numbers(v, 3) and all(x > 0 for x in v)),
    "patch.voxel_size_um": VOXEL_SIZE,
    "patch.context_um": _optional(POSITIVE_TRIPLE),
    "patch.context_edges": _choice("mirror", "fill"),
    "sampler.patch_size_um": _Rule("3 positive numbers [depth, height, width] in um",
                                   lambda v: _numbers(v, 3) and all(x > 0 for x in v)),
    "sampler.voxel_size_um": VOXEL_SIZE,
    "sampler.context_edges": _choice("mirror", "fill"),
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
    # model=forest (and model=ridge's air_threshold)
    "model.sigmas_um": _Rule("a list of positive scales in um", lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                             and all(_is_number(x) and x > 0 for x in v)),
    "model.air_threshold": FRACTION,
    "model.bright_threshold": FRACTION,
    "model.distance_below": FRACTION_LIST,
    "model.distance_above": FRACTION_LIST,
    "model.distance_cap_um": POSITIVE,
    "model.share_below": FRACTION_LIST,
    "model.share_above": FRACTION_LIST,
    "model.n_trees": POSITIVE_INT,
    "model.min_samples_leaf": POSITIVE_INT,
    "model.max_features": _Rule("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
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
    "baselines.knn_k": POSITIVE_INT,
}

INFER_RULES: dict[str, _Rule] = {
    "spacing_um": POSITIVE_TRIPLE,
    "tile_vox": _Rule("'auto' or 3 positive integers [z, y, x]", lambda v: v == "auto" or POSITIVE_INT_TRIPLE.ok(v)),
    "mode": _choice("dense", "patch"),
    "overlap": _optional(BELOW_ONE),
    "batch_size": _optional(POSITIVE_INT),
    "prefetch": _optional(NON_NEGATIVE_INT),
    "readers": _optional(POSITIVE_INT),
    "precision": _choice("auto", "fp32", "bf16"),
    "levels": POSITIVE_INT,
    "voxel_size_um": VOXEL_SIZE,
    "mask.window_um": POSITIVE,
    "mask.stride_um": POSITIVE,
    "mask.min_object_um2": NON_NEGATIVE,
    "mask.feature": _choice("std", "mean"),
    "eval_distances_um": NON_NEGATIVE_LIST,
    # uncertainty and out-of-distribution (xpression.inference.uncertainty)
    "uncertainty": _choice("none", "ensemble", "mc_dropout", "trees"),
    "members": _optional(_Rule("a list of run folders or checkpoints", lambda v: isinstance(v, (list, tuple)) and len(v) >= 1
                                 and all(isinstance(x, str) and x for x in v))),
    "mc_samples": _Rule("an integer >= 2", lambda v: _is_int(v) and v >= 2),
    "mc_seed": NON_NEGATIVE_INT,
    "calibrate": BOOL,
    "ood": BOOL,
    "ood_method": _choice("knn", "mahalanobis"),
    "genes": _optional(_Rule("a list of gene names", lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                             and all(isinstance(g, str) and g for g in v))),
}

# python -m xpression.pretrain (conf/pretrain.yaml); the patch and the model are checked as for train.py
PRETRAIN_RULES: dict[str, _Rule] = {
    "seed": NON_NEGATIVE_INT,
    "pretrain.patches_per_volume": POSITIVE_INT,
    "pretrain.planes_per_volume": POSITIVE_INT,
    "pretrain.steps": POSITIVE_INT,
    "pretrain.max_minutes": _optional(POSITIVE),
    "pretrain.batch_size": POSITIVE_INT,
    "pretrain.lr": POSITIVE,
    "pretrain.weight_decay": NON_NEGATIVE,
    "pretrain.warmup_steps": NON_NEGATIVE_INT,
    "pretrain.mask_block_um": POSITIVE_TRIPLE,
    "pretrain.mask_ratio": _Rule("a fraction in (0, 1)", lambda v: _is_number(v) and 0 < v < 1),
    "pretrain.decoder_channels": POSITIVE_INT,
    "pretrain.dropout": _optional(BELOW_ONE),
    "pretrain.eval_every": POSITIVE_INT,
    "pretrain.eval_patches": POSITIVE_INT,
    "pretrain.progress": BOOL,
    "patch.size_um": TRAIN_RULES["patch.size_um"],
    "patch.voxel_size_um": VOXEL_SIZE,
}

_ABSENT = object()


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _interpolated(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and OmegaConf.is_interpolation(node, leaf)


def _apply(cfg: DictConfig, rules: dict[str, _Rule]) -> list[str]:
    """Out-of-range values; a key that only repeats another (an interpolation) is checked there."""
    problems = []
    for key, rule in rules.items():
        if _interpolated(cfg, key):
            continue
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
    if abs(sum(value) - 1.0) > 1e-6:  # [0.9, 0.9, 0.1] is a typo more often than weights meant as such
        return [f"split.fractions: the train, val and test shares must sum to 1, got {value!r} (sum {sum(value):g})"]
    return []


def _epochs(cfg: DictConfig) -> list[str]:
    low, high = _value(cfg, "trainer.min_epochs"), _value(cfg, "trainer.max_epochs")
    if _is_int(low) and _is_int(high) and high != -1 and low > high:
        return [f"trainer.min_epochs ({low}) is larger than trainer.max_epochs ({high})"]
    steps = _value(cfg, "trainer.max_steps")
    if high == -1 and steps in (_ABSENT, None, -1) and _value(cfg, "model.scheduler") == "cosine":
        return ["trainer.max_epochs=-1 (no limit) leaves the cosine learning-rate schedule without an end: "
                "set model.scheduler=none, a trainer.max_epochs, or +trainer.max_steps=N"]
    return []


def _genes(cfg: DictConfig) -> list[str]:
    target = _value(cfg, "target._target_")
    if not (isinstance(target, str) and target.endswith("GenesTarget")):
        return []
    if (_value(cfg, "target.genes") is None) == (_value(cfg, "target.n_top") is None):
        return ["target: give exactly one of target.genes (a list) and target.n_top (an int)"]
    return []


def sync_patch(cfg: DictConfig) -> None:
    """Let a sampler's own patch (`sampler.patch_size_um=...`, `sampler.voxel_size_um=...`, the
    spelling before the patch group) set the patch group, in place: the sampler cuts its patches
    with it either way, the config a run records then names one patch, and errors name the key
    the user set."""
    sampler, patch = cfg.get("sampler"), cfg.get("patch")
    if not isinstance(sampler, DictConfig) or not isinstance(patch, DictConfig):
        return
    for own, shared in (("patch_size_um", "size_um"), ("voxel_size_um", "voxel_size_um"), ("context_um", "context_um"),
                        ("context_edges", "context_edges")):
        if own in sampler and not OmegaConf.is_interpolation(sampler, own):
            with open_dict(patch):
                patch[shared] = f"${{sampler.{own}}}"


def _missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys whose value is ``???``, not resolving any interpolation."""
    found = []
    for key in node.keys():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key == "hydra" or OmegaConf.is_interpolation(node, key):
            continue
        if OmegaConf.is_missing(node, key):
            found.append(name)
        elif isinstance(node._get_node(key), DictConfig):
            found += _missing_keys(node._get_node(key), name)
    return found


def _missing(cfg: DictConfig) -> list[str]:
    problems = []
    for key in _missing_keys(cfg):
        if key == "model.backbone":
            problems.append("model.backbone: missing; choose a network preset (model=cnn3d, model=unet, ...) "
                            "or a backbone (model/backbone=...)")
        else:
            problems.append(f"{key}: missing value (???)")
    return problems


def _one_per_key(problems: list[str]) -> list[str]:
    """The first problem of each key (a value of the wrong type is also out of range)."""
    seen, kept = set(), []
    for problem in problems:
        key = problem.split(":", 1)[0]
        if key not in seen:
            seen.add(key)
            kept.append(problem)
    return kept


def check_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every unknown key, value of the wrong type and
    out-of-range value of a `train.py` config."""
    problems = (_missing(cfg) + schema_problems(cfg, TrainConfig) + _target_problems(cfg)
                + _apply(cfg, TRAIN_RULES) + _split_fractions(cfg) + _epochs(cfg) + _genes(cfg))
    if problems:
        raise ConfigError(_one_per_key(problems), "training config")


def check_pretrain_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every out-of-range value of a pretraining config."""
    problems = _apply(cfg, PRETRAIN_RULES)
    if problems:
        raise ConfigError(problems, "pretraining config")


def check_infer_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every unknown key, value of the wrong type and
    out-of-range value of an `infer.py` config."""
    problems = _one_per_key(schema_problems(cfg, InferConfig) + _apply(cfg, INFER_RULES))
    ensemble_members = _value(cfg, "uncertainty") == "ensemble" and _value(cfg, "members") not in (_ABSENT, None)
    if _value(cfg, "run") in (_ABSENT, None, "") and not ensemble_members:
        problems.append("run: give the training run folder (or a checkpoint in one): infer.py run=RUN")
    problems += _ignored_trust_settings(cfg)
    if problems:
        raise ConfigError(problems, "inference config")


# calibrate=true without an uncertainty method: said here, before anything is read, and by
# xpression.inference.uncertainty.trust_predictor to callers outside infer.py
CALIBRATE_NEEDS_METHOD = ("calibrate=true scales the <target>_sd channels, which only an uncertainty method adds: "
                          "add uncertainty=ensemble, mc_dropout or trees")


def _ignored_trust_settings(cfg: DictConfig) -> list[str]:
    """Settings of an uncertainty method given without the method, which would do nothing."""
    method = _value(cfg, "uncertainty")
    problems = []
    if _value(cfg, "calibrate") is True and method in (_ABSENT, None, "none"):
        problems.append(CALIBRATE_NEEDS_METHOD)
    if _value(cfg, "members") not in (_ABSENT, None) and method != "ensemble":
        problems.append(f"members: an ensemble's runs, but uncertainty={method}: add uncertainty=ensemble")
    return problems


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


# -- schemas: the keys a node may hold and the types of their values -------------------------------
# Fields typed Any are checked for their keys only (never resolved): groups whose nodes carry a
# `_target_` (checked against their callable by `_target_problems`) or free-form options.


@dataclass
class PatchConfig:
    """The patch a model sees (conf/patch/): field of view and model voxel size, um."""

    size_um: list[float]
    voxel_size_um: float | list[float] | None = None
    context_um: list[float] | None = None  # a multi-scale model's context view [z, y, x]; None = patch only
    context_edges: str = "mirror"  # what that view sees past the volume's faces: mirror | fill


@dataclass
class BaselinesConfig:
    """The baselines scored beside a trained model (train.yaml)."""

    ridge: bool = True
    knn_k: int = 6


@dataclass
class PathsConfig:
    """Where things live (conf/paths/); resolved by Hydra at run time."""

    root_dir: Any = None
    data_dir: Any = None
    log_dir: Any = None
    output_dir: Any = None


@dataclass
class TrainConfig:
    """The top level of a `train.py` config: its own keys and one node per config group."""

    task_name: str = "train"
    seed: int = 0
    resume: str | None = None
    allow_config_change: bool = False
    ckpt_path: str | None = None
    optimized_metric: str | None = None
    baselines: BaselinesConfig | None = None
    figures: bool = True
    paths: PathsConfig | None = None
    patch: PatchConfig | None = None
    data: Any = None
    target: Any = None
    sampler: Any = None
    split: Any = None
    model: Any = None
    loss: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    evaluation: Any = None
    off_plane: Any = None
    hydra: Any = None


@dataclass
class MaskConfig:
    """The tissue mask of a sweep (conf/infer/mask/; xpression.data.mask.tissue_mask)."""

    enabled: bool = True
    feature: str = "std"
    window_um: float = 102.4
    stride_um: float = 25.6
    min_object_um2: float = 1.0e5
    fill_holes: bool = True


@dataclass
class InferConfig:
    """The top level of an `infer.py` config: its own keys and those of its groups (conf/infer/:
    grid, sweep, outputs and evaluation are set at the top level; the mask under ``mask.``)."""

    task_name: str = "infer"
    run: str | None = None
    checkpoint: str = "best"
    cohort: str | None = None
    volumes: list[str] | None = None
    volume: str | None = None
    volume_id: str | None = None
    voxel_size_um: float | list[float] | None = None
    resample: bool = False
    output: Any = None  # ${paths.output_dir}: resolved by Hydra at run time
    overwrite: bool = False
    progress: bool = True
    scan_check: bool = True
    uncertainty: str = "none"
    members: list[str] | None = None
    mc_samples: int = 20
    mc_seed: int = 0
    calibrate: bool = False
    ood: bool = False
    ood_method: str = "mahalanobis"
    genes: list[str] | None = None
    paths: PathsConfig | None = None
    # infer/grid
    spacing_um: list[float] | None = None
    mode: str = "dense"
    # infer/sweep
    tile_vox: str | list[int] = "auto"
    overlap: float | None = None
    batch_size: int | None = None
    prefetch: int | None = None
    readers: int | None = None
    pad_tiles: bool | None = None
    cudnn_benchmark: bool = True
    compile: bool = False
    device: str = "auto"
    precision: str = "auto"
    # infer/mask
    mask: MaskConfig | None = None
    # infer/outputs
    levels: int = 3
    ct_preview: bool = True
    bigtiff: bool = False
    exports: list[str] | None = None
    figures: bool = True
    # infer/evaluation
    evaluate: bool = True
    eval_distances_um: list[float] | None = None
    hydra: Any = None


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (plain data) has the type ``hint`` (a schema annotation)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, abc.Sequence):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0] if args else Any) for v in value)
    if is_dataclass(hint):
        return isinstance(value, Mapping)
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple, abc.Sequence):
        inner = {int: "integers", float: "numbers", str: "strings"}.get(args[0] if args else None, "values")
        return f"a list of {inner}"
    if is_dataclass(hint):
        return "a mapping"
    return str(hint)


def _schema_of(hint: Any) -> type | None:
    candidates = [hint, *typing.get_args(hint)]
    return next((c for c in candidates if is_dataclass(c)), None)


def schema_problems(node: DictConfig | Mapping[str, Any], schema: type, prefix: str = "") -> list[str]:
    """Unknown keys of ``node`` and values of the wrong type, against the dataclass ``schema``
    (nested dataclass fields are checked as nodes of their own; fields typed Any are not
    resolved). Keys are named from ``prefix``."""
    hints = typing.get_type_hints(schema)
    problems = []
    for key in list(node.keys()):
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            problems.append(f"{name}: unknown key (known: {', '.join(sorted(k for k in hints if k != 'hydra'))})")
            continue
        hint = hints[key]
        if hint is Any or (isinstance(node, DictConfig) and OmegaConf.is_missing(node, key)):
            continue
        child = node._get_node(key) if isinstance(node, DictConfig) else node[key]
        nested = _schema_of(hint)
        if nested is not None and isinstance(child, (DictConfig, Mapping)):
            problems += schema_problems(child, nested, name)
            continue
        try:
            value = node[key]
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except InterpolationResolutionError as err:  # e.g. computed from a bad value listed on its own
            cause = str(err).splitlines()[0].split("while resolving interpolation: ")[-1]
            problems.append(f"{name}: cannot be computed from the keys it follows ({cause})")
            continue
        if not _fits(value, hint):
            problems.append(f"{name}: must be {_describe(hint)}, got {value!r}")
    return problems


_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def _target_nodes(node: DictConfig, prefix: str) -> list[tuple[str, DictConfig]]:
    """Every node with a `_target_` under ``node``, not following interpolations."""
    found = []
    for key in node.keys():
        if key == "hydra" or OmegaConf.is_interpolation(node, key):
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            name = f"{prefix}.{key}" if prefix else str(key)
            if "_target_" in child and not OmegaConf.is_interpolation(child, "_target_"):
                found.append((name, child))
            found += _target_nodes(child, name)
    return found


def _target_problems(cfg: DictConfig) -> list[str]:
    """Keys of `_target_` nodes that their callable does not take (unless it takes **kwargs)."""
    from hydra.utils import get_object

    problems = []
    for name, node in _target_nodes(cfg, ""):
        target = str(node._get_node("_target_")._value())
        try:
            params = inspect.signature(get_object(target)).parameters
        except Exception as err:  # an import error or a name that is not there
            problems.append(f"{name}._target_: cannot load {target!r} ({type(err).__name__}: {err})")
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        known = {p for p in params if p not in ("self", "args")}
        for key in sorted(set(node.keys()) - known - _HYDRA_KEYS):
            problems.append(f"{name}.{key}: unknown key for {target} (it takes: {', '.join(sorted(known))})")
    return problems


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """The config `train.py` / `infer.py` composes from ``conf/`` with these command-line
    overrides, for use outside a Hydra app (tests, benchmarks, notebooks): Hydra's own node and
    `${hydra:...}` are not available, so set ``paths.output_dir`` (or ``hydra.run.dir``'s
    equivalent) yourself before resolving paths. Resolving ``${phantom:...}`` needs
    ``xpression.resolvers.register_resolvers()`` first (train.py, infer.py and the tests' conftest
    call it; this module stays free of project imports)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))

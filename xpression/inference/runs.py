"""A trained model as the sweep needs it: from a checkpoint file (or a run folder holding one).

Every checkpoint ``train.py`` writes carries the model's :class:`~xpression.data.input_spec.InputSpec`
(patch, voxel size, spot radius, normalisation with its reference histogram, quantisation,
targets, model class and dense geometry) and the run's config: ``infer.py run=<file.ckpt>``
needs nothing else. The run config is only consulted for defaults (the training cohort to
sweep when none is given, the trained sections marked in figures).

Checkpoints written before checkpoints carried an input spec are read with the old contract:
the run folder's ``config.yaml`` (a resumed run's last ``config.resumed-<n>.yaml``) and
``metrics.json`` give the voxel size, normalisation and quantisation; without them the sweep
stops with an error naming what is missing (never a silent default).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from xpression.data.geometry import DataError
from xpression.data.input_spec import INPUT_SPEC_KEY, InputSpec, IntensitySpec, resolve_reference
from xpression.data.manifest import load_manifest
from xpression.data.registration import SPOT_RADIUS_UM
from xpression.inference.predictor import InferenceError, Predictor
from xpression.models.module import XPressionModule
from xpression.runfolder import RUN_CONFIG_KEY, run_config_path

__all__ = ["RunInfo", "resolve_run", "load_predictor", "load_model"]


@dataclass
class RunInfo:
    """A checkpoint and what it says about its run. ``spec``: the model's input contract;
    ``config``: the run's resolved config (plain dict; may be empty); ``sha256``: of the file."""

    run_dir: Path
    checkpoint: Path
    spec: InputSpec
    config: dict = field(default_factory=dict)
    sha256: str = ""
    state: dict = field(default_factory=dict, repr=False)  # the loaded checkpoint

    @property
    def voxel_size_um(self) -> tuple[float, float, float]:
        """The model's voxel size (z, y, x) in um."""
        return self.spec.voxel_size_um

    @property
    def manifest(self) -> Path | None:
        """The training cohort (the default volumes to sweep), if the run recorded one."""
        m = _select(self.config, "data.manifest")
        return None if m is None else Path(str(m))

    @property
    def trained_sections(self) -> list[str] | None:
        s = _select(self.config, "data.sections")
        return None if s is None else [str(x) for x in s]

    def identity(self) -> dict:
        return {"checkpoint_sha256": self.sha256, "run_dir": str(self.run_dir)}


def _select(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _find_checkpoint(run: str | Path, checkpoint: str) -> tuple[Path, Path]:
    path = Path(run).expanduser()
    if not path.exists():
        raise InferenceError(f"run {path} not found (give a training run folder or a .ckpt file)")
    if path.is_file():
        return path, (path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    name = checkpoint if checkpoint.endswith(".ckpt") else f"{checkpoint}.ckpt"
    ckpt = path / "checkpoints" / name
    if name == "best.ckpt" and not ckpt.exists() and (path / "checkpoints" / "last.ckpt").exists():
        ckpt = path / "checkpoints" / "last.ckpt"  # runs without a monitored checkpoint keep only their final weights
    if not ckpt.exists():
        found = sorted(p.name for p in (path / "checkpoints").glob("*.ckpt")) if (path / "checkpoints").exists() else []
        raise InferenceError(f"{ckpt} not found in run {path}; checkpoints there: {found or 'none'}")
    return ckpt, path


def resolve_run(run: str | Path, checkpoint: str = "best") -> RunInfo:
    """The checkpoint of ``run`` (a ``.ckpt`` file, or a run folder: ``checkpoint`` is ``best``,
    ``last`` or a file name under its ``checkpoints/``) with its input spec.

    Raises :class:`InferenceError` when the checkpoint is missing or unreadable, or (an old
    checkpoint without a spec) when its run folder lacks what the spec would have said.
    """
    ckpt, run_dir = _find_checkpoint(run, checkpoint)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)  # our own checkpoint (trusted local file)
    except Exception as exc:
        raise InferenceError(f"cannot load checkpoint {ckpt}: {exc}") from exc
    if not isinstance(state, dict) or "state_dict" not in state:
        raise InferenceError(f"{ckpt} is not an X-Pression checkpoint (no state_dict)")
    config = state.get(RUN_CONFIG_KEY) or _folder_config(run_dir) or {}
    if state.get(INPUT_SPEC_KEY) is not None:
        try:
            spec = InputSpec.from_dict(state[INPUT_SPEC_KEY], where=ckpt)
        except DataError as err:
            raise InferenceError(str(err)) from err
    else:
        spec = _legacy_spec(ckpt, run_dir, state, config)
    return RunInfo(run_dir.resolve(), ckpt.resolve(), spec, config, _sha256(ckpt), state)


def _folder_config(run_dir: Path) -> dict | None:
    path = run_config_path(run_dir)
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None


def _legacy_spec(ckpt: Path, run_dir: Path, state: dict, config: dict) -> InputSpec:
    """The input spec of a checkpoint written before checkpoints carried one, rebuilt from its
    run folder's config and metrics.json (the previous contract)."""
    hp = state.get("hyper_parameters") or {}
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    voxel = metrics.get("voxel_size_um") or _select(config, "sampler.voxel_size_um")
    missing = [what for what, ok in (("the run config (config.yaml)", bool(config)),
                                     ("the model voxel size (metrics.json or sampler.voxel_size_um)", voxel is not None),
                                     ("the targets (hyper_parameters.target_spec)", "target_spec" in hp)) if not ok]
    if missing:
        raise InferenceError(
            f"checkpoint {ckpt} records no input spec (it was written before checkpoints carried one), and its run "
            f"folder {run_dir} lacks {', '.join(missing)}; give the run folder train.py wrote, or retrain")
    data = config.get("data") or {}
    reference = data.get("intensity_reference")
    seed = int(_select(config, "data.seed") or config.get("seed") or 0)
    try:
        ref = resolve_reference(reference, load_manifest(data["manifest"])) if reference else None
        intensity = IntensitySpec.fit(data.get("intensity", "robust"), *(ref or (None, None)), seed=seed)
        vs = np.broadcast_to(np.asarray(voxel, float), (3,))
        patch = hp.get("patch_shape") or metrics.get("patch_shape_vox")
        size = _select(config, "sampler.patch_size_um") or list(np.asarray(patch, float) * vs)
        return InputSpec.build(size, vs, patch, SPOT_RADIUS_UM, intensity, data.get("cache_dtype", "uint8"), hp["target_spec"])
    except (DataError, KeyError, TypeError, ValueError) as err:
        raise InferenceError(f"checkpoint {ckpt} (no input spec): cannot rebuild it from {run_dir}: {err}") from err


def load_model(info: RunInfo) -> torch.nn.Module:
    """The checkpoint's model: the class its input spec records (a class with
    ``from_checkpoint(dict)``; old checkpoints: ``XPressionModule``)."""
    cls_path = info.spec.model.get("class")
    cls: Any = XPressionModule
    if cls_path:
        module, _, name = str(cls_path).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise InferenceError(f"checkpoint {info.checkpoint}: model class {cls_path} cannot be imported: {exc}") from exc
    try:
        model = cls.from_checkpoint(info.state)
    except Exception as exc:
        raise InferenceError(f"cannot load checkpoint {info.checkpoint}: {exc}") from exc
    if getattr(model, "input_spec", None) is None:
        model.input_spec = info.spec
    return model


def load_predictor(info: RunInfo, device: str | None = None, precision: str = "auto",
                   compile: bool = False) -> Predictor:
    """The checkpoint's model as a :class:`Predictor` naming its targets; its dense geometry
    must be the one the checkpoint recorded (the code that built it has not changed it)."""
    model = load_model(info)
    context = info.spec.context
    pred = Predictor(model, device=None if device in (None, "auto") else device, precision=precision,
                     target_names=list(info.spec.targets["names"]), compile=compile,
                     context_stride=None if context is None else context.stride)
    recorded = info.spec.model
    # A checkpoint from before its family had a dense mode recorded none; a dense mode that
    # equals the per-patch answer (dense_equivalent) does not change what the model computes.
    gained_dense = recorded.get("output_stride", 0) is None and pred.dense_equivalent
    for key, have in (("output_stride", None if pred.output_stride is None else list(pred.output_stride)),
                      ("dense_equivalent", pred.dense_equivalent)):
        if key in recorded and recorded[key] != have and not gained_dense:
            raise InferenceError(f"checkpoint {info.checkpoint} records {key}={recorded[key]} but the model built from it has "
                                 f"{have}: the backbone code changed since it was trained")
    if tuple(pred.patch_shape) != tuple(info.spec.patch_shape_vox):
        raise InferenceError(f"checkpoint {info.checkpoint}: the model's patch {list(pred.patch_shape)} differs from its "
                             f"input spec's {list(info.spec.patch_shape_vox)}")
    return pred

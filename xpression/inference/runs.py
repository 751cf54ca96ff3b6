"""A training run folder as the sweep needs it: checkpoint, config, model voxel size, identity.

A run folder holds ``config.yaml`` (resolved; else ``.hydra/config.yaml``; a resumed run's last
``config.resumed-<n>.yaml`` wins), ``checkpoints/best.ckpt`` (and ``last.ckpt``) and
``metrics.json``. A checkpoint path may be given instead; its config is then looked up in the
run folder above ``checkpoints/``. Everything is checked before any voxel is read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xpression.inference.predictor import InferenceError, Predictor

__all__ = ["RunInfo", "resolve_run", "load_predictor"]


@dataclass
class RunInfo:
    """``config``: the run's resolved Hydra config (plain dict); ``metrics``: its
    ``metrics.json`` (may be empty); ``sha256``: of the checkpoint file."""

    run_dir: Path
    checkpoint: Path
    config: dict
    metrics: dict = field(default_factory=dict)
    sha256: str = ""

    @property
    def voxel_size_um(self) -> tuple[float, float, float] | None:
        """The model's voxel size (z, y, x) in um, as recorded by the run."""
        vs = self.metrics.get("voxel_size_um") or _select(self.config, "sampler.voxel_size_um")
        if vs is None:
            return None
        return tuple(float(v) for v in np.broadcast_to(np.asarray(vs, float), (3,)))  # type: ignore[return-value]

    @property
    def manifest(self) -> Path | None:
        m = _select(self.config, "data.manifest")
        return None if m is None else Path(str(m))

    @property
    def trained_sections(self) -> list[str] | None:
        s = _select(self.config, "data.sections")
        return None if s is None else [str(x) for x in s]

    @property
    def seed(self) -> int:
        return int(_select(self.config, "data.seed") or self.config.get("seed") or 0)

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


def resolve_run(run: str | Path, checkpoint: str = "best") -> RunInfo:
    """Find the checkpoint and config of ``run`` (a run folder or a ``.ckpt`` file).

    ``checkpoint``: ``best``, ``last`` or a file name under ``checkpoints/`` (run folders only).
    Raises :class:`InferenceError` when the checkpoint or its config is missing.
    """
    path = Path(run).expanduser()
    if not path.exists():
        raise InferenceError(f"run {path} not found (give a training run folder or a .ckpt file)")
    if path.is_file():
        ckpt = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        run_dir = path
        name = checkpoint if checkpoint.endswith(".ckpt") else f"{checkpoint}.ckpt"
        ckpt = run_dir / "checkpoints" / name
        if name == "best.ckpt" and not ckpt.exists() and (run_dir / "checkpoints" / "last.ckpt").exists():
            ckpt = run_dir / "checkpoints" / "last.ckpt"  # runs without a monitored checkpoint keep only their final weights
        if not ckpt.exists():
            found = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").exists() else []
            raise InferenceError(f"{ckpt} not found in run {run_dir}; checkpoints there: {found or 'none'}")
    # train.py writes the resolved config beside the raw Hydra one (older runs have only the
    # latter), and a resumed run one per restart: the last one trained the final weights.
    from xpression.resume import run_config_path

    cfg_path = run_config_path(run_dir)
    if not cfg_path.exists():
        raise InferenceError(
            f"checkpoint {ckpt} has no run config: expected {cfg_path}. The sweep needs the training "
            "config (model voxel size, normalisation, cohort); pass the run folder train.py wrote")
    import yaml

    config = yaml.safe_load(cfg_path.read_text()) or {}
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return RunInfo(run_dir.resolve(), ckpt.resolve(), config, metrics, _sha256(ckpt))


def load_predictor(info: RunInfo, device: str | None = None, precision: str = "auto",
                   compile: bool = False) -> tuple[Predictor, dict]:
    """The run's network as a :class:`Predictor` and the checkpoint's hyper-parameters."""
    from xpression.models import XPressionModule

    try:
        module = XPressionModule.load_from_checkpoint(str(info.checkpoint), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InferenceError(f"cannot load checkpoint {info.checkpoint}: {exc}") from exc
    hp = dict(module.hparams)
    spec = hp.get("target_spec") or {}
    names = list(spec.get("names", [])) or None
    pred = Predictor(module, device=None if device in (None, "auto") else device, precision=precision,
                     target_names=names, compile=compile)
    return pred, hp

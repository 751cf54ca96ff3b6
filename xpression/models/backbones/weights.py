"""Local weight files for backbones that are not built by timm: read, then load with a clear error.

Nothing is ever downloaded: a backbone's ``weights`` argument is a path to a file on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)


def read_state_dict(weights: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint: a plain state dict, or one under ``"state_dict"`` or
    ``"model"`` (Lightning / training-script checkpoints). ``what`` names the model in errors."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file for {what} not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path}: expected a state dict (names -> tensors) for {what}")
    return dict(obj)


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Copy ``state`` into ``model``: every parameter and buffer of the model must be in the file
    with its shape; keys the model does not have are logged and left out."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"weights file {path} lacks {len(missing)} entries of {what}, e.g. "
                         f"{missing[:3]}: it holds another architecture or width")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"weights file {path}: {k} has shape {tuple(state[k].shape)} but {what} "
                             f"needs {tuple(v.shape)}: it holds another architecture or width")
    unused = sorted(set(state) - set(own))
    if unused:
        log.warning("weights file %s: %d entries not used by %s (e.g. %s)", path, len(unused), what,
                    ", ".join(unused[:3]))
    model.load_state_dict({k: state[k] for k in own}, strict=True)

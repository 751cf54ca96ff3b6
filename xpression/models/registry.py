"""Backbone registry: ``register_backbone``, ``create_backbone``, ``list_backbones``.

Every backbone is an ``nn.Module`` built for a fixed patch shape ``(D, H, W)`` in voxels. It has
``forward_features(x: (B, 1, D, H, W)) -> (B, num_features)`` and the attributes
``num_features``, ``patch_shape``, ``dense_equivalent`` and ``output_stride``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class/function decorator adding a backbone constructor under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BACKBONES and _BACKBONES[name] is not fn:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    """Sorted names of the registered backbones."""
    _load_families()
    return sorted(_BACKBONES)


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name``.

    Context arguments that a family does not take (``spot_radius_vox`` for a per-patch network)
    are dropped, so a caller can pass the same set to every family; any other unknown keyword is
    an error.
    """
    _load_families()
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(_BACKBONES))}")
    fn = _BACKBONES[name]
    params = inspect.signature(fn).parameters
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not takes_var_kw:
        for optional in ("spot_radius_vox",):
            if optional not in params:
                kwargs.pop(optional, None)
    return fn(**kwargs)


def _load_families() -> None:
    # Importing the package registers every family (one module each).
    from xpression.models import backbones  # noqa: F401

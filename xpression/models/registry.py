"""The backbone registry (``BACKBONES``, a :class:`xpression.registry.Registry`).

Every backbone is an ``nn.Module`` built for a fixed patch shape ``(D, H, W)`` in voxels. It has
``forward_features(x: (B, 1, D, H, W)) -> (B, num_features)`` and the attributes
``num_features``, ``patch_shape``, ``dense_equivalent`` and ``output_stride``. A family registers
itself with ``@register_backbone(name)`` in its own file of ``xpression/models/backbones/`` (the
package imports every file there); ``xpression.models.backbones.create_backbone`` builds one.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from xpression.registry import Registry

__all__ = ["BACKBONES", "register_backbone"]

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class/function decorator adding a backbone constructor under ``name``."""
    return BACKBONES.register(name)  # type: ignore[return-value]

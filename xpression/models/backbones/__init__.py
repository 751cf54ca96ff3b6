"""Backbone families, one module each; importing this package registers them all (every module
of this folder is imported, so a new family is one new file with ``@register_backbone(name)``).

``XPressionNet.dense_forward`` runs a backbone over an input larger than its patch:

===============  ================  ==========================================================
name             dense-equivalent  dense output
===============  ================  ==========================================================
``cnn3d``        yes (``valid``)   ``(B, T, d, h, w)``; output ``k`` is the patch starting at
                                   voxel ``k * output_stride``, exactly (within fp rounding)
``cnn3d``        no (``same``)     same grid; each patch's own zero border is missing, so
                                   values differ from the per-patch answer near borders
``cnn3d_paper``  no (``same``)     as above (the published network)
``unet``         no (approximate)  ``(B, T, H', W')`` central plane at every in-plane voxel;
                                   ``spot_average=True`` averages over the spot disk (the
                                   training-time spot value); the encoder's padding and wider
                                   context make it differ slightly from a patch-by-patch run
``timm``         no                none: ``NotImplementedError``, predict patch by patch
``resnet3d``     yes (``valid``)   ``(B, T, d, h, w)``, exactly the per-patch answer (as cnn3d
                                   valid); the global mean is a sliding mean over the patch's
                                   feature map, each block's shortcut cropped to its centre
``resnet3d``     no (``same``)     none: torchvision's padded r3d/mc3/r2plus1d see zeros past
                                   the patch border and pool globally; predict patch by patch
``vit3d``        no                none: global attention and a position embedding tied to
                                   the patch; predict patch by patch
``multiscale``   yes (both         ``(B, T, d, h, w)`` as the fine encoder's; also takes the
                 encoders valid)   context block: the context encoder slides over one
                                   sub-sampled block per residue class of the view's stride
===============  ================  ==========================================================
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from xpression.models.backbones.cnn3d import CNN3D
from xpression.models.backbones.resnet3d import ResNet3D
from xpression.models.backbones.timm2d import TimmBackbone
from xpression.models.backbones.unet import UNet
from xpression.models.backbones.vit3d import ViT3D
from xpression.models.registry import BACKBONES
from xpression.registry import import_submodules

__all__ = ["CNN3D", "ResNet3D", "TimmBackbone", "UNet", "ViT3D", "create_backbone", "list_backbones"]

import_submodules(__name__)


def list_backbones() -> list[str]:
    """Sorted names of the registered backbones."""
    return BACKBONES.names()


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name``.

    Context arguments that a family does not take (``spot_radius_vox`` for a per-patch network)
    are dropped, so a caller can pass the same set to every family; any other unknown keyword is
    an error.
    """
    fn = BACKBONES.get(name)
    params = inspect.signature(fn).parameters
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not takes_var_kw:
        for optional in ("spot_radius_vox",):
            if optional not in params:
                kwargs.pop(optional, None)
    return fn(**kwargs)

"""Backbone families, one module each; importing this package registers them all.

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
===============  ================  ==========================================================
"""

from xpression.models.backbones import cnn3d, resnet3d, timm2d, unet, vit3d  # noqa: F401
from xpression.models.backbones.cnn3d import CNN3D
from xpression.models.backbones.resnet3d import ResNet3D
from xpression.models.backbones.timm2d import TimmBackbone
from xpression.models.backbones.unet import UNet
from xpression.models.backbones.vit3d import ViT3D

__all__ = ["CNN3D", "ResNet3D", "TimmBackbone", "UNet", "ViT3D"]

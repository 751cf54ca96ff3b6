"""Backbone families, one module each; importing this package registers them all.

=================  =================  ==================================================
name               dense-equivalent   dense_forward
=================  =================  ==================================================
``cnn3d``          yes (valid pad)    ``(B, T, d, h, w)`` at ``output_stride`` voxels;
                                      equals the per-patch answer of each crop exactly
``cnn3d`` same     no                 same grid, differs near each patch's border
``cnn3d_paper``    no (same pad)      as above; the sweep reports the measured difference
``unet``           no (approx.)       ``(B, T, H', W')`` central plane, every voxel;
                                      zero padding at the input border shifts values
``timm``           no                 not available: per-patch only
=================  =================  ==================================================
"""

from xpression.models.backbones import cnn3d, timm2d, unet  # noqa: F401
from xpression.models.backbones.cnn3d import CNN3D
from xpression.models.backbones.timm2d import TimmBackbone
from xpression.models.backbones.unet import UNet

__all__ = ["CNN3D", "TimmBackbone", "UNet"]

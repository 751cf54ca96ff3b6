"""Models: backbone registry, heads, losses and the LightningModule.

See ``xpression.models.backbones`` for which backbones are dense-equivalent.
"""

from xpression.models.heads import Head, activate
from xpression.models.losses import build_loss, list_losses, register_loss
from xpression.models.module import XPressionModule
from xpression.models.net import XPressionNet, build_net
from xpression.models.backbones import create_backbone, list_backbones
from xpression.models.registry import BACKBONES, register_backbone

__all__ = ["BACKBONES", "create_backbone", "list_backbones", "register_backbone", "XPressionNet", "build_net",
           "Head", "activate", "XPressionModule", "build_loss", "list_losses", "register_loss"]

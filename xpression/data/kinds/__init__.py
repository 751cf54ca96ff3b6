"""Target kinds: what the numbers a model predicts are, one registered file each.

=================  ==========  ============  =================================================
kind               activation  default loss  checked (``renormalize=false``) / extra metrics
=================  ==========  ============  =================================================
composition        softmax     kl            >= 0, rows sum to 1 / JSD, dominant accuracy, AUC
log_expression     identity    mse           - / -
counts             softplus    poisson       >= 0 / -
=================  ==========  ============  =================================================

A new kind is one new file in this folder (every module here is imported with the package) that
subclasses :class:`TargetKind` and registers an instance, plus a target config that names it
(``target.kind=<name>`` with ``target.renormalize=false``). The head, the losses' kind checks,
the default loss, the label checks, the metrics and the figures all ask the registry. A kind
defined elsewhere registers the same way once its module is imported, or is named
``package.module:object``.
"""

from xpression.data.kinds._base import KINDS, TargetKind, get_kind, paired, refuse_negative
from xpression.registry import import_submodules

__all__ = ["KINDS", "TargetKind", "get_kind", "paired", "register_kind", "refuse_negative"]


def register_kind(kind: TargetKind) -> TargetKind:
    """Register ``kind`` (an instance) under ``kind.name``; returns it."""
    KINDS.register(kind.name, kind)
    return kind


import_submodules(__name__)

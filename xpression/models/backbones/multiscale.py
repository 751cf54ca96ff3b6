"""``multiscale``: two encoders, one on the fine patch and one on its context view.

The input is ``(B, 2, D, H, W)``: channel 0 the full-resolution patch, channel 1 the wide,
coarse view around the same centre on the same voxel grid shape (``patch.context_um``;
:class:`xpression.data.context.ContextView`). Each channel goes through its own backbone (any
registered family, e.g. ``cnn3d`` or ``resnet3d``; the context encoder is the fine one's
architecture with its own weights unless ``context`` names another) and the pooled features are
concatenated before the head.

Dense mode (both encoders dense-equivalent, e.g. ``cnn3d`` with valid padding): the context
view is not a sliding window of the fine grid, but every ``k``-th voxel (``k`` the view's stride)
of the low-pass filtered volume, so the views whose first voxel falls in one residue class of
``k x`` the context encoder's output stride are exactly the dense outputs of that encoder run
over one sub-sampled block (``block[r::k]``). :meth:`MultiScale.dense_features` runs one such
pass per residue class the fine outputs need and interleaves them, so a dense sweep returns,
within float rounding, the per-patch answers (tests/test_multiscale_dense.py).
"""

from __future__ import annotations

import inspect
import itertools
import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from xpression.models.registry import register_backbone


@register_backbone("multiscale")
class MultiScale(nn.Module):
    """``forward_features(x: (B, 2, D, H, W)) -> (B, F_fine + F_context)``.

    Args:
        patch_shape: ``(D, H, W)`` voxels of the patch and of the context view.
        fine: the patch encoder's backbone config ``{"name": ..., **kwargs}``.
        context: the context encoder's config; None = the same as ``fine`` (own weights).
        spot_radius_vox: passed on to families that take it.
    """

    views = 2  # input channels: the patch, then its context view

    def __init__(self, patch_shape: Sequence[int], fine: Mapping[str, Any], context: Mapping[str, Any] | None = None,
                 spot_radius_vox: float | None = None) -> None:
        super().__init__()
        from xpression.models.backbones import create_backbone  # the package imports this module

        def build(cfg: Mapping[str, Any], role: str) -> nn.Module:
            cfg = dict(cfg)
            name = cfg.pop("name", None)
            if name is None or name == "multiscale":
                raise ValueError(f"multiscale backbone: '{role}' needs the 'name' of a single-view backbone, got {name!r}")
            return create_backbone(name, patch_shape=tuple(int(s) for s in patch_shape), spot_radius_vox=spot_radius_vox, **cfg)

        self.fine = build(fine, "fine")
        self.context = build(fine if context is None else context, "context")
        self.patch_shape = tuple(self.fine.patch_shape)
        self.num_features = int(self.fine.num_features) + int(self.context.num_features)
        dense = all(getattr(e, "dense_equivalent", False) and hasattr(e, "dense_features") for e in (self.fine, self.context))
        self.dense_equivalent = dense
        self.output_stride = tuple(self.fine.output_stride) if dense else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 2:
            raise ValueError(f"multiscale backbone expects (B, 2, D, H, W) (patch, context view), got {tuple(x.shape)}")
        return torch.cat([self.fine.forward_features(x[:, :1]), self.context.forward_features(x[:, 1:])], dim=1)

    def context_shape(self, shape: Sequence[int], context_stride: Sequence[int]) -> tuple[int, int, int]:
        """The context block :meth:`dense_features` needs beside a fine block of ``shape`` voxels:
        the views of every patch in it, ``shape + span - patch_shape`` per axis (``span``: the
        view's extent in model voxels, ``(P - 1) * k + 1``)."""
        from xpression.data.context import context_block_shape

        return context_block_shape(shape, self.patch_shape, context_stride)

    def dense_features(self, x: torch.Tensor, context: torch.Tensor | None = None,
                       context_stride: Sequence[int] | None = None, step: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, 1, D', H', W')`` fine block and its context block -> ``(B, num_features, d, h, w)``.

        ``context``: ``(B, 1, *context_shape(...))`` from the low-pass filtered volume on the same
        model-voxel lattice, its voxel 0 lying ``span // 2 - P // 2`` voxels before the fine
        block's first voxel per axis (so the view of the patch starting at fine voxel ``s`` starts
        at context voxel ``s``). ``context_stride``: the view's stride ``k`` (z, y, x), model voxels.
        Output ``j`` is the patch starting at fine voxel ``j * step * output_stride``, as for the
        fine encoder alone; its features are the fine encoder's and the context encoder's of that
        patch's view, concatenated.
        """
        if not self.dense_equivalent:
            raise NotImplementedError("this multiscale model's encoders are not both dense-equivalent (valid padding); "
                                      "predict patch by patch")
        if context is None or context_stride is None:
            raise ValueError("a multi-scale model's dense mode needs the context block and its stride (context, context_stride)")
        k = tuple(int(v) for v in context_stride)
        want = self.context_shape(x.shape[2:], k)
        if tuple(context.shape[2:]) != want or context.shape[0] != x.shape[0]:
            raise ValueError(f"context block {tuple(context.shape)} does not match the fine block {tuple(x.shape)}: "
                             f"expected ({x.shape[0]}, 1, {', '.join(map(str, want))}) for context stride {k}")
        step_t = tuple(int(m) for m in (step or (1, 1, 1)))
        fine = self._dense(self.fine, x, step_t)
        n = fine.shape[2:]
        q = [int(s) * m for s, m in zip(self.fine.output_stride, step_t)]  # fine voxels between outputs
        cs = [int(s) for s in self.context.output_stride]
        groups, strides = [], []
        for a in range(3):
            # outputs j and j + g start their views in the same residue class mod k * cs: one pass
            lcm = q[a] * k[a] * cs[a] // math.gcd(q[a], k[a] * cs[a])
            groups.append(lcm // q[a])
            strides.append(lcm // (k[a] * cs[a]))
        span = [(p - 1) * kk + 1 for p, kk in zip(self.patch_shape, k)]
        out = fine.new_empty((x.shape[0], int(self.context.num_features)) + tuple(n))
        for g in itertools.product(*(range(min(G, int(na))) for G, na in zip(groups, n))):
            count = [len(range(ga, int(na), G)) for ga, na, G in zip(g, n, groups)]
            first = [ga * qa for ga, qa in zip(g, q)]
            last = [f + (c - 1) * G * qa + sp for f, c, G, qa, sp in zip(first, count, groups, q, span)]
            sub = context[(slice(None), slice(None)) + tuple(slice(f, e, kk) for f, e, kk in zip(first, last, k))]
            feats = self._dense(self.context, sub, tuple(strides))
            out[(slice(None), slice(None)) + tuple(slice(ga, None, G) for ga, G in zip(g, groups))] = feats[
                (slice(None), slice(None)) + tuple(slice(0, c) for c in count)]
        return torch.cat([fine, out], dim=1)

    @staticmethod
    def _dense(encoder: nn.Module, x: torch.Tensor, step: Sequence[int]) -> torch.Tensor:
        """``encoder.dense_features`` every ``step``-th output (natively where it takes ``step``)."""
        if "step" in inspect.signature(encoder.dense_features).parameters:
            return encoder.dense_features(x, step=tuple(step))
        out = encoder.dense_features(x)
        return out[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in step)]

"""A 3D Vision Transformer: voxel tokens from a 3D patch embedding, timm's transformer blocks.

The patch is cut into tokens of ``token_size`` voxels (a ``Conv3d`` with kernel = stride = the
token), each token gets a 3D position embedding (learned, or fixed sin-cos over its z, y, x grid
index), and timm's ``vision_transformer.Block`` layers mix them; the features are the class
token or the tokens' mean. A patch that is not a whole number of tokens is zero-padded, centred.

Global attention over the patch and a position embedding tied to it: not translation-equivariant,
so not dense-equivalent and without a dense mode (the sweep predicts patch by patch).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed, trunc_normal_
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from xpression.models.backbones.weights import load_into, read_state_dict
from xpression.models.registry import register_backbone

Triple = tuple[int, int, int]
log = logging.getLogger(__name__)


def token_grid(patch_shape: Sequence[int], token_size: Sequence[int | None], fit: str) -> tuple[Triple, Triple]:
    """``(token, grid)``: the token size in voxels and tokens per axis for a ``patch_shape`` patch.

    A depth of ``None`` splits the patch depth into ``ceil(D / token_y)`` tokens of equal depth
    (as near the in-plane token size as the slices allow): 5 slices -> one token of 5, 9 -> two
    of 5, 21 -> three of 7. ``fit="error"`` refuses a patch that is not a whole number of tokens,
    ``"pad"`` pads it to the next one.
    """
    if len(token_size) != 3:
        raise ValueError(f"token_size must be 3 values (z, y, x voxels), got {list(token_size)}")
    d = int(patch_shape[0])
    tz = token_size[0]
    if tz is None:
        tz = math.ceil(d / math.ceil(d / int(token_size[1])))
    token: Triple = (int(tz), int(token_size[1]), int(token_size[2]))
    if min(token) < 1:
        raise ValueError(f"token_size must be >= 1 voxel per axis, got {token}")
    if fit == "error" and any(p % t for p, t in zip(patch_shape, token)):
        raise ValueError(f"patch {tuple(patch_shape)} (D, H, W voxels) is not a whole number of "
                         f"{token}-voxel tokens; choose token_size dividing it or fit='pad'")
    grid: Triple = tuple(math.ceil(p / t) for p, t in zip(patch_shape, token))  # type: ignore[assignment]
    return token, grid


def sincos_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """``(prod(grid), dim)`` fixed position embedding: a third of the channels per axis (z, y, x),
    half sines half cosines of the token index over geometrically spaced frequencies."""
    if dim % 6:
        raise ValueError(f"sin-cos 3D position embedding needs embed_dim divisible by 6, got {dim}")
    n = dim // 6
    omega = 1.0 / temperature ** (torch.arange(n, dtype=torch.float32) / n)
    axes = torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij")
    parts = []
    for pos in axes:
        arg = pos.reshape(-1, 1) * omega[None]
        parts += [arg.sin(), arg.cos()]
    return torch.cat(parts, dim=1)


class PatchEmbed3D(nn.Module):
    """``(B, C, D, H, W)`` -> ``(B, N, embed_dim)`` tokens in z, y, x order (``proj``: kernel =
    stride = the token)."""

    def __init__(self, token: Triple, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, token, stride=token)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


@register_backbone("vit3d")
class ViT3D(nn.Module):
    """ViT over a ``(B, 1, D, H, W)`` patch with 3D tokens; see the module doc.

    Args:
        patch_shape: input patch ``(D, H, W)`` in voxels.
        token_size: token ``(z, y, x)`` in voxels; ``z = None`` derives it from the patch depth
            (see :func:`token_grid`).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer (ViT-Tiny: 192, 12, 3).
        pos_embed: ``"learned"`` or ``"sincos"`` (fixed).
        pool: ``"cls"`` (a class token) or ``"mean"`` (mean of the tokens).
        fit: ``"pad"`` (zeros, centred, to whole tokens) or ``"error"``.
        drop_rate: dropout after the position embedding, in the blocks and on the features.
        drop_path_rate: stochastic depth, rising linearly to this over the blocks.
        weights: optional local checkpoint: this backbone's, or a timm 2D ViT's of the same width
            (blocks reused; its patch and position embeddings inflated to 3D); nothing is downloaded.
        in_chans: input channels (1 for a CT patch).
    """

    dense_equivalent = False
    output_stride = None

    def __init__(self, patch_shape: Sequence[int], token_size: Sequence[int | None] = (None, 8, 8),
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, pos_embed: str = "learned", pool: str = "cls", fit: str = "pad",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, weights: str | None = None,
                 in_chans: int = 1) -> None:
        super().__init__()
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if fit not in ("pad", "error"):
            raise ValueError(f"fit must be 'pad' or 'error', got {fit!r}")
        self.patch_shape: Triple = tuple(int(s) for s in patch_shape)  # type: ignore[assignment]
        if len(self.patch_shape) != 3:
            raise ValueError(f"patch_shape must be (D, H, W) voxels, got {patch_shape!r}")
        self.token, self.grid = token_grid(self.patch_shape, list(token_size), fit)
        self.input_shape: Triple = tuple(g * t for g, t in zip(self.grid, self.token))  # type: ignore[assignment]
        self.pool = pool
        n_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.patch_embed = PatchEmbed3D(self.token, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pool == "cls" else None
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, embed_dim))
        else:
            self.register_buffer("pos_embed", sincos_3d(self.grid, embed_dim)[None], persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  drop_path=dpr[i], norm_layer=norm) for i in range(depth)])
        self.norm = norm(embed_dim)
        self.drop = nn.Dropout(drop_rate)
        self.num_features = int(embed_dim)
        self.apply(init_weights_vit_timm)
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if weights is not None:
            self.load_weights(weights)

    def load_weights(self, weights: str) -> None:
        """Load a local checkpoint of this backbone or of a timm 2D ViT of the same width.

        From a 2D ViT: RGB patch kernels are summed over channels, resampled in-plane to the
        token and spread evenly over its depth (a depth-constant input then embeds as the 2D image
        did); the position embedding is resampled to the in-plane token grid and repeated along
        depth; the class token absorbs its position embedding; ``head`` is dropped.
        """
        what = "vit3d"
        state = {k: v for k, v in read_state_dict(weights, what).items() if not k.startswith("head.")}
        w = state.get("patch_embed.proj.weight")
        if w is not None and w.ndim == 4:  # (C, 3, h, w) from a 2D ViT
            tz, ty, tx = self.token
            w = resample_patch_embed(w.sum(1, keepdim=True).float(), [ty, tx])
            state["patch_embed.proj.weight"] = w[:, :, None].expand(-1, -1, tz, -1, -1) / tz
            pos = state.get("pos_embed")
            if pos is not None and pos.ndim == 3:
                side = math.isqrt(pos.shape[1])
                prefix = pos.shape[1] - side * side
                if prefix and "cls_token" in state:
                    state["cls_token"] = state["cls_token"] + pos[:, :1]
                grid = resample_abs_pos_embed(pos[:, prefix:].float(), list(self.grid[1:]), [side, side],
                                              num_prefix_tokens=0)
                state["pos_embed"] = grid[:, None].reshape(1, 1, -1, grid.shape[-1]).expand(
                    -1, self.grid[0], -1, -1).reshape(1, -1, grid.shape[-1])
        if self.cls_token is None:
            state.pop("cls_token", None)
        if not isinstance(self.pos_embed, nn.Parameter):
            state.pop("pos_embed", None)
        load_into(self, state, weights, what)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` patch -> ``(B, num_features)``."""
        if tuple(x.shape[2:]) != self.patch_shape:
            raise ValueError(f"expected a patch of {self.patch_shape} voxels, got {tuple(x.shape[2:])}")
        pad = []
        for p, s in zip(reversed(self.input_shape), reversed(self.patch_shape)):  # x, y, z for F.pad
            pad += [(p - s) // 2, p - s - (p - s) // 2]
        t = self.patch_embed(F.pad(x, pad)) + self.pos_embed
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = self.norm(self.blocks(self.pos_drop(t)))
        return self.drop(t[:, 0] if self.cls_token is not None else t.mean(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

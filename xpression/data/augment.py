"""Batched patch augmentations on tensors (run wherever the batch is, GPU included).

In-plane: the 8 rotations/flips of the square (dihedral group D4) on the last two axes (H, W);
z-flip (axis D); intensity jitter ``x * scale + shift``. Each sample draws its own transform
from a ``torch.Generator`` on the CPU, so the result does not depend on the device.

``TRANSFORMS`` names the same symmetries for fixed, per-item use (:func:`transform_patch`, on
numpy patches): the sampler can ask for a given one, e.g. each oversampled copy of a spot a
distinct one, as the original study precomputed its copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["dihedral", "Augment", "TRANSFORMS", "TRANSFORM_NAMES", "transform_patch", "keeps_shape"]

# name: (element k of D4 as in `dihedral`, flip along z)
TRANSFORMS: dict[str, tuple[int, bool]] = {
    "identity": (0, False), "rot90": (1, False), "rot180": (2, False), "rot270": (3, False),
    "flip": (4, False), "flip_rot90": (5, False), "flip_rot180": (6, False), "flip_rot270": (7, False),
    "zflip": (0, True),
}
TRANSFORM_NAMES: tuple[str, ...] = tuple(TRANSFORMS)


def transform_patch(patch: np.ndarray, name: str) -> np.ndarray:
    """The named symmetry of a ``(..., D, H, W)`` numpy patch: ``dihedral``'s element on
    (H, W), then a flip of D for ``zflip``."""
    k, zflip = TRANSFORMS[name]
    out = patch[..., ::-1] if k >= 4 else patch
    out = np.rot90(out, k % 4, axes=(-2, -1)) if k % 4 else out
    return out[..., ::-1, :, :] if zflip else out


def keeps_shape(name: str, height: int, width: int) -> bool:
    """Whether the named symmetry maps an H x W patch onto its own shape."""
    return height == width or TRANSFORMS[name][0] % 2 == 0


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element ``k`` (0..7) of D4 on the last two axes: flip W if ``k >= 4``, then rotate ``k % 4`` x 90 deg."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


@dataclass
class Augment:
    """Random per-sample augmentation of an image batch (B, C, D, H, W).

    ``dihedral``: one of the 8 in-plane symmetries (only the 4 that keep the shape if H != W);
    ``z_flip``: flip D with probability 1/2; ``intensity_scale``/``intensity_shift``: multiply by
    U(1 - s, 1 + s) and add U(-a, a) (intensities are ~[0, 1]).
    """

    dihedral: bool = True
    z_flip: bool = True
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05

    def draws(self, batch: int, square: bool, generator: torch.Generator) -> tuple:
        """The per-sample draws, on the CPU, in a fixed order: dihedral elements ``ks`` (or None),
        z-flips (bool, or None), intensity ``scale`` and ``shift`` (float32, or None)."""
        ks = flip = scale = shift = None
        if self.dihedral:
            ks = torch.randint(0, 8, (batch,), generator=generator)
            if not square:
                ks = (ks // 2) * 2  # 0, 2, 4, 6: the shape-preserving subgroup
        if self.z_flip:
            flip = torch.rand(batch, generator=generator) < 0.5
        if self.intensity_scale or self.intensity_shift:
            scale = 1 + self.intensity_scale * (2 * torch.rand(batch, generator=generator) - 1)
            shift = self.intensity_shift * (2 * torch.rand(batch, generator=generator) - 1)
        return ks, flip, scale, shift

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # Every draw is made on the CPU first (same numbers on any device). What the device needs
        # (the samples grouped by symmetry, scales, shifts) travels in one pinned buffer with one
        # asynchronous copy: nothing here waits for the device (a copy from pageable memory can).
        b = image.shape[0]
        ks, flip, scale, shift = self.draws(b, image.shape[-1] == image.shape[-2], generator)
        code = torch.zeros(b, dtype=torch.int64)
        if ks is not None:
            code += 2 * ks
        if flip is not None:
            code += flip.to(torch.int64)
        groups = code.unique().tolist()  # sorted codes 2 k + z-flip
        order = torch.argsort(code, stable=True)  # the samples of each group, in batch order
        counts = torch.bincount(code, minlength=16).tolist()
        parts = [order]
        if scale is not None:
            parts.append(torch.cat([scale.float(), shift.float()]).view(torch.int64))  # 2b float32 as b int64
        params = _to_device(torch.cat(parts), image.device)
        idx_all = params[:b]
        out = image
        if groups != [0]:
            out = torch.empty_like(image)
            start = 0
            for g in groups:
                n = counts[g]
                idx = idx_all[start:start + n]
                start += n
                sub = dihedral(image.index_select(0, idx), g // 2)
                out.index_copy_(0, idx, sub.flip(2) if g % 2 else sub)
        if scale is not None:
            shape = (b,) + (1,) * (image.ndim - 1)
            values = params[b:].view(torch.float32)
            scale_d, shift_d = values[:b].view(shape).to(out.dtype), values[b:].view(shape).to(out.dtype)
            out = out * scale_d + shift_d if out is image else out.mul_(scale_d).add_(shift_d)
        return out


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device``: one copy from pinned memory that does not block."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)

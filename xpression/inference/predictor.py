"""A trained network seen by the sweep: its patch geometry, its dense mode and where it runs.

A network takes ``(B, 1, D, H, W)`` float32 patches (intensities about [0, 1]) and returns
``(B, T)`` predictions. It exposes ``patch_shape`` ``(D, H, W)`` voxels and, when it has a dense
mode, ``output_stride`` (voxels, z y x), ``dense_equivalent`` and ``dense_forward``:

- *volumetric* dense output ``(B, T, d, h, w)``: position ``k`` along an axis is the patch that
  starts at input voxel ``k * stride``, i.e. is centred on voxel ``k * stride + P // 2``;
- *plane* dense output ``(B, T, H', W')`` from an input of exactly ``D`` slices: the central
  slice's map, position ``(y, x)`` centred on input voxel ``(y, x) * stride``.

A model may override the centre of output 0 with a ``dense_offset`` attribute (voxels z y x).

A multi-scale model (``views = 2``: the patch and a context view every ``context_stride``-th
voxel of the low-pass filtered volume) takes ``(B, 2, D, H, W)`` patches; its dense mode also
takes the context block (``dense_tensor(..., context=)``, see
:meth:`~xpression.models.backbones.multiscale.MultiScale.dense_features`) and needs the
Predictor built with ``context_stride``.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from xpression.data.context import context_block_shape
from xpression.data.patches import image_to_float

__all__ = ["DenseGeometry", "Predictor", "InferenceError"]


class InferenceError(ValueError):
    """Inputs that make a sweep impossible; raised before any compute."""


@dataclass(frozen=True)
class DenseGeometry:
    """How dense outputs map to input voxels: output ``k`` along axis ``a`` answers the patch
    centred on input voxel ``offset[a] + k * stride[a]``. ``plane``: the output has no depth
    axis (the input must be exactly ``D`` slices)."""

    stride: tuple[int, int, int]
    offset: tuple[int, int, int]
    plane: bool


def _attr(model: nn.Module, name: str) -> Any:
    for obj in (model, getattr(model, "net", None), getattr(model, "backbone", None)):
        if obj is not None and hasattr(obj, name):
            return getattr(obj, name)
    return None


def _available(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, or :class:`InferenceError` in one line when this machine has
    no such device (a CUDA device without a driver or GPU, a GPU index past the last)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InferenceError(f"device={device}: not a device ({err}); use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InferenceError(f"device={device}: this machine has no usable CUDA GPU; use device=cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InferenceError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                 f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


class Predictor:
    """Wraps a network for inference: eval mode, no autograd, device, precision, memory layout.

    ``precision``: ``"fp32"``, ``"bf16"`` (autocast, CUDA) or ``"auto"`` (bf16 on CUDA, fp32 on
    CPU). ``channels_last``: use the channels-last-3d layout (default: on CUDA, and for
    networks with 3D convolutions on any device).
    ``target_names``: names of the ``T`` outputs (default: the model's ``target_spec.names``,
    else ``t0 .. t{T-1}``, see :meth:`output_names`). ``compile``: run the
    network through ``torch.compile`` (off by default: compilation takes minutes and each new
    input shape compiles again; it pays only for long sweeps with fixed tile shapes).

    The ``*_tensor`` methods take and return tensors on :attr:`device` (no host round trip); the
    others take and return numpy arrays.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device | None = None,
        precision: str = "auto",
        channels_last: bool | None = None,
        target_names: Sequence[str] | None = None,
        compile: bool = False,
        context_stride: Sequence[int] | None = None,
    ):
        net = getattr(model, "eval_net", None)
        net = model if net is None else net
        self.device = _available(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision not in ("auto", "fp32", "bf16"):
            raise InferenceError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        if channels_last is None:  # 3D convolutions run ~1.6x faster channels-last on CPUs too
            channels_last = self.device.type == "cuda" or any(isinstance(m, nn.Conv3d) for m in net.modules())
        self.channels_last = bool(channels_last)
        shape = _attr(net, "patch_shape")
        if shape is None or len(tuple(shape)) != 3:
            raise InferenceError(f"{type(net).__name__} has no 3-element patch_shape (D, H, W voxels)")
        self.patch_shape: tuple[int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]
        stride = _attr(net, "output_stride")
        self.output_stride = None if stride is None else tuple(int(s) for s in stride)
        self.dense_equivalent = bool(_attr(net, "dense_equivalent") or False)
        # patches (patch mode) or input slabs (dense mode) per forward unless told: the model's own, else 64
        self.default_batch_size = int(_attr(net, "patch_batch_size") or 64)
        self.views = int(_attr(net, "views") or 1)
        self.context_stride = None if context_stride is None else tuple(int(k) for k in context_stride)
        self.can_dense = (hasattr(net, "dense_forward") and self.output_stride is not None
                          and (self.views == 1 or self.context_stride is not None))
        self.net = net.to(self.device).eval()
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last_3d)
        self._dense_kwargs = self._find_dense_kwargs()
        self._dense_takes_step = self._accepts_dense_kwarg("step")
        self._forward = torch.compile(self.net, dynamic=False) if compile else self.net
        self._dense = (torch.compile(self.net.dense_forward, dynamic=False) if compile and self.can_dense
                       else getattr(self.net, "dense_forward", None))
        self._geometry: DenseGeometry | None = None
        if target_names is None:  # a model that knows its targets names them
            spec = getattr(model, "target_spec", None) or _attr(net, "target_spec")
            target_names = getattr(spec, "names", None)
        self.target_names = [str(n) for n in target_names] if target_names is not None else None

    def _accepts_dense_kwarg(self, name: str) -> bool:
        """Whether the dense path (an ``XPressionNet``'s backbone, or the network) takes ``name``."""
        fn = getattr(getattr(self.net, "backbone", None), "dense_features", None)
        if fn is None:
            fn = getattr(self.net, "dense_forward", None)
        return fn is not None and name in inspect.signature(fn).parameters

    def _find_dense_kwargs(self) -> dict:
        # A plane model's training-time spot value is its map averaged over the spot disk.
        return {"spot_average": True} if self._accepts_dense_kwarg("spot_average") else {}

    # -- running -------------------------------------------------------------------------------
    def _autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        """Float32 intensities on :attr:`device`; the cache's uint8 levels travel as uint8 (a
        quarter of the bytes) and are dequantised there (:func:`image_to_float`, same numbers)."""
        x = np.asarray(x)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8 if x.dtype == np.uint8 else np.float32))
        if self.device.type == "cuda":
            t = t.pin_memory()  # an asynchronous copy needs page-locked memory
        return image_to_float(t.to(self.device, non_blocking=True))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W)`` -> the network's ``(B, 1, D, H, W)`` input in its memory layout
        (``(B, C, D, H, W)``, e.g. a multi-scale model's patch and context view, as it is)."""
        x = x[:, None] if x.ndim == 4 else x
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x.contiguous()

    @torch.inference_mode()
    def patches_tensor(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W)`` float32 patches on :attr:`device` -> ``(B, T)`` float32 there."""
        with self._autocast():
            out = self._forward(self._layout(patches))
        return out.float().to(self.device)

    def context_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The context block a multi-scale model's dense mode needs beside a ``shape`` block:
        ``shape + span - patch_shape`` voxels, ``span = (P - 1) * context_stride + 1``."""
        if self.context_stride is None:
            raise InferenceError("this network takes no context view")
        return context_block_shape(shape, self.patch_shape, self.context_stride)

    @torch.inference_mode()
    def dense_tensor(self, blocks: torch.Tensor, step: Sequence[int] = (1, 1, 1),
                     context: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, D', H', W')`` float32 blocks on :attr:`device` -> ``(B, T, d, h, w)`` float32
        there (``d = 1`` for plane models); see :class:`DenseGeometry` for the positions.

        ``step`` (z, y, x, in outputs): keep every ``step``-th output only, so output ``j`` sits
        where output ``j * step`` would. Networks whose dense path takes ``step`` skip the work
        (``CNN3D``); for the others the full output is computed and subsampled.
        ``context``: a multi-scale model's ``(B, *context_shape(...))`` context blocks.
        """
        if not self.can_dense:
            raise InferenceError(f"{type(self.net).__name__} has no dense mode; use mode=patch")
        if (context is None) != (self.views == 1):
            raise InferenceError("a multi-scale model's dense mode takes the context blocks (context=...), "
                                 "a single-view model none")
        step = tuple(int(m) for m in step)
        kwargs = dict(self._dense_kwargs)
        if context is not None:
            kwargs.update(context=self._layout(context), context_stride=self.context_stride)
        native = self._dense_takes_step and step != (1, 1, 1)
        if native:
            kwargs["step"] = step
        with self._autocast():
            out = self._dense(self._layout(blocks), **kwargs)
        if out.ndim == 4:
            if step[0] != 1:
                raise InferenceError(f"a plane model has no depth axis to step along (step {step})")
            out = out[:, :, None]
        if not native:
            out = out[:, :, :: step[0], :: step[1], :: step[2]]
        return out.float()

    def predict_patches(self, patches: np.ndarray) -> np.ndarray:
        """``(B, D, H, W)`` normalised patches (float, or the cache's uint8 levels) -> ``(B, T)``
        float32 predictions."""
        return self.patches_tensor(self._tensor(patches)).cpu().numpy()

    def predict_dense(self, blocks: np.ndarray, step: Sequence[int] = (1, 1, 1)) -> np.ndarray:
        """:meth:`dense_tensor` on numpy blocks: ``(B, D', H', W')`` -> ``(B, T, d, h, w)``."""
        return self.dense_tensor(self._tensor(blocks), step).cpu().numpy()

    def output_names(self) -> list[str]:
        """The names of the ``T`` outputs: ``target_names``, the model's own target names, or
        ``t0 .. t{T-1}`` (``T`` from one forward), so a map store never has zero channels."""
        self.num_targets  # noqa: B018  (fills the default names)
        return list(self.target_names or [])

    @property
    def num_targets(self) -> int:
        if self.target_names is None:
            probe = self.predict_patches(np.zeros((1,) + ((self.views,) if self.views > 1 else ()) + self.patch_shape, np.float32))
            self.target_names = [f"t{i}" for i in range(probe.shape[1])]
        return len(self.target_names)

    def dense_geometry(self) -> DenseGeometry:
        """Probe the dense output once on a single patch to tell plane from volumetric models."""
        if self._geometry is None:
            if not self.can_dense:
                raise InferenceError(f"{type(self.net).__name__} has no dense mode; use mode=patch")
            kwargs = dict(self._dense_kwargs)
            if self.views > 1:
                kwargs.update(context=self._layout(self._tensor(np.zeros((1,) + self.context_shape(self.patch_shape), np.float32))),
                              context_stride=self.context_stride)
            with torch.inference_mode(), self._autocast():
                out = self.net.dense_forward(self._layout(self._tensor(np.zeros((1,) + self.patch_shape, np.float32))),
                                             **kwargs)
            plane = out.ndim == 4
            stride = self.output_stride
            offset = _attr(self.net, "dense_offset")
            if offset is None:
                p = self.patch_shape
                offset = (p[0] // 2, 0, 0) if plane else tuple(s // 2 for s in p)
            self._geometry = DenseGeometry(tuple(stride), tuple(int(o) for o in offset), plane)  # type: ignore[arg-type]
        return self._geometry

    def identity(self) -> dict:
        """What the output metadata records about the network."""
        return {
            "class": f"{type(self.net).__module__}.{type(self.net).__qualname__}",
            "patch_shape": list(self.patch_shape),
            "output_stride": None if self.output_stride is None else list(self.output_stride),
            "dense_equivalent": self.dense_equivalent,
            "parameters": int(sum(p.numel() for p in self.net.parameters())),
        }

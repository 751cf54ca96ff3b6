"""Conversions of the data layer's ``TargetSpec`` for models and checkpoints."""

from __future__ import annotations

from typing import Any, Mapping

from xpression.data.targets import KINDS, TargetSpec

__all__ = ["KINDS", "TargetSpec", "as_target_spec", "spec_to_dict"]


def as_target_spec(spec: Any) -> Any:
    """A ``TargetSpec`` from a ``TargetSpec``, or a mapping / object with ``names``, ``kind``
    and optionally ``colors``."""
    if isinstance(spec, Mapping):
        names, kind, colors = spec["names"], spec["kind"], spec.get("colors")
    else:
        names, kind, colors = spec.names, spec.kind, getattr(spec, "colors", None)
    names = [str(n) for n in names]
    if kind not in KINDS:
        raise ValueError(f"unknown target kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if not names:
        raise ValueError("a TargetSpec needs at least one target name")
    if isinstance(spec, TargetSpec):
        return spec
    return TargetSpec(names=names, kind=kind, colors=None if colors is None else [str(c) for c in colors])


def spec_to_dict(spec: Any) -> dict:
    """Plain ``{"names": [...], "kind": ...[, "colors": [...]]}`` (for hyper-parameters and checkpoints)."""
    out = {"names": [str(n) for n in spec.names], "kind": str(spec.kind)}
    if getattr(spec, "colors", None) is not None:
        out["colors"] = [str(c) for c in spec.colors]
    return out

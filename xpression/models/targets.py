"""Conversions of the data layer's ``TargetSpec`` for models and checkpoints."""

from __future__ import annotations

from typing import Any, Mapping

from xpression.data.kinds import KINDS, get_kind
from xpression.data.targets import TargetSpec

__all__ = ["KINDS", "TargetSpec", "as_target_spec", "spec_to_dict"]


def as_target_spec(spec: Any) -> Any:
    """A ``TargetSpec`` from a ``TargetSpec``, or a mapping / object with ``names``, ``kind`` and
    optionally ``colors`` and ``reference`` / ``reference_r`` (the match of fitted programs to known ones)."""
    if isinstance(spec, Mapping):
        names, kind, colors = spec["names"], spec["kind"], spec.get("colors")
        reference, reference_r = spec.get("reference"), spec.get("reference_r")
    else:
        names, kind, colors = spec.names, spec.kind, getattr(spec, "colors", None)
        reference, reference_r = getattr(spec, "reference", None), getattr(spec, "reference_r", None)
    names = [str(n) for n in names]
    get_kind(kind)  # ValueError naming the registered kinds
    if not names:
        raise ValueError("a TargetSpec needs at least one target name")
    if isinstance(spec, TargetSpec):
        return spec
    return TargetSpec(names=names, kind=kind, colors=None if colors is None else [str(c) for c in colors],
                      reference=None if reference is None else {str(k): str(v) for k, v in dict(reference).items()},
                      reference_r=None if reference_r is None else {str(k): float(v) for k, v in dict(reference_r).items()})


def spec_to_dict(spec: Any) -> dict:
    """Plain ``{"names": [...], "kind": ...}`` of a spec or mapping (``TargetSpec.to_dict``)."""
    return as_target_spec(spec).to_dict()

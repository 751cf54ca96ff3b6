"""``TargetSpec`` as the data layer defines it, with a compatible fallback while it is absent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

KINDS = ("composition", "log_expression", "counts")

try:  # the data layer owns the definition
    from xpression.data.targets import TargetSpec  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - only before xpression.data.targets exists

    @dataclass(frozen=True)
    class TargetSpec:  # type: ignore[no-redef]
        """What the model predicts: target ``names`` and their ``kind``."""

        names: list[str]
        kind: Literal["composition", "log_expression", "counts"]


def as_target_spec(spec: Any) -> Any:
    """A ``TargetSpec`` from a ``TargetSpec``, or a mapping / object with ``names`` and ``kind``."""
    if isinstance(spec, Mapping):
        names, kind = spec["names"], spec["kind"]
    else:
        names, kind = spec.names, spec.kind
    names = [str(n) for n in names]
    if kind not in KINDS:
        raise ValueError(f"unknown target kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if not names:
        raise ValueError("a TargetSpec needs at least one target name")
    if isinstance(spec, TargetSpec):
        return spec
    return TargetSpec(names=names, kind=kind)


def spec_to_dict(spec: Any) -> dict:
    """Plain ``{"names": [...], "kind": ...}`` (for hyper-parameters and checkpoints)."""
    return {"names": [str(n) for n in spec.names], "kind": str(spec.kind)}

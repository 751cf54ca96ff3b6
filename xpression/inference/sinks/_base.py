"""What a map sink is (see ``xpression.inference.sinks``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from xpression.inference.grid import OutputGrid
from xpression.inference.predictor import InferenceError
from xpression.inference.writers import read_maps
from xpression.registry import Registry

__all__ = ["SINKS", "FinishedMaps", "MapSink", "check_exports", "register_sink", "write_exports"]


@dataclass(frozen=True)
class FinishedMaps:
    """A finished map store as a sink reads it: ``values`` (zarr array ``(T, nz, ny, nx)``,
    level 0, float16, or float32 with an ``ood`` channel; NaN outside the tissue), ``meta`` (the store's ``xpression`` metadata),
    ``ct`` (the CT preview on the same grid, ``(nz, ny, nx)``, or None)."""

    path: Path
    values: Any
    meta: dict
    ct: Any = None
    ct_path: Path | None = None

    @property
    def grid(self) -> OutputGrid:
        """The output grid (um): spacing, origin, shape."""
        return OutputGrid.from_dict(self.meta["grid"])

    @property
    def names(self) -> list[str]:
        """The channel (target) names."""
        return list(self.meta["targets"])

    @classmethod
    def open(cls, store: str | Path, ct_preview: str | Path | None = None) -> "FinishedMaps":
        import zarr

        values, meta = read_maps(store)
        ct = zarr.open_group(str(ct_preview), mode="r")["0"] if ct_preview is not None else None
        return cls(Path(store), values, meta, ct, None if ct_preview is None else Path(ct_preview))


class MapSink(Protocol):
    """A map format: ``write`` puts ``maps`` in it under ``out_dir`` (the volume's output
    folder) and returns the path written."""

    name: str

    def write(self, maps: FinishedMaps, out_dir: Path) -> Path: ...


SINKS: Registry[MapSink] = Registry("map sink")


def register_sink(sink: MapSink) -> MapSink:
    """Register ``sink`` (an instance) under ``sink.name``; returns it."""
    SINKS.register(sink.name, sink)
    return sink


def check_exports(names: Sequence[str]) -> list[MapSink]:
    """The sinks named (before any compute): an :class:`InferenceError` for an unknown one."""
    try:
        return [SINKS.get(str(n)) for n in names]
    except ValueError as err:
        raise InferenceError(f"exports: {err}") from err


def write_exports(names: Sequence[str], store: str | Path, out_dir: str | Path,
                  ct_preview: str | Path | None = None) -> dict[str, Path]:
    """Write the finished ``store`` with every sink in ``names``; ``{name: path written}``."""
    sinks = check_exports(names)
    maps = FinishedMaps.open(store, ct_preview)
    return {sink.name: sink.write(maps, Path(out_dir)) for sink in sinks}

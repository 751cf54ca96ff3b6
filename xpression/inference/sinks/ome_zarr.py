"""``ome_zarr``: the sweep's own OME-Zarr 0.5 store (``xpression.inference.writers.MapStore``)."""

from __future__ import annotations

from pathlib import Path

from xpression.inference.sinks import FinishedMaps, register_sink


class OmeZarrSink:
    """The default: the maps already are an OME-Zarr store; nothing more is written."""

    name = "ome_zarr"

    def write(self, maps: FinishedMaps, out_dir: Path) -> Path:
        return maps.path


register_sink(OmeZarrSink())

"""``bigtiff``: level 0 as an ImageJ-style BigTIFF (``maps.tif``, float32 ``ZCYX``, the CT
preview as the first channel when there is one), for tools that read TIFF only."""

from __future__ import annotations

from pathlib import Path

from xpression.inference.sinks import FinishedMaps, register_sink
from xpression.inference.writers import export_bigtiff


class BigTiffSink:
    name = "bigtiff"
    filename = "maps.tif"

    def write(self, maps: FinishedMaps, out_dir: Path) -> Path:
        return export_bigtiff(maps.path, Path(out_dir) / self.filename, maps.ct_path)


register_sink(BigTiffSink())

"""Map sinks: the formats a volume's finished maps are written in, one registered file each.

The sweep itself always writes the OME-Zarr store (``<volume>/maps.ome.zarr``, zarr v3): tiles
land in their own chunks, so a sweep resumes, and several processes share it, without any
format-specific code. A sink then writes the finished maps in its format beside the store:

=========  ===================================  ============================================
name       writes                               infer.py
=========  ===================================  ============================================
ome_zarr   nothing more: the store itself       always (the default)
bigtiff    ``maps.tif``: ImageJ BigTIFF, ZCYX   ``bigtiff=true`` or ``exports=[bigtiff]``
=========  ===================================  ============================================

A new format is one new file in this folder (every module here is imported with the package)
holding a class with a ``name`` and ``write(maps: FinishedMaps, out_dir) -> Path``, registered
with :func:`register_sink`, plus its name in ``infer.py exports=[...]``.
"""

from xpression.inference.sinks._base import SINKS, FinishedMaps, MapSink, check_exports, register_sink, write_exports
from xpression.registry import import_submodules

__all__ = ["SINKS", "FinishedMaps", "MapSink", "check_exports", "register_sink", "write_exports"]

import_submodules(__name__)

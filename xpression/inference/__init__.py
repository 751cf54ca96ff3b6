"""Whole-volume inference: the sweep as a pure function, plus its writers and scoring."""

from xpression.inference.grid import GridError, OutputGrid, Tile, Tiling, make_grid
from xpression.inference.predictor import InferenceError, Predictor
from xpression.inference.sweep import TileResult, sweep, sweep_tiles
from xpression.inference.volume_sweep import VolumeSweep, infer_volume
from xpression.inference.writers import MapStore, read_maps

__all__ = [
    "GridError",
    "InferenceError",
    "OutputGrid",
    "Predictor",
    "Tile",
    "TileResult",
    "Tiling",
    "MapStore",
    "VolumeSweep",
    "infer_volume",
    "read_maps",
    "make_grid",
    "sweep",
    "sweep_tiles",
]

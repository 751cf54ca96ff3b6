"""Whole-volume inference: the sweep as a pure function, plus its writers and scoring."""

from xpression.inference.grid import GridError, OutputGrid, Tile, Tiling, make_grid
from xpression.inference.predictor import InferenceError, Predictor
from xpression.inference.sweep import TileResult, sweep, sweep_tiles

__all__ = [
    "GridError",
    "InferenceError",
    "OutputGrid",
    "Predictor",
    "Tile",
    "TileResult",
    "Tiling",
    "make_grid",
    "sweep",
    "sweep_tiles",
]

"""Figures without pyplot: every PNG the package writes goes through these two functions.

``matplotlib.figure.Figure`` objects are drawn off-screen and need no backend switch, so
writing figures from a training run, a sweep or a notebook never changes the user's backend
(``%matplotlib inline`` keeps working) and never leaves figures open in pyplot's registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["new_figure", "save_figure", "target_cmap"]


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.4, 4.8),
               **subplots: Any) -> tuple[Figure, Any]:
    """A constrained-layout figure of ``figsize`` inches and its axes (``Figure.subplots``
    keywords: ``squeeze``, ``sharex``, ``height_ratios`` ...)."""
    fig = Figure(figsize=figsize, constrained_layout=True)
    return fig, fig.subplots(nrows, ncols, **subplots)


def save_figure(fig: Figure, out: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``out`` (format from the suffix; parent folders created)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def target_cmap(color: str | None, default: str = "viridis") -> Any:
    """The colormap of one target's values: dark grey to the target's ``color`` (as Chrysalis draws
    a compartment), or the ``default`` colormap when the target has no colour."""
    if color is None:
        return default
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list(f"to_{color}", ["#2e2e2e", color])

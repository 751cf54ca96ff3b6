"""Figures without pyplot: every PNG the package writes goes through these two functions.

``matplotlib.figure.Figure`` objects are drawn off-screen and need no backend switch, so
writing figures from a training run, a sweep or a notebook never changes the user's backend
(``%matplotlib inline`` keeps working) and never leaves figures open in pyplot's registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["new_figure", "save_figure", "file_in_the_way", "target_cmap", "add_scale_bar", "log_figure"]


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.4, 4.8),
               **subplots: Any) -> tuple[Figure, Any]:
    """A constrained-layout figure of ``figsize`` inches and its axes (``Figure.subplots``
    keywords: ``squeeze``, ``sharex``, ``height_ratios`` ...)."""
    fig = Figure(figsize=figsize, constrained_layout=True)
    return fig, fig.subplots(nrows, ncols, **subplots)


def file_in_the_way(folder: str | Path) -> Path | None:
    """The file that keeps ``folder`` from being a folder (``folder`` itself or a parent that exists
    and is not a folder), or None when ``folder`` is, or can be made, a folder. Command lines check
    their output folder with it before the work starts."""
    folder = Path(folder)
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def save_figure(fig: Figure, out: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``out`` (format from the suffix; parent folders created).

    Raises:
        NotADirectoryError: a file is where a parent folder of ``out`` must go (one-line message).
        IsADirectoryError: ``out`` is a folder.
    """
    out = Path(out)
    blocker = file_in_the_way(out.parent)
    if blocker is not None:
        raise NotADirectoryError(f"cannot write {out}: {blocker} is a file, not a folder")
    if out.is_dir():
        raise IsADirectoryError(f"cannot write {out}: it is a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight", pad_inches=0.05)  # legends and labels outside the axes kept whole
    return out


def target_cmap(color: str | None, default: str = "viridis") -> Any:
    """The colormap of one target's values: dark grey to the target's ``color`` (as Chrysalis draws
    a compartment), or the ``default`` colormap when the target has no colour."""
    if color is None:
        return default
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list(f"to_{color}", ["#2e2e2e", color])


def add_scale_bar(ax: Any, extent_um: float, loc: str = "lower right") -> None:
    """A labelled scale bar on an axis whose data units are um: a round length near a fifth of
    ``extent_um`` (the axis width in um), black on a translucent white box (legible on any
    image)."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    target = max(float(extent_um) / 5.0, 1e-9)
    length = max(m * 10.0 ** e for e in range(-1, 6) for m in (1, 2, 5) if m * 10.0 ** e <= target) if target >= 0.1 else target
    label = f"{length / 1000:g} mm" if length >= 1000 else f"{length:g} µm"
    bar = AnchoredSizeBar(ax.transData, length, label, loc, pad=0.2, borderpad=0.3, sep=2, color="k", frameon=True,
                          size_vertical=max(float(extent_um) / 150.0, 1e-9), fontproperties={"size": 6})
    bar.patch.set(alpha=0.65, facecolor="white", edgecolor="none")
    ax.add_artist(bar)


def log_figure(logger: Any, tag: str, png: str | Path, step: int = 0) -> bool:
    """Send a written PNG to an experiment logger: TensorBoard (``add_image``) or any logger with
    ``log_image`` (wandb, ...). Loggers of plain values (CSV) keep none: the run folder has the
    file. Returns whether ``logger`` took it."""
    from matplotlib.image import imread

    if hasattr(logger, "log_image"):
        logger.log_image(key=tag, images=[str(png)], step=step)
        return True
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_image"):
        experiment.add_image(tag, imread(str(png))[..., :3], global_step=step, dataformats="HWC")
        return True
    return False

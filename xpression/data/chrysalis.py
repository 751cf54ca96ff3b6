"""Chrysalis tissue compartments (``obsm['chr_aa']``): their names and colours as Chrysalis shows them.

Chrysalis (``chrysalis-st``) stores the per-spot compartment scores in ``obsm['chr_aa']`` and, in
``uns['chr_aa']``, only ``archetypes``, ``alphas``, ``loadings`` and ``RSS`` (``uns['chr_pca']``
holds the PCA ``loadings``, ``variance_ratio`` and the gene ``features``): no compartment names
and no colours. It names compartments ``compartment_<i>`` (``get_compartment_df``) and colours
them at plot time (``utils.get_hexcodes``): up to 8 compartments take a fixed palette shuffled
with a seed (by default the number of spots); more take hues drawn from seed 42. These helpers
reproduce both, so maps and figures use the colours of the user's Chrysalis plots.
"""

from __future__ import annotations

import colorsys

import numpy as np

__all__ = ["CHRYSALIS_KEY", "compartment_names", "compartment_colors"]

CHRYSALIS_KEY = "chr_aa"
_PALETTE = ("#db5f57", "#dbc257", "#91db57", "#57db80", "#57d3db", "#5770db", "#a157db", "#db57b2")


def compartment_names(n: int) -> list[str]:
    """``compartment_0 .. compartment_{n-1}``, Chrysalis's own compartment labels."""
    return [f"compartment_{i}" for i in range(n)]


def compartment_colors(n: int, n_spots: int, seed: int | None = None) -> list[str]:
    """The ``n`` hex colours Chrysalis gives its compartments when plotting ``n_spots`` spots.

    ``seed``: the ``seed`` passed to Chrysalis's plotting functions (default None: the number of
    spots for up to 8 compartments, 42 for more), drawn from numpy's legacy generator as there.
    """
    if n <= len(_PALETTE):
        colors = list(_PALETTE)
        np.random.RandomState(n_spots if seed is None else seed).shuffle(colors)
        return colors[:n]
    rng = np.random.RandomState(seed if seed else 42)
    hues: list[float] = []
    while len(hues) < n:  # hues at least half an even spacing apart
        hue = rng.uniform(0.0, 1.0)
        if all(abs(hue - h) > 0.5 / n for h in hues):
            hues.append(hue)
    rgbs = [colorsys.hls_to_rgb(h, 0.60, 0.65) for h in hues]
    return ["#{:02x}{:02x}{:02x}".format(*(int(c * 255) for c in rgb)) for rgb in rgbs]

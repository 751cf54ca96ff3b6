"""Chrysalis compartments as targets: Chrysalis's names and plot colours reach the spec, checkpoints and figures.

The AnnData is laid out as ``chrysalis.aa`` leaves it (``obsm['chr_aa']`` per-spot scores;
``uns['chr_aa']`` = archetypes, alphas, loadings, RSS; ``uns['chr_pca']`` = variance_ratio,
loadings, features): Chrysalis stores no names and no colours.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from xpression.data.chrysalis import compartment_colors
from xpression.data.geometry import DataError
from xpression.data.targets import ObsmTarget, TargetSpec
from xpression.models.targets import as_target_spec, spec_to_dict

# chrysalis.utils.get_hexcodes: the palette of up to 8 compartments, before its seeded shuffle.
CHRYSALIS_PALETTE = ["#db5f57", "#dbc257", "#91db57", "#57db80", "#57d3db", "#5770db", "#a157db", "#db57b2"]


def _chrysalis_adata(n_spots: int = 97, k: int = 5, n_svg: int = 12, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    a = ad.AnnData(sp.csr_matrix(rng.poisson(2.0, size=(n_spots, 30)).astype(np.float32)))
    a.obs_names = [f"spot{i}-1" for i in range(n_spots)]
    a.obsm["spatial"] = rng.uniform(0, 1000, size=(n_spots, 2))
    alphas = rng.dirichlet(np.full(k, 0.5), size=n_spots)
    a.obsm["chr_aa"] = alphas
    a.obsm["chr_X_pca"] = rng.normal(size=(n_spots, 20))
    a.uns["chr_pca"] = {"variance_ratio": np.linspace(0.2, 0.01, 20), "loadings": rng.normal(size=(20, n_svg)),
                        "features": [f"G{j}" for j in range(n_svg)]}
    a.uns["chr_aa"] = {"archetypes": rng.normal(size=(k, k - 1)), "alphas": alphas,
                       "loadings": rng.normal(size=(k, n_svg)), "RSS": 1.5}
    return a


def _as_chrysalis_plots(k: int, n_spots: int) -> list[str]:
    """What ``chrysalis.plot(adata)`` colours its compartments with (seed=None, k <= 8)."""
    state = np.random.get_state()
    try:
        hexcodes = list(CHRYSALIS_PALETTE)
        np.random.seed(n_spots)
        np.random.shuffle(hexcodes)
    finally:
        np.random.set_state(state)
    return hexcodes[:k]


@pytest.mark.parametrize("k, n_spots", [(2, 97), (5, 97), (8, 4035), (8, 2000)])
def test_colours_are_those_of_chrysalis_plots(k, n_spots):
    assert compartment_colors(k, n_spots) == _as_chrysalis_plots(k, n_spots)


def test_more_than_eight_compartments_get_distinct_spaced_hues():
    colors = compartment_colors(12, 500)
    assert colors == compartment_colors(12, 900)  # seed 42, not the spot count, beyond 8
    assert len(set(colors)) == 12 and all(len(c) == 7 and c.startswith("#") for c in colors)
    import colorsys

    hues = sorted(colorsys.rgb_to_hls(*(int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)))[0] for c in colors)
    assert min(np.diff(hues)) > 0.5 / 12 - 0.01


def test_chr_aa_target_carries_compartment_names_and_colours():
    a = _chrysalis_adata(n_spots=97, k=5)
    values, spec = ObsmTarget("chr_aa").compute({"s0": a})
    assert spec.names == [f"compartment_{i}" for i in range(5)]
    assert spec.colors == _as_chrysalis_plots(5, 97)
    np.testing.assert_allclose(values["s0"], a.obsm["chr_aa"], rtol=1e-6)
    # A user's own names and colours (scanpy's uns['<key>_colors'] convention) win.
    a.uns["chr_aa_names"] = ["alveoli", "airway", "vessel", "immune", "edge"]
    a.uns["chr_aa_colors"] = ["red", "#00ff00", "blue", "0.5", "orange"]
    _, spec = ObsmTarget("chr_aa").compute({"s0": a})
    assert spec.names[0] == "alveoli" and spec.colors == ["red", "#00ff00", "blue", "0.5", "orange"]
    _, spec = ObsmTarget("chr_aa", colors=["k"] * 5).compute({"s0": a})
    assert spec.colors == ["k"] * 5


def test_other_obsm_keys_stay_uncoloured_and_bad_colours_are_named():
    a = _chrysalis_adata()
    a.obsm["scores"] = a.obsm["chr_aa"]
    _, spec = ObsmTarget("scores").compute({"s0": a})
    assert spec.names == [f"scores_{i}" for i in range(5)] and spec.colors is None
    with pytest.raises(DataError, match=r"ObsmTarget 'chr_aa': TargetSpec.colors must be 5 colours"):
        ObsmTarget("chr_aa", colors=["red", "not-a-colour", "blue", "red", "red"]).compute({"s0": a})


def test_colours_travel_through_checkpoint_hyperparameters():
    spec = TargetSpec(["compartment_0", "compartment_1"], "composition", ["#db5f57", "#5770db"])
    plain = spec_to_dict(spec)
    assert plain == {"names": ["compartment_0", "compartment_1"], "kind": "composition", "colors": ["#db5f57", "#5770db"]}
    assert as_target_spec(plain) == spec
    assert "colors" not in spec_to_dict(TargetSpec(["a"], "composition"))  # older checkpoints look the same
    assert as_target_spec({"names": ["a"], "kind": "composition"}).colors is None


def _has_colour(png, hex_colour: str, tol: int = 6) -> bool:
    rgb = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    want = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(rgb - want).max(axis=1) <= tol).any())


def test_section_maps_and_depth_plot_use_the_compartment_colours(tmp_path):
    from xpression.evaluation.figures import plot_section_maps
    from xpression.inference.figures import plot_depth_proportions
    from xpression.inference.grid import OutputGrid

    colors = ["#db5f57", "#5770db"]
    u, v = np.meshgrid(np.arange(8) * 100.0, np.arange(6) * 100.0)
    x = (u.ravel() / 700.0)
    predictions = pd.DataFrame({"section_id": "s0", "split": "train", "u_um": u.ravel(), "v_um": v.ravel(),
                                "true/compartment_0": x, "pred/compartment_0": x,
                                "true/compartment_1": 1 - x, "pred/compartment_1": 1 - x})
    names = ["compartment_0", "compartment_1"]
    (png,) = plot_section_maps(predictions, names, tmp_path / "maps", colors=colors)
    assert _has_colour(png, colors[0]) and _has_colour(png, colors[1])
    (plain,) = plot_section_maps(predictions, names, tmp_path / "plain")
    assert not _has_colour(plain, colors[0])  # viridis and coolwarm hold no such red

    maps = np.stack([np.full((4, 3, 3), 0.7), np.full((4, 3, 3), 0.3)]).astype(np.float32)
    grid = OutputGrid((0, 0, 0), (1, 1, 1), (4, 3, 3), (10.0, 10.0, 10.0))
    png = plot_depth_proportions(maps, grid, names, tmp_path / "depth.png", colors=colors)
    # stacked areas at alpha 0.9 over white
    blended = ["#" + "".join(f"{round(0.9 * int(c[i:i + 2], 16) + 0.1 * 255):02x}" for i in (1, 3, 5)) for c in colors]
    assert _has_colour(png, blended[0]) and _has_colour(png, blended[1])

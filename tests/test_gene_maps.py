"""Imputed gene maps: loadings from Chrysalis (as Chrysalis computes them) and from programs
fitted here, the gene store beside the maps, and scores against the phantom's true expression."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml

from xpression.inference.genes import GeneLoadings, chrysalis_loadings
from xpression.inference.predictor import InferenceError
from xpression.runfolder import RUN_CONFIG_KEY
from tests._inference_models import infer_config, two_volume_cohort

torch.set_num_threads(1)


def _chrysalis_adata(rng: np.random.Generator, n_spots: int = 300, k: int = 4, n_genes: int = 30):
    """A section as Chrysalis leaves it (chrysalis.pca then chrysalis.aa, per its source):
    ``uns['chr_pca'] = {'variance_ratio', 'loadings': pca.components_, 'features'}`` over the
    spatially variable genes of ``adata.X`` (normalised log1p), ``obsm['chr_aa'] = alphas`` and
    ``uns['chr_aa'] = {'archetypes', 'alphas', 'loadings': archetypes @ chr_pca loadings[:pcs], 'RSS'}``.
    Spots are exact mixtures of k known profiles, so the archetypes are those profiles."""
    from sklearn.decomposition import PCA

    profiles = rng.uniform(0.0, 5.0, (k, n_genes))
    alphas = rng.dirichlet(np.full(k, 0.3), n_spots)
    alphas[:k] = np.eye(k)  # every profile is present pure (an archetype)
    x = alphas @ profiles
    genes = [f"G{i}" for i in range(n_genes)] + ["NotSV1", "NotSV2"]
    adata = ad.AnnData(X=sp.csr_matrix(np.hstack([x, rng.uniform(0, 1, (n_spots, 2))]).astype(np.float32)),
                       var=pd.DataFrame(index=genes))
    adata.var["spatially_variable"] = [True] * n_genes + [False, False]
    pcs = k - 1
    pca = PCA(n_components=pcs).fit(x)
    adata.obsm["chr_X_pca"] = pca.transform(x)
    adata.uns["chr_pca"] = {"variance_ratio": pca.explained_variance_ratio_, "loadings": pca.components_,
                            "features": genes[:n_genes]}
    archetypes = adata.obsm["chr_X_pca"][:k]  # the pure spots, in PCA space
    adata.obsm["chr_aa"] = alphas
    adata.uns["chr_aa"] = {"archetypes": archetypes, "alphas": alphas,
                           "loadings": np.dot(archetypes, adata.uns["chr_pca"]["loadings"][:pcs, :]), "RSS": np.array([0.0])}
    return adata, profiles


def test_chrysalis_loadings_recover_the_compartment_profiles():
    adata, profiles = _chrysalis_adata(np.random.default_rng(0))
    names = [f"compartment_{i}" for i in range(4)]
    loadings = chrysalis_loadings(adata, names, "section s0")
    assert loadings.genes == [f"G{i}" for i in range(30)] and loadings.targets == names
    np.testing.assert_allclose(loadings.profiles, profiles, atol=1e-4)
    # a spot's compartments times the profiles give back its expression
    genes = loadings.select(["G3", "G17"])
    spots = np.asarray(adata.obsm["chr_aa"][:50].T)  # (K, N), like map channels
    np.testing.assert_allclose(genes.impute(spots).T, np.asarray(adata.X[:50].todense())[:, [3, 17]], atol=1e-3)
    with pytest.raises(InferenceError, match=r"genes \['NotSV1'\] have no loadings"):
        loadings.select(["G1", "NotSV1"])
    with pytest.raises(InferenceError, match="expected \\(3 compartments"):
        chrysalis_loadings(adata, names[:3], "section s0")
    del adata.uns["chr_pca"]
    with pytest.raises(InferenceError, match="chr_pca"):
        chrysalis_loadings(adata, names, "section s0")


def test_impute_keeps_nan_outside_the_mask():
    load = GeneLoadings(["a", "b"], ["g"], np.array([[2.0], [4.0]]), "u", "test")
    comp = np.array([[[0.25, np.nan]], [[0.75, np.nan]]], np.float32)  # (K=2, 1, 2)
    out = load.impute(comp)
    assert out.shape == (1, 1, 2) and out[0, 0, 0] == pytest.approx(3.5) and np.isnan(out[0, 0, 1])


def test_scores_are_one_when_the_maps_are_the_truth(tmp_path):
    from xpression.evaluation.gene_maps import score_gene_volume
    from xpression.inference.grid import OutputGrid

    grid = OutputGrid((0, 0, 0), (1, 1, 1), (3, 8, 8), (10.0, 10.0, 10.0))
    pts = grid.points_um()
    truth = lambda p: np.stack([np.log1p(p[:, 1]), p[:, 2] * 0.01], axis=1)  # noqa: E731
    store = truth(pts).T.reshape(2, 3, 8, 8).astype(np.float32)
    store[:, 0, :2] = np.nan  # outside the tissue
    rows = score_gene_volume(store, grid, ["g1", "g2"], truth, "v")
    assert [r["gene"] for r in rows] == ["g1", "g2"] and rows[0]["n"] == 3 * 64 - 16
    for r in rows:
        assert r["pearson"] == pytest.approx(1.0, abs=1e-5) and r["rmse"] == pytest.approx(0.0, abs=1e-4)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return two_volume_cohort(tmp_path_factory.mktemp("phantom") / "c")


_config = infer_config


def _set_run_config(run: Path, cfg: dict) -> None:
    """Replace a run's config where train.py records it: the folder and every checkpoint."""
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        state[RUN_CONFIG_KEY] = cfg
        torch.save(state, ckpt)


def test_gene_maps_of_fitted_programs_end_to_end(cohort, tmp_path):
    from tests._inference_models import make_run
    from xpression.evaluation.maps import evaluate_inference
    from xpression.inference.pipeline import infer
    from xpression.inference.writers import read_maps

    k = 4
    run = make_run(tmp_path / "run", cohort, names=[f"program_{i}" for i in range(k)])
    config_path = run / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(config_path.read_text())
    cfg["target"] = {"_target_": "xpression.data.targets.ProgramsTarget", "n_programs": k, "method": "archetypes",
                     "n_genes": 1000, "gene_selection": "hvg", "n_pcs": 10, "seed": 0, "fit_sections": None, "reference": None}
    _set_run_config(run, cfg)
    genes = ["Sftpc", "Scgb1a1", "Pecam1", "Cxcl10", "Ptprc"]
    out = tmp_path / "out"
    # a target without loadings, and genes the loadings lack, fail before any sweep
    plain = make_run(tmp_path / "plain", cohort)
    with pytest.raises(InferenceError, match="carries no gene loadings"):
        infer(_config(run=str(plain), output=str(tmp_path / "o1"), genes=genes))
    with pytest.raises(InferenceError, match=r"genes \['NoSuchGene'\] have no loadings"):
        infer(_config(run=str(run), output=str(tmp_path / "o2"), genes=["Sftpc", "NoSuchGene"]))
    with pytest.raises(InferenceError, match=r"genes=\[...\] names Sftpc more than once"):  # duplicate channels and rows
        infer(_config(run=str(run), output=str(tmp_path / "o2"), genes=["Sftpc", "Pecam1", "Sftpc"]))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2" / "mock_0").exists()

    metrics = json.loads((run / "metrics.json").read_text())  # fitted programs matched to truth programs
    (run / "metrics.json").write_text(json.dumps({**metrics, "target_reference": {"program_0": "alveolar", "program_1": "airway"}}))
    icfg = _config(run=str(run), output=str(out), genes=genes, figures=True, bigtiff=False)
    summary = infer(icfg)
    vol = summary["volumes"]["mock_0"]
    assert vol["genes"]["genes"] == genes and vol["genes"]["units"].startswith("log1p(counts per 10,000")
    maps, _ = read_maps(out / "mock_0" / "maps.ome.zarr")
    gmaps, gmeta = read_maps(out / "mock_0" / "genes.ome.zarr")
    assert gmeta["complete"] and gmeta["targets"] == genes and gmeta["grid"] == read_maps(out / "mock_0" / "maps.ome.zarr")[1]["grid"]
    from xpression.inference.genes import gene_loadings
    from xpression.inference.runs import resolve_run

    load = gene_loadings(resolve_run(run), [f"program_{i}" for i in range(k)]).select(genes)
    m = maps[:].astype(np.float32)
    g = gmaps[:].astype(np.float32)
    assert np.array_equal(np.isnan(g[0]), np.isnan(m[0])) and np.isfinite(g).any()
    np.testing.assert_allclose(g, load.impute(m), rtol=2e-3, atol=2e-3, equal_nan=True)  # float16 storage
    # archetype profiles are log1p counts per 10k: positive, markers above background somewhere
    assert np.all(load.profiles > 0) and load.profiles.max() > 3
    evaluate_inference(icfg, summary)
    programs = pd.read_csv(out / "evaluation.csv")  # the maps scored as the truth programs they were matched to
    assert programs["pearson/alveolar"].notna().any() and "pearson/program_0" not in programs
    assert (out / "mock_0" / "figures" / "truth_vs_prediction.png").exists()
    scores = pd.read_csv(out / "gene_evaluation.csv")
    assert set(scores["gene"]) == set(genes) and set(scores["volume_id"]) == {"mock_0", "infected_0"}
    assert scores["pearson"].between(-1, 1).all() and (scores["n"] > 100).all() and scores["rmse"].notna().all()
    assert (out / "mock_0" / "figures" / "genes_vs_truth.png").exists()
    # rerun: the finished gene store is kept; a different gene list in the same place is refused
    infer(_config(run=str(run), output=str(out), genes=genes, figures=False, evaluate=False, ct_preview=False))
    with pytest.raises(InferenceError, match="holds gene maps of another run, loadings or gene list"):
        infer(_config(run=str(run), output=str(out), genes=genes[:2], figures=False))


def test_refit_must_reproduce_the_training_labels(cohort, tmp_path):
    from tests._inference_models import make_run
    from xpression.inference.genes import gene_loadings
    from xpression.inference.runs import resolve_run

    run = make_run(tmp_path / "run", cohort, names=["program_0", "program_1", "program_2"])
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    cfg["target"] = {"_target_": "xpression.data.targets.ProgramsTarget", "n_programs": 3, "method": "nmf",
                     "n_genes": 50, "gene_selection": "hvg", "seed": 0}
    _set_run_config(run, cfg)
    from xpression.data.manifest import load_manifest
    from xpression.data.sections import load_section

    sec = load_manifest(cohort).sections[0]
    barcodes = np.asarray(load_section(sec).adata.obs_names)[:20]
    table = pd.DataFrame({"section_id": sec.id, "barcode": barcodes, **{f"true/program_{i}": 1 / 3 for i in range(3)}})
    table.to_csv(run / "predictions.csv", index=False)
    with pytest.raises(InferenceError, match="does not reproduce its training labels"):
        gene_loadings(resolve_run(run), ["program_0", "program_1", "program_2"])
    (run / "predictions.csv").unlink()
    nmf = gene_loadings(resolve_run(run), ["program_0", "program_1", "program_2"])
    assert nmf.profiles.shape == (3, 50) and np.all(nmf.profiles >= 0) and nmf.source.startswith("nmf programs")


def test_genes_key_is_checked_with_the_other_infer_keys():
    from xpression.config import ConfigError, check_infer_config

    check_infer_config(_config(run="r", genes=["Sftpc", "Pecam1"]))
    check_infer_config(_config(run="r"))  # genes: null, no gene maps
    for bad in ("Sftpc", [], ["Sftpc", 3]):
        with pytest.raises(ConfigError, match=r"genes: must be (null or a list of gene names|a list of strings or null)"):
            check_infer_config(_config(run="r", genes=bad))

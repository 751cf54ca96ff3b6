"""Targets of each kind on small synthetic AnnData."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from xpression.data.geometry import DataError
from xpression.data.targets import GenesTarget, ObsmTarget, ProgramsTarget, TargetSpec


def _adata(n=120, g=60, seed=0, k=3):
    rng = np.random.default_rng(seed)
    progs = rng.dirichlet(np.full(k, 0.3), size=n)
    sig_rng = np.random.default_rng(100)  # the same programs in every section
    signatures = sig_rng.gamma(0.5, 1.0, size=(k, g)) * (sig_rng.random((k, g)) < 0.4)
    signatures += 0.01
    lam = 200 * progs @ (signatures / signatures.sum(1, keepdims=True)) * g / 10
    counts = rng.poisson(lam)
    a = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    a.obs_names = [f"s{seed}_{i}" for i in range(n)]
    a.var_names = [f"G{j}" for j in range(g)]
    a.obsm["spatial"] = rng.uniform(0, 1000, size=(n, 2))
    a.obsm["programs_true"] = progs * 3.0  # not yet compositions
    a.uns["programs"] = np.array([f"p{i}" for i in range(k)], dtype=object)
    return a


def test_obsm_target_renormalises_and_names():
    adatas = {"a": _adata(seed=0), "b": _adata(seed=1)}
    values, spec = ObsmTarget("programs_true").compute(adatas)
    assert spec == TargetSpec(["p0", "p1", "p2"], "composition")
    assert values["a"].dtype == np.float32 and values["a"].shape == (120, 3)
    np.testing.assert_allclose(values["b"].sum(1), 1.0, atol=1e-6)
    raw, spec = ObsmTarget("programs_true", renormalize=False, kind="counts").compute(adatas)
    assert spec.kind == "counts"
    np.testing.assert_allclose(raw["a"].sum(1), 3.0, atol=1e-5)


def test_obsm_unknown_key_lists_available():
    with pytest.raises(DataError, match=r"obsm key 'chr_aa' not found; available obsm keys: \['programs_true', 'spatial'\]"):
        ObsmTarget("chr_aa").compute({"a": _adata()})


def test_obsm_table_with_mismatched_ids(tmp_path):
    a = _adata()
    df = pd.DataFrame(a.obsm["programs_true"], index=a.obs_names, columns=["x", "y", "z"])
    df.iloc[:100].to_csv(tmp_path / "a_scores.csv")
    with pytest.raises(DataError, match=r"a_scores\.csv.*spot ids do not match.*20 of 120"):
        ObsmTarget(table=str(tmp_path / "{section}_scores.csv")).compute({"a": a})
    df.iloc[::-1].to_csv(tmp_path / "a_scores.csv")
    values, spec = ObsmTarget(table=str(tmp_path / "{section}_scores.csv")).compute({"a": a})
    assert spec.names == ["x", "y", "z"]
    np.testing.assert_allclose(values["a"], a.obsm["programs_true"] / 3.0, atol=1e-6)


def test_nan_target_rejected():
    a = _adata()
    a.obsm["programs_true"][3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        ObsmTarget().compute({"a": a})


def test_genes_target_log_normalised():
    a = _adata()
    values, spec = GenesTarget(genes=["G3", "G7"]).compute({"a": a})
    assert spec == TargetSpec(["G3", "G7"], "log_expression")
    x = a.X.toarray()
    expected = np.log1p(x[:, [3, 7]] / x.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(values["a"], expected, rtol=1e-4)
    hvg, spec = GenesTarget(n_top=10).compute({"a": a, "b": _adata(seed=1)})
    assert len(spec.names) == 10 and hvg["b"].shape == (120, 10)


def test_genes_missing_named():
    with pytest.raises(DataError, match=r"genes not found: \['Sftpc', 'Foxj1'\]"):
        GenesTarget(genes=["G1", "Sftpc", "Foxj1"]).compute({"a": _adata()})


@pytest.mark.parametrize("method", ["nmf", "archetypes"])
def test_programs_target_recovers_compositions(method):
    a, b = _adata(seed=0), _adata(seed=1)
    values, spec = ProgramsTarget(n_programs=3, method=method, n_genes=40, n_pcs=5).compute({"a": a, "b": b})
    assert spec.kind == "composition" and spec.names == ["program_0", "program_1", "program_2"]
    est = np.concatenate([values["a"], values["b"]])
    np.testing.assert_allclose(est.sum(1), 1.0, atol=1e-5)
    true = np.concatenate([a.obsm["programs_true"], b.obsm["programs_true"]]) / 3.0
    corr = np.corrcoef(true.T, est.T)[:3, 3:]
    assert np.sort(corr.max(axis=1)).min() > 0.6  # each true program has a matching fitted one

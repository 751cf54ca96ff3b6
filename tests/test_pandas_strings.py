"""pandas 3 makes its string dtype the default; pandas 2 has the same behaviour behind
`future.infer_string`. The synthetic cohort must write, and the data path read, under it."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from xpression.data.manifest import load_manifest
from xpression.data.sections import load_section
from xpression.data.targets import GenesTarget, ObsmTarget
from xpression.phantom import generate_cohort


@pytest.fixture
def string_dtype():
    """pandas' string dtype for inferred strings, as pandas 3 has by default."""
    try:
        pd.get_option("future.infer_string")
    except KeyError:  # pandas.errors.OptionError subclasses KeyError
        pytest.skip("this pandas has no future.infer_string switch")
    with pd.option_context("future.infer_string", True):
        assert isinstance(pd.Index(["a"]).dtype, pd.StringDtype)
        yield


def test_cohort_writes_and_reads_with_the_string_dtype(string_dtype, tiny_cohort, tmp_path):
    manifest = generate_cohort(tmp_path / "c", preset="tiny", progress=False)
    cohort, reference = load_manifest(manifest), load_manifest(tiny_cohort)
    for entry, ref_entry in zip(cohort.sections, reference.sections):
        section, ref = load_section(entry), ad.read_h5ad(ref_entry.adata)
        assert list(section.adata.obs_names) == list(ref.obs_names) and len(ref.obs_names) > 50
        assert list(section.adata.var_names) == list(ref.var_names)
        assert (section.adata.X != ref.X).nnz == 0
        assert list(section.adata.var["feature_types"].astype(str)) == list(ref.var["feature_types"].astype(str))
        adatas = {entry.id: section.adata}
        values, spec = ObsmTarget().compute(adatas)
        np.testing.assert_allclose(values[entry.id].sum(axis=1), 1.0, atol=1e-5)
        assert spec.names == list(reference.truth.programs)
        genes, gspec = GenesTarget(n_top=5).compute(adatas)
        assert genes[entry.id].shape == (section.adata.n_obs, 5) and len(gspec.names) == 5

"""The benchmark preset and the realism options: fixed calibration, recorded z off the true
plane, non-affine section warp, expression the tissue does not explain, lesion placement."""

from __future__ import annotations

import copy

import anndata
import numpy as np
import pytest
import yaml

from xpression.data.geometry import Plane
from xpression.data.manifest import load_manifest
from xpression.data.registration import register_section
from xpression.phantom import Phantom, PhantomError, generate_cohort
from xpression.phantom.__main__ import main
from xpression.phantom.ceiling import morphology_ceiling
from xpression.phantom.presets import resolve_params
from xpression.phantom.programs import unexplained_factor
from xpression.phantom.spec import build_spec
from xpression.phantom.visium import affine_apply, ct_from_st, st_from_ct

REALISM = dict(z_error_um=20.0, deformation_um=8.0, unexplained_sd=0.35, lesion_placement="uniform")


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    out = tmp_path_factory.mktemp("realistic") / "tiny"
    path = generate_cohort(out, preset="tiny", seed=3, progress=False, **REALISM)
    return path, yaml.safe_load(path.read_text()), Phantom.from_spec(path)


def _spec(preset: str = "tiny", seed: int = 0, **overrides) -> dict:
    return build_spec(resolve_params(preset, **overrides), seed, preset)


def test_benchmark_preset_has_two_animals_per_condition():
    spec = _spec("benchmark")
    ids = [v["id"] for v in spec["volumes"]]
    assert ids == ["mock_0", "infected_0", "vaccinated_0", "mock_1", "infected_1", "vaccinated_1"]
    assert [v["condition"] for v in spec["volumes"]] == ["mock", "infected", "vaccinated"] * 2
    prm = spec["params"]
    assert prm["lesion_placement"] == "uniform" and not prm["fixed_calibration"]
    assert prm["z_error_um"] == 20.0 and prm["deformation_um"] > 0 and prm["unexplained_sd"] > 0
    assert all(v["expression_field"] for v in spec["volumes"])
    # the default and tiny presets keep every option off
    for preset in ("tiny", "default"):
        spec = _spec(preset)
        assert all(v["expression_field"] is None for v in spec["volumes"])
        for v in spec["volumes"]:
            for s in v["sections"]:
                assert s["z_recorded_um"] == s["z_um"] and s["deformation"] == []


def test_fixed_calibration_is_one_scanner_for_all_animals():
    per_animal = [v["calibration"] for v in _spec("benchmark")["volumes"]]
    fixed = [v["calibration"] for v in _spec("benchmark", fixed_calibration=True)["volumes"]]
    assert len({tuple(c.values()) for c in per_animal}) == 6
    assert len({tuple(c.values()) for c in fixed}) == 1
    assert fixed[0] == per_animal[0]
    # nothing else moves: the same structures, sections and fields
    a, b = _spec("benchmark"), _spec("benchmark", fixed_calibration=True)
    for va, vb in zip(a["volumes"], b["volumes"]):
        assert va["lesions"] == vb["lesions"] and va["sections"] == vb["sections"]


def test_noise_scale_multiplies_every_scanners_noise_and_moves_nothing_else():
    a, b = _spec("benchmark"), _spec("benchmark", noise_scale=3.0)
    for va, vb in zip(a["volumes"], b["volumes"]):
        ca, cb = dict(va["calibration"]), dict(vb["calibration"])
        assert cb.pop("noise_sigma") == pytest.approx(3.0 * ca.pop("noise_sigma"), rel=1e-12)
        assert ca == cb
        assert va["lesions"] == vb["lesions"] and va["sections"] == vb["sections"]


def test_lesion_placement_off_plane_or_uniform():
    near_or_far = 0
    for seed in range(12):
        off = _spec(seed=seed)
        for vol in off["volumes"]:
            dz = [abs(vol["lesions"][0]["center"][0] - s["z_um"]) for s in vol["sections"]]
            assert all(60.0 <= d <= 150.0 for d in dz)
        uni = _spec(seed=seed, lesion_placement="uniform")
        for vol in uni["volumes"]:
            dz = [abs(vol["lesions"][0]["center"][0] - s["z_um"]) for s in vol["sections"]]
            near_or_far += any(d < 60.0 or d > 150.0 for d in dz)
    assert near_or_far >= 6  # of 36 volumes; under off_plane it is 0


def test_recorded_z_is_off_and_the_truth_keeps_the_true_plane(realistic):
    path, man, ph = realistic
    offsets = []
    for vol in man["volumes"]:
        for sec in vol["sections"]:
            true_sec = next(s for s in ph.volume(vol["id"])["sections"] if s["id"] == sec["id"])
            assert sec["z_um"] == true_sec["z_recorded_um"]
            offsets.append(sec["z_um"] - true_sec["z_um"])
            ad = anndata.read_h5ad(path.parent / sec["adata"])
            np.testing.assert_allclose(ad.obsm["ct_position_um"][:, 0], true_sec["z_um"])
            assert ad.uns["phantom"]["z_recorded_um"] == sec["z_um"]
            again = ph.spot_programs(vol["id"], ad.obsm["ct_position_um"][:, 1:], true_sec["z_um"])
            np.testing.assert_allclose(again, ad.obsm["programs_true"], atol=1e-5)
    offsets = np.abs(offsets)
    assert offsets.max() <= 20.0 + 0.05 and offsets.max() > 1.0
    # the data loader uses the recorded plane
    cohort = load_manifest(path)
    assert [s.z_um for s in cohort.sections] == [s["z_um"] for _, s in _pairs(man)]


def _pairs(man):
    for vol in man["volumes"]:
        for sec in vol["sections"]:
            yield vol, sec


def test_section_warp_is_smooth_bounded_and_not_affine(realistic):
    path, man, ph = realistic
    cohort = load_manifest(path)
    for (vol, sec), entry in zip(_pairs(man), cohort.sections):
        spec_sec = next(s for s in ph.volume(vol["id"])["sections"] if s["id"] == sec["id"])
        ad = anndata.read_h5ad(path.parent / sec["adata"])
        px = ad.obsm["spatial"].astype(float)
        uv = ad.obsm["ct_position_um"][:, [2, 1]]
        np.testing.assert_allclose(st_from_ct(spec_sec, uv), px, atol=1e-6)  # spots sit where the warp puts them
        np.testing.assert_allclose(ct_from_st(spec_sec, px), uv, atol=1e-6)
        plain = affine_apply(np.linalg.inv(np.vstack([spec_sec["st_affine"], [0, 0, 1]]))[:2], px)
        shift = np.linalg.norm(uv - plain, axis=1)
        assert 0.5 < shift.max() <= np.sqrt(2) * 8.0 + 1e-6
        # the best affine from exact spot positions still misses: the warp is not affine
        design = np.hstack([px, np.ones((len(px), 1))])
        coef, *_ = np.linalg.lstsq(design, uv, rcond=None)
        assert np.sqrt(((design @ coef - uv) ** 2).sum(1).mean()) > 0.3
        # the landmarks see the warp too, and the registration still passes its residual check
        fit = register_section(entry.landmarks, px, plane=Plane.axial(entry.z_um)).affine
        err = np.linalg.norm(fit.apply(px) - uv, axis=1)
        assert err.max() < 27.5


def test_unexplained_expression_lowers_the_ceiling(realistic):
    path, man, ph = realistic
    vol = man["volumes"][1]
    sec = vol["sections"][0]
    ad = anndata.read_h5ad(path.parent / sec["adata"])
    yx = ad.obsm["ct_position_um"][:, 1:]
    z = float(ad.obsm["ct_position_um"][0, 0])
    with_field = morphology_ceiling(ph, vol["id"], yx, z, draws=8)
    assert 0.5 < with_field["pearson_mean"] < 0.99 and with_field["r2_mean"] < with_field["pearson_mean"]
    spec = copy.deepcopy(ph.spec)
    for v in spec["volumes"]:
        v["expression_field"] = None
    plain = Phantom(spec)
    without = morphology_ceiling(plain, vol["id"], yx, z, draws=8)
    assert without["pearson_mean"] == pytest.approx(1.0) and without["r2_mean"] == pytest.approx(1.0)
    # the field changes the truth, not the CT
    assert np.abs(plain.spot_programs(vol["id"], yx, z) - ad.obsm["programs_true"]).max() > 0.05
    block = ((5, 7), (60, 70), (60, 70))
    np.testing.assert_array_equal(plain.render_block(vol["id"], *block), ph.render_block(vol["id"], *block))


def test_unexplained_factor_is_pointwise_with_unit_mean():
    field = _spec(unexplained_sd=0.35)["volumes"][0]["expression_field"]
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1000, (4000, 3))
    whole = unexplained_factor(pts, field)
    parts = np.concatenate([unexplained_factor(pts[i:i + 7], field) for i in range(0, len(pts), 7)])
    np.testing.assert_array_equal(whole, parts)
    assert whole.shape == (4000, 6) and whole.min() > 0
    assert np.log(whole).std(axis=0).mean() == pytest.approx(0.35, rel=0.25)


@pytest.mark.parametrize("overrides, words", [
    (dict(lesion_placement="sideways"), "lesion_placement"),
    (dict(z_error_um=-1.0), "z_error_um"),
    (dict(z_error_um=30.0), "z_error_um"),
    (dict(fixed_calibration="yes"), "fixed_calibration"),
    (dict(unexplained_length_um=0.0), "unexplained_length_um"),
    (dict(noise_scale=0.0), "noise_scale"),
    (dict(noise_scale="loud"), "noise_scale"),
])
def test_bad_realism_parameters(overrides, words):
    with pytest.raises(PhantomError, match=words):
        resolve_params("tiny", **overrides)


def test_cli_param_sets_any_preset_key(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "o"), "--param", "nonsense", "--quiet"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--param", "lesion_placement=sideways", "--quiet"]) == 2
    assert "lesion_placement" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    rc = main(["--out", str(tmp_path / "c"), "--volumes", "2", "--size-um", "128", "400", "400", "--quiet",
               "--param", "fixed_calibration=true", "--param", "z_error_um=15"])
    assert rc == 0
    spec = Phantom.from_spec(tmp_path / "c" / "cohort.yaml").spec
    assert spec["params"]["fixed_calibration"] is True and spec["params"]["z_error_um"] == 15.0
    assert spec["volumes"][0]["calibration"] == spec["volumes"][1]["calibration"]

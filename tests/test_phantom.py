"""Tests of the synthetic cohort generator (tiny preset, generated once per module)."""

from __future__ import annotations

import copy
import csv
import json
import time

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import yaml
import zarr

from xpression.data.registration import fit_affine
from xpression.phantom import Phantom, PhantomError, generate_cohort
from xpression.phantom.__main__ import main

SPOT_RADIUS_UM = 27.5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "tiny"
    t0 = time.perf_counter()
    manifest = generate_cohort(out, preset="tiny", seed=7, progress=False)
    seconds = time.perf_counter() - t0
    return manifest, seconds


@pytest.fixture(scope="module")
def manifest(cohort):
    path, _ = cohort
    return path, yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def phantom(manifest):
    path, _ = manifest
    return Phantom.from_spec(path.parent / "truth" / "phantom.json")


def _sections(man):
    for vol in man["volumes"]:
        for sec in vol["sections"]:
            yield vol, sec


def test_tiny_is_fast_and_complete(cohort, manifest):
    path, seconds = cohort
    assert seconds < 30.0
    root = path.parent
    _, man = manifest
    assert [v["condition"] for v in man["volumes"]] == ["mock", "infected", "vaccinated"]
    for vol, sec in _sections(man):
        assert (root / vol["image"] / "zarr.json").is_file()
        assert (root / sec["adata"]).is_file() and (root / sec["landmarks"]).is_file()
        assert isinstance(sec["z_um"], float)
    assert (root / man["truth"]["spec"]).is_file()
    assert set(man["truth"]["fields"]) == {v["id"] for v in man["volumes"]}
    assert man["truth"]["programs"] == ["alveolar", "airway", "vascular", "infected", "immune", "remodelling"]
    # no temporary folders left next to the output
    assert sorted(p.name for p in root.parent.iterdir()) == ["tiny"]


def test_manifest_loads_with_data_loader(manifest):
    load_manifest = pytest.importorskip("xpression.data.manifest").load_manifest
    path, man = manifest
    c = load_manifest(path)
    assert [v.id for v in c.volumes] == [v["id"] for v in man["volumes"]]


def test_omezarr_metadata(manifest, phantom):
    path, man = manifest
    for vol in man["volumes"]:
        g = zarr.open_group(str(path.parent / vol["image"]), mode="r")
        ome = g.attrs["ome"]
        assert ome["version"] == "0.5"
        ms = ome["multiscales"][0]
        assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
        assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in ms["axes"])
        shape = phantom.shape(vol["id"])
        assert len(ms["datasets"]) >= 2
        for lv, ds in enumerate(ms["datasets"]):
            arr = g[ds["path"]]
            assert arr.dtype == np.uint8 and arr.chunks == (64, 64, 64)
            assert ds["coordinateTransformations"][0]["scale"] == pytest.approx([6.4 * 2**lv] * 3)
            assert arr.shape == tuple(-(-s // 2**lv) for s in shape)
        level0 = g["0"][...]
        assert 20 < level0.mean() < 230 and level0.std() > 20  # tissue contrast, not blank


def test_render_block_matches_written_volume(manifest, phantom):
    path, man = manifest
    vid = man["volumes"][1]["id"]
    g = zarr.open_group(str(path.parent / man["volumes"][1]["image"]), mode="r")
    block = phantom.render_block(vid, (30, 40), (50, 80), (60, 70))  # crosses chunk borders
    np.testing.assert_array_equal(block, g["0"][30:40, 50:80, 60:70])


def test_h5ad_as_scanpy_expects(manifest):
    path, man = manifest
    for vol, sec in _sections(man):
        ad = anndata.read_h5ad(path.parent / sec["adata"])
        assert 50 <= ad.n_obs <= 150 and ad.n_vars >= 200
        assert sp.issparse(ad.X) and ad.X.format == "csr"
        assert np.issubdtype(ad.X.dtype, np.integer) and ad.X.data.min() >= 0
        lib = ad.X.sum(axis=1).A1
        assert lib.min() > 100 and lib.max() / lib.min() > 2  # varied library sizes
        assert ad.obsm["spatial"].shape == (ad.n_obs, 2)
        assert {"array_row", "array_col", "in_tissue"} <= set(ad.obs.columns)
        assert np.all((ad.obs["array_row"] % 2) == (ad.obs["array_col"] % 2))
        prog = ad.obsm["programs_true"]
        assert prog.shape == (ad.n_obs, 6) and prog.min() >= 0
        np.testing.assert_allclose(prog.sum(axis=1), 1.0, atol=1e-5)
        assert list(ad.uns["programs"]) == man["truth"]["programs"]
        info = ad.uns["spatial"][sec["id"]]
        sf = info["scalefactors"]
        for img, key in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
            im = info["images"][img]
            assert im.ndim == 3 and im.shape[2] == 3
            # every spot falls inside the image
            assert (ad.obsm["spatial"] * sf[key]).max(axis=0)[0] < im.shape[1]
            assert (ad.obsm["spatial"] * sf[key]).max(axis=0)[1] < im.shape[0]
        scale = ad.uns["phantom"]["st_affine"][:, :2]
        px_per_um = np.sqrt(abs(np.linalg.det(scale)))
        assert 0.5 <= px_per_um <= 2.0
        assert sf["spot_diameter_fullres"] == pytest.approx(55.0 * px_per_um)


def test_programs_follow_marker_genes(manifest):
    from xpression.phantom.genes import MARKERS

    path, man = manifest
    ad = anndata.read_h5ad(path.parent / man["volumes"][1]["sections"][0]["adata"])
    x = np.asarray(ad.X.todense(), float)
    x /= x.sum(axis=1, keepdims=True)
    prog = ad.obsm["programs_true"]
    genes = list(ad.var_names)
    checked = 0
    for p, name in enumerate(man["truth"]["programs"]):
        if prog[:, p].std() > 0.02:
            score = x[:, [genes.index(g) for g in MARKERS[name]]].sum(axis=1)
            r = np.corrcoef(prog[:, p], score)[0, 1]
            assert r > 0.8, (name, r)
            checked += 1
    assert checked >= 4


def _read_landmarks(path):
    """BigWarp's layout: every field quoted, no header, name, active, moving x, y, fixed x, y."""
    text = path.read_text()
    assert text.startswith('"Pt-0","true","') and text.endswith('"\n') and "\r" not in text
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert all(len(r) == 6 and r[1] == "true" for r in rows)
    arr = np.array([[float(v) for v in r[2:]] for r in rows])
    return arr[:, 2:4], arr[:, 0:2]  # fixed (CT u, v um), moving (ST px)


def test_landmark_affine_maps_spots_within_a_radius(manifest):
    path, man = manifest
    for vol, sec in _sections(man):
        fixed, moving = _read_landmarks(path.parent / sec["landmarks"])
        assert 10 <= len(fixed) <= 20
        ad = anndata.read_h5ad(path.parent / sec["adata"])
        # moving = the ST image (BigWarp practice): the true CT -> ST affine maps fixed onto moving
        st_affine = np.asarray(ad.uns["phantom"]["st_affine"])
        scale = np.sqrt(abs(np.linalg.det(st_affine[:, :2])))
        mapped = fixed @ st_affine[:, :2].T + st_affine[:, 2]
        assert np.median(np.linalg.norm(mapped - moving, axis=1)) < 4 * 5.0 * scale
        # tiny least squares: [x, y, 1] @ coef = [u, v]
        design = np.hstack([moving, np.ones((len(moving), 1))])
        coef, *_ = np.linalg.lstsq(design, fixed, rcond=None)
        uv = np.hstack([ad.obsm["spatial"], np.ones((ad.n_obs, 1))]) @ coef
        true_uv = ad.obsm["ct_position_um"][:, [2, 1]]
        err = np.linalg.norm(uv - true_uv, axis=1)
        assert err.max() < SPOT_RADIUS_UM, err.max()
        # the placement error is real: landmarks do not fit exactly
        resid = np.linalg.norm(design @ coef - fixed, axis=1)
        assert 1.0 < resid.mean() < 15.0
        np.testing.assert_allclose(fit_affine(moving, fixed).matrix, coef.T, atol=1e-6)
        assert np.allclose(ad.obsm["ct_position_um"][:, 0], sec["z_um"])


def test_truth_field_and_api(manifest, phantom):
    path, man = manifest
    vid = man["volumes"][1]["id"]
    g = zarr.open_group(str(path.parent / man["truth"]["fields"][vid]), mode="r")
    ms = g.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    spacing = ms["datasets"][0]["coordinateTransformations"][0]["scale"][1]
    field = g["0"][...]
    assert field.dtype == np.float32 and field.shape[0] == 6
    np.testing.assert_allclose(field.sum(axis=0), 1.0, atol=1e-5)
    idx = np.array([[2, 10, 20], [5, 30, 3], [0, 0, 0]])
    got = phantom.programs_at(vid, idx * spacing)
    assert got.dtype == np.float32 and got.shape == (3, 6)
    np.testing.assert_allclose(got, field[:, idx[:, 0], idx[:, 1], idx[:, 2]].T, atol=1e-5)
    assert phantom.program_names == man["truth"]["programs"]
    with pytest.raises(PhantomError):
        phantom.programs_at("nope", idx * 1.0)


def test_spot_programs_reproducible_from_spec(manifest, phantom):
    path, man = manifest
    for vol, sec in _sections(man):
        ad = anndata.read_h5ad(path.parent / sec["adata"])
        again = phantom.spot_programs(vol["id"], ad.obsm["ct_position_um"][:, 1:], sec["z_um"])
        np.testing.assert_allclose(again, ad.obsm["programs_true"], atol=1e-5)


def test_offplane_lesion_changes_spot_programs_not_the_slice(manifest, phantom):
    """A small lesion 55 um above the plane: CT within +-20 um identical, programs differ."""
    path, man = manifest
    vol, sec = man["volumes"][0], man["volumes"][0]["sections"][0]
    vid, z = vol["id"], sec["z_um"]
    ad = anndata.read_h5ad(path.parent / sec["adata"])
    yx = ad.obsm["ct_position_um"][:, 1:]
    centre = yx.mean(axis=0)
    spot = yx[np.argmin(np.linalg.norm(yx - centre, axis=1))]

    spec = copy.deepcopy(phantom.spec)
    spec["volumes"][0]["lesions"].append({
        "center": [z + 55.0, float(spot[0]), float(spot[1])], "radii_um": [12.0, 12.0, 12.0],
        "rotation": np.eye(3).tolist(), "noise_amp": 0.0, "waves": [], "density": 0.9,
        "infection": 1.0, "immune": 1.0, "remodelling": 0.5})
    changed = Phantom.from_spec(spec)

    vox = phantom.voxel_size_um(vid)[0]
    ny, nx = phantom.shape(vid)[1:]
    iz0, iz1 = int(np.ceil((z - 20.0) / vox)), int(np.floor((z + 20.0) / vox)) + 1
    before = phantom.render_block(vid, (iz0, iz1), (0, ny), (0, nx))
    after = changed.render_block(vid, (iz0, iz1), (0, ny), (0, nx))
    np.testing.assert_array_equal(before, after)  # the whole +-20 um patch depth
    above = (int(round((z + 55.0) / vox)),) * 2
    above = (above[0], above[0] + 1)
    assert not np.array_equal(phantom.render_block(vid, above, (0, ny), (0, nx)),
                              changed.render_block(vid, above, (0, ny), (0, nx)))

    p0 = phantom.spot_programs(vid, spot[None], z)[0]
    p1 = changed.spot_programs(vid, spot[None], z)[0]
    names = phantom.program_names
    assert p1[names.index("infected")] - p0[names.index("infected")] > 0.10
    assert p1[names.index("immune")] - p0[names.index("immune")] > 0.10
    assert np.abs(p1 - p0).sum() > 0.4


def test_deterministic(tmp_path, manifest):
    path, man = manifest
    again = generate_cohort(tmp_path / "again", preset="tiny", seed=7, progress=False)
    a, b = path.parent, again.parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:  # zarr chunks, h5ad, csv, json, yaml: all byte-identical
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    other = generate_cohort(tmp_path / "other", preset="tiny", seed=8, progress=False, volumes=1)
    g1 = zarr.open_group(str(a / man["volumes"][0]["image"]), mode="r")["0"][...]
    g2 = zarr.open_group(str(other.parent / "volumes" / "mock_0.ome.zarr"), mode="r")["0"][...]
    assert not np.array_equal(g1, g2)


SMALL = dict(volumes=1, size_um=[128.0, 400.0, 400.0], progress=False)


@pytest.mark.parametrize("kwargs, words", [
    (dict(preset="huge"), "unknown preset"),
    (dict(size_um=[-1.0, 400.0, 400.0]), "size_um[z]"),
    (dict(size_um=[128.0, 0.0, 400.0]), "size_um[y]"),
    (dict(voxel_um=0.0), "voxel_um"),
    (dict(spot_pitch_um=50.0), "spot_pitch_um"),
    (dict(volumes=0), "volumes"),
    (dict(seed=-3), "seed"),
])
def test_bad_parameters(tmp_path, kwargs, words):
    args = {**SMALL, **kwargs}
    with pytest.raises(PhantomError, match=None) as info:
        generate_cohort(tmp_path / "out", **args)
    assert words in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(PhantomError, match="not empty"):
        generate_cohort(out, **SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    manifest = generate_cohort(out, overwrite=True, **SMALL)
    assert manifest == out / "cohort.yaml" and manifest.is_file()
    assert not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    json.loads((out / "truth" / "phantom.json").read_text())


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(PhantomError, match="not a folder"):
        generate_cohort(blocker / "cohort", **SMALL)
    with pytest.raises(PhantomError, match="not a folder"):
        generate_cohort(blocker, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "o"), "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "Traceback" not in err
    assert main(["--out", str(tmp_path / "o"), "--spot-pitch-um", "40", "--quiet"]) == 2
    assert "spot_pitch_um" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # was accepted silently
        main(["--out", str(tmp_path / "o"), "--workers", "-3"])
    assert stop.value.code == 2 and "--workers must be a positive number of threads, got -3" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_cohort(tmp_path, capsys):
    rc = main(["--out", str(tmp_path / "c"), "--volumes", "1", "--size-um", "128", "400", "400",
               "--sections", "2", "--tiff"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mock_0" in out and "time:" in out
    man = yaml.safe_load((tmp_path / "c" / "cohort.yaml").read_text())
    secs = man["volumes"][0]["sections"]
    assert len(secs) == 2 and secs[0]["z_um"] < secs[1]["z_um"]
    import tifffile

    tif = tifffile.imread(tmp_path / "c" / "volumes" / "mock_0.tif")
    g = zarr.open_group(str(tmp_path / "c" / "volumes" / "mock_0.ome.zarr"), mode="r")
    np.testing.assert_array_equal(tif, g["0"][...])


def test_chunking_and_thread_count_do_not_show(tmp_path, phantom):
    from xpression.phantom.ct import blurred_attenuation

    vid = phantom.volume_ids[1]
    whole = blurred_attenuation(phantom, vid, (0, 20), (60, 70), (60, 70))
    halves = np.concatenate([blurred_attenuation(phantom, vid, (0, 9), (60, 70), (60, 70)),
                             blurred_attenuation(phantom, vid, (9, 20), (60, 70), (60, 70))])
    np.testing.assert_array_equal(whole, halves)
    one = generate_cohort(tmp_path / "w1", workers=1, **SMALL).parent
    two = generate_cohort(tmp_path / "w2", workers=2, **SMALL).parent
    for f in sorted((one / "volumes").rglob("*")):
        if f.is_file():
            assert f.read_bytes() == (two / f.relative_to(one)).read_bytes(), f


def test_the_cohort_folder_has_the_mode_a_new_folder_gets(cohort):
    """It was built in a private temporary folder (0700) and moved into place as it was, so
    collaborators could not read it."""
    import os
    import stat

    manifest, _ = cohort
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(manifest.parent.stat().st_mode) == 0o777 & ~umask

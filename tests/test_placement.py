"""Registered sections against their volume: one distinct message per cause, before any training."""

import json

import pytest
import yaml

from tests._bigwarp import SECTION, write_study
from xpression.data import ManifestError, load_manifest
from xpression.data.datamodule import XPressionDataModule
from xpression.data.geometry import DataError
from xpression.data.sampling import SpotSampler
from xpression.data.splits import SpatialBlocksSplit


def _dm(manifest, **kw) -> XPressionDataModule:
    return XPressionDataModule(manifest, split=SpatialBlocksSplit(block_um=300.0), check_tissue_mask=False, **kw)


def _raises(manifest, match, **kw):
    dm = _dm(manifest, **kw)
    with pytest.raises(DataError, match=match):
        dm.target_spec
    assert dm._datasets is None


def test_study_places_every_spot(tmp_path):
    dm = _dm(write_study(tmp_path)["manifest"])
    assert len(dm.spots) == 270 and dm.spots["z_um"].eq(200.0).all()


def test_patch_larger_than_volume(tmp_path):
    sampler = SpotSampler(patch_size_um=[34.0, 205.0, 3000.0])
    _raises(write_study(tmp_path)["manifest"], r"ct\.npy: the patch \(30 x 205 x 3005 um, depth x height x width\) is "
            r"larger than volume 'v0' along x \(3005 > 2100 um\)", sampler=sampler)


def test_plane_outside_volume(tmp_path):
    study = write_study(tmp_path, ndim=3, z_um=1000.0)  # the landmarks' CT z: above the 400 um volume
    _raises(study["manifest"], r"s0\.h5ad: section s0: 270 of 270 spots unusable \(limit 50%\): the section plane lies "
            r"outside volume ct\.npy — 270 spots at z 99\d\.\d\.\.100\d\.\d um, the volume spans z -5\.0\.\.395\.0 um; "
            r"check the landmarks' CT z")


def test_spots_outside_volume_in_plane(tmp_path):
    study = write_study(tmp_path, ct_shift_um=(0.0, 0.0, 1500.0))  # the CT side clicked 1.5 mm off in x
    _raises(study["manifest"], r"s0\.h5ad: section s0: \d+ of 270 spots unusable \(limit 50%\): \d+ registered spots fall "
            r"outside volume ct\.npy in-plane \(spots y 30\d\.\.17\d\d, x 1[78]\d\d\.\.32\d\d um; volume z -5\.\.395, "
            r"y -2\.5\.\.2097\.5, x -2\.5\.\.2097\.5 um\); check the landmarks and their declaration")


def test_patch_reaches_past_a_face(tmp_path):
    study = write_study(tmp_path, z_um=5.0)  # inside, but a 34 um deep patch leaves through the bottom
    _raises(study["manifest"], r"270 spots lie inside volume ct\.npy but their patch \(30 x 205 x 205 um\) reaches past "
            r"its faces")


def test_misdeclared_file_fails_before_training(tmp_path):
    """train(): the pitch check stops the run before a model, a trainer or a checkpoint exists."""
    from tests.test_train import _cfg
    from xpression.training import train

    study = write_study(tmp_path / "study", st_space="hires", declare={"landmarks_st_space": "fullres"})
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"spots are 6\d\d\.\d um apart .*with landmarks_st_space: hires they would be 100\.\d"):
        train(_cfg(run, study["manifest"], ["data.sections=null", "data.check_tissue_mask=false"]))
    assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()


# -- the manifest: declarations and planes, every problem at once ----------------------------------------


def test_manifest_declaration_keys(tmp_path):
    study = write_study(tmp_path, ndim=3, st_space="hires", ct_units="px", moving="ct")
    s = load_manifest(study["manifest"]).section(SECTION)
    assert (s.landmarks_moving, s.landmarks_st_space, s.landmarks_ct_units, s.spot_pitch_um) == ("ct", "hires", "px", 100.0)
    assert s.z_um is None and s.plane is None  # a 3D table: the plane comes from the landmarks
    doc = yaml.safe_load(study["manifest"].read_text())
    doc["volumes"][0]["sections"][0].update(landmarks_moving="CT", landmarks_st_space="highres", landmarks_ct_units="mm",
                                            spot_pitch_um=-1)
    study["manifest"].write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError) as err:
        load_manifest(study["manifest"])
    assert len(err.value.problems) == 4
    text = str(err.value)
    for msg in ("landmarks_moving: expected one of st, ct, got 'CT'", "landmarks_st_space: expected one of fullres, hires, "
                "lowres, got 'highres'", "landmarks_ct_units: expected one of um, px, got 'mm'", "spot_pitch_um: must be positive"):
        assert msg in text


def test_manifest_2d_landmarks_need_a_plane(tmp_path):
    study = write_study(tmp_path, ndim=2, give_plane=False)
    with pytest.raises(ManifestError, match=r"section 's0': give 'z_um' or 'plane': the 2D landmark table carries no CT z"):
        load_manifest(study["manifest"])


def test_manifest_planes_checked_against_the_volume(tmp_path):
    study = write_study(tmp_path)
    doc = yaml.safe_load(study["manifest"].read_text())
    section = doc["volumes"][0]["sections"][0]
    second = dict(section, id="s1")
    section["z_um"] = 400.0  # just above the top slice's footprint (395 um)
    second.pop("z_um")
    second["plane"] = [[500.0, 0.0, 0.0], [520.0, 0.0, 1000.0], [500.0, 1000.0, 0.0]]  # above the volume
    doc["volumes"][0]["sections"].append(second)
    study["manifest"].write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError) as err:
        load_manifest(study["manifest"])
    assert err.value.problems == [
        "section 's0'.z_um: 400 um lies outside volume 'v0' (z -5..395 um: 40 slices of 10 um)",
        "section 's1'.plane: the plane does not cross volume 'v0' (z -5..395, y -2.5..2097.5, x -2.5..2097.5 um)",
    ]
    json.dumps(err.value.problems)  # plain strings

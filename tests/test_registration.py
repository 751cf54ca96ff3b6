"""BigWarp landmarks read as BigWarp writes them, fitted as declared, and checked before training."""

import logging
import re

import numpy as np
import pytest

from tests._bigwarp import SECTION, VOXEL_UM, write_bigwarp_csv, write_bigwarp_json, write_study
from xpression.data import load_manifest
from xpression.data.bigwarp import read_landmarks
from xpression.data.geometry import DataError
from xpression.data.registration import fit_affine
from xpression.data.sections import load_section

A = np.array([[0.8, -0.3, 120.0], [0.25, 0.9, -40.0]])


def _load(study: dict, **kw):
    entry = load_manifest(study["manifest"]).section(SECTION)
    return load_section(entry, voxel_size_um=VOXEL_UM, **kw)


def _max_error_um(section, study) -> float:
    return float(np.linalg.norm(section.points_um - study["points_um"], axis=1).max())


# -- a genuine export, every declared space, lands the spots where they are ---------------------------


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("st_space", ["fullres", "hires"])
@pytest.mark.parametrize("ct_units", ["um", "px"])
def test_bigwarp_export_registers_spots_within_5um(tmp_path, ndim, st_space, ct_units):
    study = write_study(tmp_path, ndim=ndim, st_space=st_space, ct_units=ct_units)
    section = _load(study)
    assert _max_error_um(section, study) < 5.0
    reg = section.registration
    assert 95.0 < reg.pitch_um < 105.0 and reg.expected_pitch_um == 100.0
    assert reg.rms_um < 3.0 and len(reg.names) == 8
    assert section.affine.um_per_px == pytest.approx(0.37, rel=0.01)
    assert reg.plane_from_landmarks == (ndim == 3) and reg.tilt_deg < 0.5


@pytest.mark.parametrize("ndim", [2, 3])
def test_ct_as_moving_image(tmp_path, ndim):
    study = write_study(tmp_path, ndim=ndim, moving="ct", st_space="lowres")
    assert _max_error_um(_load(study), study) < 5.0


def test_3d_export_fits_a_tilted_plane_and_logs_its_tilt(tmp_path, caplog):
    study = write_study(tmp_path, ndim=3, tilt_deg=4.0)
    with caplog.at_level(logging.INFO, logger="xpression.data.registration"):
        section = _load(study)
    assert section.registration.tilt_deg == pytest.approx(4.0, abs=0.1)
    assert re.search(r"plane fitted to the landmarks, tilt (3\.9\d|4\.0\d) deg", caplog.text)
    assert _max_error_um(section, study) < 5.0


def test_3d_export_checked_against_a_given_plane(tmp_path):
    study = write_study(tmp_path / "ok", ndim=3, give_plane=True)
    section = _load(study)
    assert not section.registration.plane_from_landmarks and _max_error_um(section, study) < 5.0
    wrong = write_study(tmp_path / "wrong", ndim=3, give_plane=True, declare={"z_um": 260.0})
    with pytest.raises(DataError, match=r"landmark 'Pt-\d' lies 6\d\.\d um from the section plane given by z_um \(260\).*"
                                        r"plane through z = (199|200)\.\d um"):
        _load(wrong)


def test_json_landmarks(tmp_path):
    study = write_study(tmp_path, ndim=3, fmt="json")
    assert _max_error_um(_load(study), study) < 5.0
    names, active, moving, fixed = _table(tmp_path)
    for nest in ("table", "transform", "settings"):
        path = write_bigwarp_json(tmp_path / f"{nest}.json", names, active, moving, fixed, nest=nest)
        assert "Infinity" in path.read_text()
        lm = read_landmarks(path)
        np.testing.assert_array_equal(lm.fixed, fixed)
        assert lm.used().names == tuple(names[:3])


# -- a wrong declaration fails with the pitch check, naming the fix ----------------------------------


@pytest.mark.parametrize(
    "written, declared, fix",
    [
        ({"moving": "ct"}, {"landmarks_moving": "st"}, "landmarks_moving: ct"),
        ({"st_space": "hires"}, {"landmarks_st_space": "fullres"}, "landmarks_st_space: hires"),
        ({"ct_units": "px"}, {"landmarks_ct_units": "um"}, "landmarks_ct_units: px"),
    ],
)
def test_misdeclared_file_fails_the_pitch_check(tmp_path, written, declared, fix):
    study = write_study(tmp_path, declare=declared, **written)
    with pytest.raises(DataError) as err:
        _load(study)
    text = str(err.value)
    assert text.startswith(str(study["landmarks"]))
    assert "section s0: the registered spots are" in text and "expected 100 um +- 15% (spot_pitch_um)" in text
    assert "moving and fixed swapped" in text and "hires/lowres" in text and "voxels instead of um" in text
    assert f"with {fix} they would be" in text


def test_pitch_check_configurable(tmp_path):
    study = write_study(tmp_path, declare={"spot_pitch_um": 55.0})
    with pytest.raises(DataError, match=r"spots are 10\d\.\d um apart .* expected 55 um"):
        _load(study)
    unchecked = write_study(tmp_path / "null", st_space="hires", declare={"landmarks_st_space": "fullres", "spot_pitch_um": None})
    assert _load(unchecked).registration.pitch_um is None  # no grid, no check (the residual bound still holds)


# -- the file format: every form BigWarp (or a spreadsheet) leaves -----------------------------------


def _table(tmp_path):
    moving = np.array([[10.5, 20.25], [1.0e-4, 300.0], [500.0, 12345678.9], [700.0, 80.0]])
    fixed = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [np.inf, np.inf]])
    names = ["Pt-0", "Pt-1", 'a "quoted", name', "Pt-3"]
    return names, [True, True, True, False], moving, fixed


def test_reads_bigwarp_csv_exactly(tmp_path):
    names, active, moving, fixed = _table(tmp_path)
    path = write_bigwarp_csv(tmp_path / "lm.csv", names, active, moving, fixed)
    text = path.read_text()
    assert '"1.0E-4"' in text and '"1.23456789E7"' in text and '"Infinity"' in text and '"a ""quoted"", name"' in text
    lm = read_landmarks(path)
    assert lm.ndim == 2 and lm.names == tuple(names) and lm.active.tolist() == active
    np.testing.assert_array_equal(lm.moving, moving)
    np.testing.assert_array_equal(lm.fixed, fixed)
    used = lm.used()  # the unpaired, inactive row is left out
    assert used.names == tuple(names[:3]) and np.isfinite(used.fixed).all()


def test_reads_unquoted_header_and_id_columns(tmp_path):
    names, active, moving, fixed = _table(tmp_path)
    ref = read_landmarks(write_bigwarp_csv(tmp_path / "ref.csv", names, active, moving, fixed))
    rows = [[f"Pt-{i}", str(a).lower(), *(repr(float(v)) for v in (*m, *f))] for i, (a, m, f) in enumerate(zip(active, moving, fixed))]
    plain = tmp_path / "plain.csv"
    plain.write_text("Name,Active,mvg-x,mvg-y,fix-x,fix-y\n" + "\n".join(",".join(r) for r in rows) + "\n")
    with_id = tmp_path / "id.csv"  # newer BigWarp reads an integer Id after Active
    with_id.write_text("\n".join(",".join([r[0], r[1], str(i), *r[2:]]) for i, r in enumerate(rows)))
    for path in (plain, with_id):
        lm = read_landmarks(path)
        np.testing.assert_array_equal(lm.moving, ref.moving)
        np.testing.assert_array_equal(lm.fixed, ref.fixed)
        assert lm.active.tolist() == active


def test_active_unpaired_landmark_is_named(tmp_path):
    names, _, moving, fixed = _table(tmp_path)
    path = write_bigwarp_csv(tmp_path / "lm.csv", names, [True] * 4, moving, fixed)
    with pytest.raises(DataError, match=r"landmark 'Pt-3' is active but its fixed point is not set \(inf, inf\)"):
        read_landmarks(path).used()


@pytest.mark.parametrize(
    "text, message",
    [
        ("a,true,1,2,3\n", "5 columns; a BigWarp landmark CSV has 6"),
        ("a,maybe,1,2,3,4\n", "'active' must be true or false"),
        ("a,true,1,x,3,4\n", "not numbers"),
        ("a,true,1,2,3,4\nb,true,1,2,3,4,5,6\n", "line 2: 8 columns, the file's first row has 6"),
        ("", "empty"),
    ],
)
def test_malformed_csv(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_landmarks(path)


def test_missing_landmark_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_landmarks(tmp_path / "nope.csv")


# -- the fit and its checks -------------------------------------------------------------------------------


def test_fit_affine_recovers_transform():
    rng = np.random.default_rng(0)
    st = rng.uniform(0, 2000, size=(8, 2))
    fit = fit_affine(st, st @ A[:, :2].T + A[:, 2])
    np.testing.assert_allclose(fit.matrix, A, atol=1e-8)
    assert fit.rms_um < 1e-8 and fit.max_um < 1e-8
    np.testing.assert_allclose(fit.um_per_px, np.sqrt(abs(np.linalg.det(A[:, :2]))))


def test_fit_affine_degenerate():
    st = np.array([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]])
    with pytest.raises(DataError, match="collinear"):
        fit_affine(st, st @ A[:, :2].T + A[:, 2])
    with pytest.raises(DataError, match="too few active landmarks: 2"):
        fit_affine(st[:2], st[:2])


def test_residual_names_the_worst_landmark(tmp_path):
    study = write_study(tmp_path)
    lm = read_landmarks(study["landmarks"])
    fixed = lm.fixed.copy()
    fixed[5] += [60.0, 0.0]  # one CT point clicked 60 um off
    write_bigwarp_csv(study["landmarks"], lm.names, lm.active, lm.moving, fixed)
    with pytest.raises(DataError, match=r"section s0: landmark residual too large: 'Pt-5' is \d\d\.\d\d um off"):
        _load(study)
    assert _load(study, max_residual_um=100.0).registration.worst[0] == "Pt-5"
    inactive = lm.active.copy()
    inactive[5] = False  # deactivated in BigWarp: ignored
    write_bigwarp_csv(study["landmarks"], lm.names, inactive, lm.moving, fixed)
    assert _load(study).registration.names == tuple(n for n in lm.names if n != "Pt-5")


def test_warnings_three_landmarks_and_mirror(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="xpression.data.registration"):
        three = _load(write_study(tmp_path / "three", n_landmarks=3))
        mirrored = _load(write_study(tmp_path / "mirror", mirror=True))
    assert any("only 3 active landmarks" in w for w in three.registration.warnings)
    assert any("mirrors the ST image" in w for w in mirrored.registration.warnings)
    assert mirrored.affine.determinant < 0
    assert "only 3 active landmarks" in caplog.text and "negative determinant" in caplog.text
    assert not any("mirror" in w for w in three.registration.warnings)

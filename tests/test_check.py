"""`python -m xpression.data.check`: every section validated without training, one table, one overlay each."""

import numpy as np
import pytest
from matplotlib.image import imread

from tests._bigwarp import write_study
from xpression.data.check import main, plane_image
from xpression.data.geometry import Plane
from xpression.data.volume import open_volume


def test_check_tiny_cohort(tiny_cohort, tmp_path, capsys):
    out = tmp_path / "check"
    assert main([str(tiny_cohort), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for column in ("landmarks", "RMS (um)", "worst landmark", "pitch (um)", "in volume", "in tissue mask", "plane"):
        assert column in text
    for sid in ("mock_0_s0", "infected_0_s0", "vaccinated_0_s0"):
        assert sid in text
        png = imread(out / f"{sid}_overlay.png")
        assert png.shape[0] > 500 and png.shape[1] > 700 and png[..., :3].std() > 0.1
    assert "12/12" in text and " / 100 " in text  # 12 landmarks used of 12; measured / expected pitch
    # a second run never overwrites the first one's figures
    assert main([str(tiny_cohort), "--out", str(out)]) == 2
    assert "exists; choose another --out" in capsys.readouterr().err


def test_check_reports_a_misdeclared_section(tmp_path, capsys):
    study = write_study(tmp_path / "study", ct_units="px", declare={"landmarks_ct_units": "um"})
    assert main([str(study["manifest"]), "--out", str(tmp_path / "out")]) == 1
    text = capsys.readouterr().out
    assert "s0: error:" in text and "with landmarks_ct_units: px they would be 100" in text.replace("\n", "")
    assert not (tmp_path / "out" / "s0_overlay.png").exists()


def test_check_ok_study_notes_a_missing_tissue_mask(tmp_path, capsys):
    study = write_study(tmp_path / "study", ndim=3)
    assert main([str(study["manifest"]), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "270/270" in text and "tilt 0.0 deg (landmarks)" in text and "no CT tissue mask" in text
    assert (tmp_path / "out" / "s0_overlay.png").is_file()


def test_plane_image_reads_the_section_plane(tmp_path):
    vol = np.zeros((12, 40, 60), np.uint16)
    vol[5] = np.arange(60, dtype=np.uint16)[None, :] * 1000  # only slice 5 (z = 50 um) holds an x ramp
    np.save(tmp_path / "v.npy", vol)
    volume = open_volume(tmp_path / "v.npy", (10.0, 4.0, 4.0))
    image = plane_image(volume, Plane.axial(50.0), np.array([0.0, 0.0]), np.array([236.0, 156.0]))
    assert image.shape == (40, 60)
    assert np.corrcoef(image.mean(axis=0), np.arange(60))[0, 1] > 0.99
    assert plane_image(volume, Plane.axial(30.0), np.array([0.0, 0.0]), np.array([236.0, 156.0])).max() == pytest.approx(0.0)


def test_check_fails_a_section_train_would_refuse_for_spots_outside_the_volume(tmp_path, capsys):
    """More spots outside the volume than training allows (``data.max_drop_fraction``) is an error
    here too, with training's message, not a warning that exits 0."""
    study = write_study(tmp_path / "study", ndim=3)
    ct = np.load(tmp_path / "study" / "ct.npy")
    np.save(tmp_path / "study" / "ct.npy", ct[:, :, : ct.shape[2] // 4])  # a CT cropped to a quarter of its width
    assert main([str(study["manifest"]), "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    text = captured.out.replace("\n", "")
    assert "s0: error: " in text and "spots unusable (limit 50%)" in text and "fall outside volume ct.npy in-plane" in text
    inside = int(text.split("s0: error: ")[1].split("section s0: ")[1].split(" of ")[0])
    assert inside > 270 // 2  # more than half of the 270 spots are lost
    assert (tmp_path / "out" / "s0_overlay.png").is_file()  # the overlay shows where they went
    # allowed to lose them all: a warning, exit 0
    assert main([str(study["manifest"]), "--out", str(tmp_path / "out2"), "--max-drop-fraction", "1"]) == 0
    text = capsys.readouterr().out.replace("\n", "")
    assert f"s0: warning: {inside} of 270 spots lie outside the volume" in text


def test_check_refuses_bad_options_before_any_work(tiny_cohort, tmp_path, capsys):
    taken = tmp_path / "a_file"
    taken.write_text("mine")
    with pytest.raises(SystemExit) as stop:
        main([str(tiny_cohort), "--out", str(taken)])
    assert stop.value.code == 2 and "is a file; give a folder" in capsys.readouterr().err
    assert taken.read_text() == "mine"
    with pytest.raises(SystemExit) as stop:
        main([str(tiny_cohort), "--out", str(taken / "overlays")])
    assert stop.value.code == 2 and f"{taken} is a file; give a folder" in capsys.readouterr().err
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit) as stop:
            main([str(tiny_cohort), "--max-residual-um", bad])
        assert stop.value.code == 2 and "--max-residual-um must be a positive number of um" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main([str(tiny_cohort), "--max-drop-fraction", "1.5"])
    assert stop.value.code == 2 and "--max-drop-fraction must be in [0, 1]" in capsys.readouterr().err

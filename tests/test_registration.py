import numpy as np
import pytest

from xpression.data.geometry import DataError
from xpression.data.registration import fit_affine, read_landmarks, register_section


def _write(path, fixed, moving, enabled=None):
    enabled = [True] * len(fixed) if enabled is None else enabled
    lines = [
        f'"Pt-{i}","{str(e).lower()}","{f[0]}","{f[1]}","{m[0]}","{m[1]}"'
        for i, (f, m, e) in enumerate(zip(fixed, moving, enabled))
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


A = np.array([[0.8, -0.3, 120.0], [0.25, 0.9, -40.0]])


def _pairs(n=8, seed=0):
    rng = np.random.default_rng(seed)
    moving = rng.uniform(0, 2000, size=(n, 2))
    return moving, moving @ A[:, :2].T + A[:, 2]


def test_fit_affine_recovers_transform():
    moving, fixed = _pairs()
    fit = fit_affine(moving, fixed)
    np.testing.assert_allclose(fit.matrix, A, atol=1e-8)
    assert fit.rms_um < 1e-8 and fit.max_um < 1e-8
    np.testing.assert_allclose(fit.um_per_px, np.sqrt(abs(np.linalg.det(A[:, :2]))))


def test_register_uses_only_enabled_landmarks(tmp_path):
    moving, fixed = _pairs(6)
    fixed[2] += 500.0  # a wrong landmark, disabled
    path = _write(tmp_path / "lm.csv", fixed, moving, [True, True, False, True, True, True])
    fit = register_section(path)
    assert fit.n_landmarks == 5
    np.testing.assert_allclose(fit.matrix, A, atol=1e-8)


def test_residual_too_large(tmp_path):
    moving, fixed = _pairs(6)
    fixed[2] += 100.0
    path = _write(tmp_path / "lm.csv", fixed, moving)
    with pytest.raises(DataError, match=r"lm\.csv.*residual too large"):
        register_section(path, max_residual_um=27.5)
    assert register_section(path, max_residual_um=1000.0).max_um > 27.5


def test_too_few_landmarks(tmp_path):
    moving, fixed = _pairs(4)
    path = _write(tmp_path / "lm.csv", fixed, moving, [True, True, False, False])
    with pytest.raises(DataError, match="too few enabled landmarks: 2"):
        register_section(path)


def test_collinear_landmarks(tmp_path):
    moving = np.array([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]])
    fixed = moving @ A[:, :2].T + A[:, 2]
    with pytest.raises(DataError, match="collinear"):
        register_section(_write(tmp_path / "lm.csv", fixed, moving))


@pytest.mark.parametrize(
    "text, message",
    [("a,true,1,2,3\n", "expected 6 columns"), ("a,maybe,1,2,3,4\n", "enabled"), ("a,true,1,x,3,4\n", "not numbers")],
)
def test_malformed_csv(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_landmarks(path)


def test_missing_landmark_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_landmarks(tmp_path / "nope.csv")

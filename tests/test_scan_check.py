"""The scan check: each volume's noise against the training volumes' (xpression.data.scan_check)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xpression.data.intensity import robust_range
from xpression.data.scan_check import noise_ratio, scan_noise


def _phantom(sd: float, seed: int = 0) -> np.ndarray:
    """A linear ramp 0-200 along x (a voxel equals its neighbours' mean: no residual of its own)
    and independent Gaussian noise of ``sd``."""
    rng = np.random.default_rng(seed)
    base = np.broadcast_to(np.linspace(0.0, 200.0, 64), (40, 64, 64))
    return base + rng.normal(0.0, sd, base.shape)


def test_scan_noise_reads_the_noise_sd_in_units_of_the_intensity_range():
    vol = _phantom(4.0)
    low, high = robust_range(vol)
    assert scan_noise(vol) == pytest.approx(4.0 / (high - low), rel=0.03)
    # three times the noise reads about three times as much (the range widens a little too)
    loud = _phantom(12.0, seed=1)
    lo3, hi3 = robust_range(loud)
    assert scan_noise(loud) == pytest.approx(12.0 / (hi3 - lo3), rel=0.03)
    assert scan_noise(loud) / scan_noise(vol) > 2.5
    # the same volume and seed read the same blocks: the same number
    assert scan_noise(vol) == scan_noise(vol)
    assert math.isnan(scan_noise(np.zeros((2, 64, 64))))          # too thin for a neighbour on both sides
    assert math.isnan(scan_noise(np.full((8, 16, 16), 7.0)))      # no intensity range


def test_noise_ratio_is_one_inside_the_training_range_and_the_factor_outside():
    training = {"a": 0.02, "b": 0.03}
    assert noise_ratio(0.025, training) == 1.0
    assert noise_ratio(0.09, training) == pytest.approx(3.0)
    assert noise_ratio(0.01, training) == pytest.approx(0.5)
    assert math.isnan(noise_ratio(0.02, {}))
    assert math.isnan(noise_ratio(math.nan, training))

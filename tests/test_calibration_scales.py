"""SD calibration factors two orders of magnitude or more are applied, but warned about by channel."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from xpression.inference.calibration import MAX_PLAUSIBLE_SCALE, fit_sd_scale, implausible_scales


def test_a_spread_far_below_the_error_gives_a_factor_that_is_warned_about(caplog):
    rng = np.random.default_rng(0)
    sd = np.full((2000, 2), 0.01)
    err = np.abs(rng.normal(0, [0.01, 47.0], (2000, 2)))  # target b: errors 4700 times its SD
    scale = fit_sd_scale(err, sd)
    assert scale[0] == pytest.approx(1.0, rel=0.1) and scale[1] == pytest.approx(4700, rel=0.1)
    with caplog.at_level(logging.WARNING, logger="xpression.inference.calibration"):
        flagged = implausible_scales(scale, ["alveolar", "infected"])
    assert list(flagged) == ["infected_sd"] and flagged["infected_sd"] == pytest.approx(scale[1])
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith(f"calibrate=true: channel infected_sd scaled by {scale[1]:.1f} (> 100)")


def test_factors_up_to_the_limit_pass_quietly(caplog):
    with caplog.at_level(logging.WARNING, logger="xpression.inference.calibration"):
        assert implausible_scales([2.7, 7.4, MAX_PLAUSIBLE_SCALE], ["a", "b", "c"]) == {}
    assert not caplog.records

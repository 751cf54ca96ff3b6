"""Paired comparisons over seeds: a difference is called a difference only when its 95 % interval
excludes 0.

Two configurations trained with the same split seed see the same training spots, so their
scores are compared seed by seed (a model and a baseline of the same run share everything).
The mean paired difference gets a t interval over the shared seeds (``n - 1`` degrees of
freedom); with fewer than two shared seeds there is no interval and no verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from scipy import stats

__all__ = ["PairedDifference", "paired_difference"]


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of ``a - b`` over ``n`` shared seeds, its ``lo``/``hi`` interval and the verdict:
    ``higher`` (interval above 0), ``lower`` (below 0), ``level`` (contains 0) or ``n<2``."""

    mean: float
    lo: float
    hi: float
    n: int
    verdict: str

    def text(self, digits: int = 3) -> str:
        """``+0.081 [+0.040, +0.122] higher``; ``n/a`` without a shared seed."""
        if self.n == 0 or not math.isfinite(self.mean):
            return "n/a"
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (1 seed)"
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}] {self.verdict}"


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> PairedDifference:
    """The mean of ``a[seed] - b[seed]`` over the seeds where both are finite, with a two-sided
    t interval at ``confidence``."""
    seeds = sorted(s for s in set(a) & set(b) if np.isfinite(a[s]) and np.isfinite(b[s]))
    d = np.array([float(a[s]) - float(b[s]) for s in seeds])
    n = len(d)
    if n == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0, "n/a")
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, 1, "n<2")
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    lo, hi = mean - half, mean + half
    verdict = "higher" if lo > 0 else "lower" if hi < 0 else "level"
    return PairedDifference(mean, lo, hi, n, verdict)

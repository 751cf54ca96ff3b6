"""Expression programs defined in 3D from distances to the analytic structures.

Each program gets a non-negative affinity from the distances (um) below; the composition
is affinity / sum(affinities). See docs/phantom.md for the formulas.
"""

from __future__ import annotations

import numpy as np

PROGRAMS = ["alveolar", "airway", "vascular", "infected", "immune", "remodelling"]

# Length scales (um) and weights; stored in the spec so a spec fully defines the truth.
DEFAULT_PROGRAM_PARAMS = {
    "floor": 0.02,  # added to every affinity so compositions are smooth and positive
    "alveolar": {"weight": 1.0, "consolidation_um": 30.0},
    "airway": {"weight": 1.5, "length_um": 40.0},
    "vascular": {"weight": 1.2, "length_um": 30.0},
    "infected": {"weight": 2.0, "length_um": 50.0},
    "immune": {"weight": 1.5, "length_um": 80.0, "rim_offset_um": 20.0,
               "perivascular_weight": 0.3, "perivascular_um": 60.0},
    "remodelling": {"weight": 2.0, "depth_um": 60.0, "length_um": 25.0},
    "reach_um": 250.0,  # distance-based affinities reach exactly 0 here
}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _decay(d: np.ndarray, length: float, reach: float) -> np.ndarray:
    """exp(-d / length), shifted and rescaled to be 1 at d = 0 and exactly 0 from d = reach."""
    tail = np.exp(-reach / length)
    return np.clip((np.exp(-d / length) - tail) / (1.0 - tail), 0.0, 1.0)


def unexplained_factor(points: np.ndarray, field: dict) -> np.ndarray:
    """Multiplicative factor (N, P) exp(sd * g_p - sd^2 / 2) of a smooth unit-variance Gaussian
    field g_p per program (random Fourier modes), independent of every tissue structure.

    Elementwise sums (no matmul) keep each point's value independent of its batch.
    """
    p = np.asarray(points, np.float64)
    sd = float(field["sd"])
    out = np.empty((len(p), len(field["modes"])), np.float64)
    for j, modes in enumerate(field["modes"]):
        g = np.zeros(len(p))
        for kz, ky, kx, phase in modes:
            g += np.cos(p[:, 0] * kz + p[:, 1] * ky + p[:, 2] * kx + phase)
        g *= np.sqrt(2.0 / len(modes))
        out[:, j] = np.exp(sd * g - 0.5 * sd * sd)
    return out


def compose(d_airway: np.ndarray, d_vessel: np.ndarray, lesion_sd: list[np.ndarray],
            lesions: list[dict], params: dict, factor: np.ndarray | None = None) -> np.ndarray:
    """Program compositions (N, P) float32 from distances in um.

    d_airway, d_vessel: distance to the nearest airway / vessel outer surface, >= 0.
    lesion_sd: one signed distance array per lesion (negative inside).
    factor: optional (N, P) multiplier of the affinities (before the floor), e.g.
    :func:`unexplained_factor`.
    """
    n = len(d_airway)
    aff = np.zeros((n, len(PROGRAMS)), np.float64)
    pa, pv = params["airway"], params["vascular"]
    pi, pm, pr, pal = params["infected"], params["immune"], params["remodelling"], params["alveolar"]
    consolidated = np.zeros(n)
    for s, les in zip(lesion_sd, lesions):
        s = s.astype(np.float64)
        consolidated = np.maximum(consolidated, _sigmoid(-s / pal["consolidation_um"]))
        aff[:, 3] += les["infection"] * _sigmoid(-s / pi["length_um"])
        aff[:, 4] += les["immune"] * np.exp(-np.abs(s - pm["rim_offset_um"]) / pm["length_um"])
        aff[:, 5] += les["remodelling"] * _sigmoid(-(s + pr["depth_um"]) / pr["length_um"])
    aff[:, 0] = pal["weight"] * (1.0 - consolidated)
    reach = params["reach_um"]
    aff[:, 1] = pa["weight"] * _decay(d_airway, pa["length_um"], reach)
    aff[:, 2] = pv["weight"] * _decay(d_vessel, pv["length_um"], reach)
    aff[:, 3] *= pi["weight"]
    aff[:, 4] = pm["weight"] * aff[:, 4] + pm["perivascular_weight"] * _decay(d_vessel, pm["perivascular_um"], reach)
    aff[:, 5] *= pr["weight"]
    if factor is not None:
        aff *= factor
    aff += params["floor"]
    return (aff / aff.sum(axis=1, keepdims=True)).astype(np.float32)

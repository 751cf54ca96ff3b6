"""How much of the truth a perfect reader of the tissue could predict: the ceiling that the
unexplained expression field (preset `unexplained_sd`) puts below 1.

The field multiplies each program's affinity by a smooth log-normal factor that no tissue
structure, and so no CT, carries. The best any predictor can do from the tissue alone is the
conditional mean of the truth given every structure, E[truth | structures]: the average of the
programs over independent draws of the field. Scoring the truth against that average gives
the ceiling (Pearson r per program; R^2 = 1 - E[(truth - mean)^2] / Var(truth)). It is an
upper bound for a model reading the CT, which sees the structures only through noise and blur.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from .phantom import Phantom
from .spec import TAG_EXPRESSION_FIELD, _expression_field, rng_for


def morphology_ceiling(ph: Phantom, volume_id: str, centers_yx_um: np.ndarray, z_um: float,
                       draws: int = 32, seed: int = 0) -> dict[str, Any]:
    """Ceiling of the spot-averaged truth at spots centred on `centers_yx_um` (S, 2) (y, x) um
    of the axial plane `z_um` (um).

    Returns ``{"programs", "pearson", "r2", "sd"}`` (per program; `sd` the truth's spread
    over these spots) and their means; the conditional mean is estimated from `draws` field
    draws, so r and R^2 are slightly low (by about Var(truth | structures) / (draws Var(truth))).
    """
    vol = ph.volume(volume_id)
    truth = ph.spot_programs(volume_id, centers_yx_um, z_um).astype(np.float64)
    field = vol.get("expression_field")
    if not field:
        mean = truth
    else:
        mean = np.zeros_like(truth)
        spec = copy.deepcopy(ph.spec)
        target = next(v for v in spec["volumes"] if v["id"] == volume_id)
        for k in range(draws):
            rng = rng_for(seed, vol["index"], TAG_EXPRESSION_FIELD, 1000 + k)
            target["expression_field"] = _expression_field(rng, field["sd"], field["length_um"], len(field["modes"]),
                                                           len(field["modes"][0]))
            mean += Phantom(spec).spot_programs(volume_id, centers_yx_um, z_um)
        mean /= draws
    sd = truth.std(axis=0)
    r = np.array([np.corrcoef(truth[:, j], mean[:, j])[0, 1] if sd[j] > 0 else np.nan for j in range(truth.shape[1])])
    ss = ((truth - truth.mean(axis=0)) ** 2).sum(axis=0)
    r2 = np.where(ss > 0, 1.0 - ((truth - mean) ** 2).sum(axis=0) / np.where(ss > 0, ss, 1.0), np.nan)
    return {"programs": ph.program_names, "pearson": r.tolist(), "r2": r2.tolist(), "sd": sd.tolist(),
            "pearson_mean": float(np.nanmean(r)), "r2_mean": float(np.nanmean(r2))}

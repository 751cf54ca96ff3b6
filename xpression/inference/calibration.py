"""One scale factor per target that makes a trust map's SD cover its errors where they are known.

An ensemble's (or MC dropout's) SD measures how much the members disagree, not how far they all
are from the truth: on the benchmark cohort +-2 SD covered about half of the truth. With
``calibrate=true`` the SD channels are multiplied by ``scale[t]``, fitted on the held-out spots
of the run's sections (labels no network trained on: validation, test and split-buffer spots;
for an ensemble, whose members' splits differ with their seeds, those no member trained on) so
that ``|mean - label| <= 2 x scale x SD`` holds for ``coverage`` (0.954, a Gaussian's +-2 SD) of
them, per target. Only the SD channels change (the means, and so every accuracy score, do not).
The scale moves every SD of a target by one factor: the coverage changes, the ranking of points
by SD does not. A factor above :data:`MAX_PLAUSIBLE_SCALE` (100) is applied but warned about in
one line naming the channel: the members' spread is then two orders of magnitude below their
error (e.g. forests fitted on the same few spots, differing only in their seed) and says little.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from xpression.inference.predictor import InferenceError

__all__ = ["COVERAGE_2SD", "MAX_PLAUSIBLE_SCALE", "fit_sd_scale", "implausible_scales", "calibration_spots",
           "calibrate_trust_net"]

log = logging.getLogger(__name__)

COVERAGE_2SD = 0.954  # P(|z| <= 2) of a standard normal
MIN_SPOTS = 10
MAX_PLAUSIBLE_SCALE = 100.0  # a factor beyond this: the SD is two orders of magnitude below the error


def fit_sd_scale(abs_error: np.ndarray, sd: np.ndarray, coverage: float = COVERAGE_2SD) -> np.ndarray:
    """``(T,)`` factors ``s`` with ``mean(abs_error[:, t] <= 2 s[t] sd[:, t]) ~ coverage``.

    ``abs_error``, ``sd``: ``(N, T)`` in target units. ``s[t]`` is the ``coverage`` quantile of
    ``abs_error / (2 sd)`` over the points with ``sd > 0``; a target whose SD is 0 at every
    point keeps 1 (no factor makes a zero SD cover anything)."""
    err, sd = np.abs(np.asarray(abs_error, np.float64)), np.asarray(sd, np.float64)
    if err.shape != sd.shape or err.ndim != 2:
        raise InferenceError(f"fit_sd_scale: abs_error {err.shape} and sd {sd.shape} must be the same (N, T) shape")
    if not 0 < coverage < 1:
        raise InferenceError(f"fit_sd_scale: coverage must lie in (0, 1), got {coverage}")
    scale = np.ones(err.shape[1])
    for t in range(err.shape[1]):
        ok = sd[:, t] > 0
        if ok.any():
            scale[t] = float(np.quantile(err[ok, t] / (2 * sd[ok, t]), coverage))
    return np.maximum(scale, 1e-6)


def implausible_scales(scale: Sequence[float], names: Sequence[str], limit: float = MAX_PLAUSIBLE_SCALE) -> dict[str, float]:
    """``{"<target>_sd": factor}`` of the ``(T,)`` factors ``scale`` above ``limit`` (dimensionless),
    each warned about in one logged line naming the channel and the factor."""
    flagged = {f"{n}_sd": float(s) for n, s in zip(names, scale) if float(s) > limit}
    for channel, s in flagged.items():
        log.warning("calibrate=true: channel %s scaled by %.1f (> %g): the members' spread is far below their error "
                    "on the held-out spots, so this SD is mostly the factor", channel, s, limit)
    return flagged


def calibration_spots(datamodules: Sequence[Any]) -> np.ndarray:
    """Row indices (into the first DataModule's spot table) of the spots that no run of
    ``datamodules`` trained on (matched by section and barcode): its validation, test and
    buffer spots, less those another member trained on."""
    first = datamodules[0].spots
    keep = first["split"].to_numpy() != "train"
    key = list(zip(first["section_id"], first["barcode"]))
    for dm in datamodules[1:]:
        s = dm.spots
        trained = {k for k, sp in zip(zip(s["section_id"], s["barcode"]), s["split"]) if sp == "train"}
        keep &= np.array([k not in trained for k in key], dtype=bool)
    return np.flatnonzero(keep)


def calibrate_trust_net(net: Any, infos: Sequence[Any], device: torch.device | str = "cpu",
                        coverage: float = COVERAGE_2SD, names: Sequence[str] | None = None) -> dict:
    """Fit ``net``'s (a :class:`~xpression.inference.uncertainty.TrustNet` with SD channels)
    per-target SD scale on the held-out spots of ``infos`` (the primary run first, then the
    other members) and set it; returns what the map metadata records: the scale, the spot count,
    the coverage before and after on those spots and the factors above :data:`MAX_PLAUSIBLE_SCALE`
    (``implausible``, warned about). ``names``: the targets, for the warnings (default target0, ...)."""
    from xpression.data.datamodule import image_to_float

    from xpression.inference.ood import run_datamodule

    dms = [run_datamodule(i, f"calibrate=true: run {i.run_dir}:", "pass calibrate=false") for i in infos]
    rows = calibration_spots(dms)
    if len(rows) < MIN_SPOTS:
        raise InferenceError(f"calibrate=true: only {len(rows)} spots of {infos[0].run_dir} are held out "
                             f"from every member's training (at least {MIN_SPOTS} needed); pass calibrate=false")
    dm = dms[0]
    dm.setup("predict")
    T = len(net.sd_scale)
    net.sd_scale.fill_(1.0)
    was = net.training
    net.eval()
    means, sds, labels = [], [], []
    wanted = np.zeros(len(dm.spots), bool)
    wanted[rows] = True
    with torch.inference_mode():
        for batch in dm.predict_dataloader():  # every spot; the calibration ones kept (a few hundred patches)
            pick = wanted[batch["index"].numpy()]
            if not pick.any():
                continue
            out = net(image_to_float(batch["image"][torch.as_tensor(pick)].to(device))).float().cpu().numpy()
            means.append(out[:, :T]), sds.append(out[:, T:2 * T]), labels.append(batch["target"][torch.as_tensor(pick)].numpy())
    net.train(was)
    mean, sd, label = np.concatenate(means), np.concatenate(sds), np.concatenate(labels)
    err = np.abs(mean - label)
    scale = fit_sd_scale(err, sd, coverage)
    net.sd_scale.copy_(torch.as_tensor(scale, dtype=net.sd_scale.dtype))
    before = float(np.mean(err <= 2 * sd))
    after = float(np.mean(err <= 2 * sd * scale))
    log.info("SD calibration on %d held-out spots: scale %s; +-2 SD coverage %.2f -> %.2f", len(rows),
             np.round(scale, 2).tolist(), before, after)
    names = list(names) if names is not None else [f"target{t}" for t in range(T)]
    return {"scale": [float(s) for s in scale], "n_spots": int(len(rows)), "coverage_target": float(coverage),
            "coverage_before": before, "coverage_after": after, "implausible": implausible_scales(scale, names)}

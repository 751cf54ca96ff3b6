"""Build the cohort spec: a JSON-able dict that fully defines the analytic phantom."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .genes import make_expression
from .presets import CONDITIONS
from .programs import DEFAULT_PROGRAM_PARAMS, PROGRAMS
from .structures import make_lesions, make_organ, make_tree

SPEC_FORMAT = "xpression-phantom"
SPEC_VERSION = 1

# Linear attenuation (arbitrary units, air ~ 0, dense wall ~ 0.85).
ATTENUATION = {"air": 0.03, "paraffin": 0.30, "tissue": 0.72, "infiltrate": 0.55,
               "blood": 0.62, "wall": 0.85}

# Stream tags keep the RNG streams of different steps independent (5 is the Visium simulation's).
TAG_STRUCTURE, TAG_SECTIONS, TAG_CALIBRATION, TAG_GENES = 1, 2, 3, 4
TAG_Z_ERROR, TAG_DEFORMATION, TAG_EXPRESSION_FIELD = 6, 7, 8


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """A numpy Generator seeded from (seed, *key), independent of call order."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *key])


def volume_shape(size_um: list[float], voxel_um: float) -> list[int]:
    """Voxel counts per axis: size / voxel, rounded."""
    return [max(1, int(round(s / voxel_um))) for s in size_um]


def _deformation(rng: np.random.Generator, amplitude_um: float, size_um: list[float]) -> list[list[float]]:
    """Modes of a smooth in-plane displacement, rows (ku, kv, phase, amp_u, amp_v).

    Three plane waves with wavelengths 0.4-0.8 x the in-plane size; each component's
    amplitudes sum to amplitude_um, so no point moves more than that along u or v.
    """
    if amplitude_um <= 0:
        return []
    extent = min(size_um[1], size_um[2])
    modes = []
    weights = rng.dirichlet(np.ones(3), size=2)  # (component, mode), rows sum to 1
    for m in range(3):
        angle = rng.uniform(0, 2 * math.pi)
        k = 2 * math.pi / (extent * rng.uniform(0.4, 0.8))
        modes.append([k * math.cos(angle), k * math.sin(angle), float(rng.uniform(0, 2 * math.pi)),
                      float(amplitude_um * weights[0, m]), float(amplitude_um * weights[1, m])])
    return [[float(v) for v in row] for row in modes]


def _expression_field(rng: np.random.Generator, sd: float, length_um: float, n_programs: int,
                      n_modes: int = 24) -> dict[str, Any] | None:
    """Random Fourier modes of one smooth Gaussian field per program (unit variance,
    covariance exp(-r^2 / (2 length^2))): rows (kz, ky, kx, phase) per program."""
    if sd <= 0:
        return None
    modes = []
    for _ in range(n_programs):
        k = rng.normal(0.0, 1.0 / length_um, (n_modes, 3))
        phase = rng.uniform(0, 2 * math.pi, (n_modes, 1))
        modes.append(np.hstack([k, phase]).tolist())
    return {"sd": float(sd), "length_um": float(length_um), "modes": modes}


def _sections(rng: np.random.Generator, vid: str, params: dict[str, Any], size_um: list[float],
              z_rng: np.random.Generator, warp_rng: np.random.Generator) -> list[dict[str, Any]]:
    z = size_um[0]
    n = params["sections_per_volume"]
    margin = params["section_margin_um"]
    out = []
    for k in range(n):
        zk = z * (k + 0.5) / n + rng.uniform(-0.15, 0.15) * z / n
        zk = float(round(min(max(zk, margin), z - margin), 1))
        scale = float(rng.uniform(0.6, 1.8))  # ST full-res px per um
        theta = float(rng.uniform(-math.pi, math.pi))
        flip = bool(rng.random() < 0.3)
        c, s = math.cos(theta), math.sin(theta)
        lin = scale * np.array([[c, -s], [s, c]]) @ np.diag([1.0, -1.0 if flip else 1.0])
        corners = np.array([[0, 0], [size_um[2], 0], [0, size_um[1]], [size_um[2], size_um[1]]])
        mapped = corners @ lin.T
        shift = float(rng.uniform(300, 800)) - mapped.min(axis=0)
        affine = np.hstack([lin, shift[:, None]])
        extent = (mapped + shift).max(axis=0) + rng.uniform(300, 800, 2)
        z_recorded = zk + float(z_rng.uniform(-1.0, 1.0)) * params["z_error_um"] if params["z_error_um"] else zk
        out.append({
            "id": f"{vid}_s{k}",
            "z_um": zk,  # the true plane
            "z_recorded_um": float(round(z_recorded, 1)),  # what the manifest says
            "deformation": _deformation(warp_rng, params["deformation_um"], size_um),
            "st_affine": affine.round(9).tolist(),  # CT (u, v) um -> ST full-res px (x, y)
            "st_scale_px_per_um": scale,
            "st_rotation_rad": theta,
            "st_flip": flip,
            "st_image_size_px": [int(math.ceil(extent[0])), int(math.ceil(extent[1]))],  # (w, h)
        })
    return out


def build_spec(params: dict[str, Any], seed: int, preset: str) -> dict[str, Any]:
    """Draw every structure of every volume from the seed and return the spec dict."""
    vols = []
    counters: dict[str, int] = {}
    size = params["size_um"]
    vox = float(params["voxel_um"])
    z_damp = float(np.clip(2.0 * size[0] / max(size[1], size[2]), 0.3, 1.0))
    in_plane = min(size[1], size[2])
    for v in range(params["volumes"]):
        cond = CONDITIONS[v % len(CONDITIONS)]
        vid = f"{cond}_{counters.get(cond, 0)}"
        counters[cond] = counters.get(cond, 0) + 1
        rng = rng_for(seed, v, TAG_STRUCTURE)
        organ = make_organ(rng, size)
        aw_root = float(np.clip(0.05 * in_plane, 30.0, 160.0))
        airways, vessels = [], []
        for _ in range(2):
            airways += make_tree(rng, organ, size, aw_root * rng.uniform(0.8, 1.1), 12.0, 0.22, 5.0, z_damp)
        for _ in range(3):
            vessels += make_tree(rng, organ, size, 0.7 * aw_root * rng.uniform(0.7, 1.1), 8.0, 0.12, 3.0, z_damp)
        sections = _sections(rng_for(seed, v, TAG_SECTIONS), vid, params, size,
                             rng_for(seed, v, TAG_Z_ERROR), rng_for(seed, v, TAG_DEFORMATION))
        lesions = make_lesions(rng, cond, organ, size, [s["z_um"] for s in sections],
                               off_plane=params["lesion_placement"] == "off_plane")
        crng = rng_for(seed, 0 if params["fixed_calibration"] else v, TAG_CALIBRATION)
        calibration = {
            "gain": float(crng.uniform(0.85, 1.2)),
            "offset": float(crng.uniform(-0.03, 0.08)),
            "gamma": float(crng.uniform(0.8, 1.25)),
            "cupping": float(crng.uniform(0.0, 0.1)),
            "noise_sigma": float(crng.uniform(0.025, 0.045)) * float(params["noise_scale"]),
        }
        vols.append({
            "id": vid,
            "index": v,
            "condition": cond,
            "size_um": list(size),
            "voxel_size_um": [vox, vox, vox],
            "shape": volume_shape(size, vox),
            "noise_key": int(seed) * 1_000_003 + v * 7919 + 17,
            "organ": organ,
            "airways": airways,
            "vessels": vessels,
            "lesions": lesions,
            "calibration": calibration,
            "sections": sections,
            "expression_field": _expression_field(rng_for(seed, v, TAG_EXPRESSION_FIELD), params["unexplained_sd"],
                                                  params["unexplained_length_um"], len(PROGRAMS)),
        })
    return {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "name": f"phantom-{preset}",
        "preset": preset,
        "seed": int(seed),
        "params": params,
        "programs": list(PROGRAMS),
        "program_params": DEFAULT_PROGRAM_PARAMS,
        "attenuation": dict(ATTENUATION),
        "expression": make_expression(rng_for(seed, 0, TAG_GENES), params["n_genes"], params["library_size"]),
        "volumes": vols,
    }

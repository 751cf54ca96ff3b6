"""Cohort presets and parameter validation.

Every size is in micrometres (um); voxel counts are derived from them.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import PhantomError

CONDITIONS = ("mock", "infected", "vaccinated")

_BASE: dict[str, Any] = {
    "volumes": 3,  # conditions cycle mock, infected, vaccinated
    "sections_per_volume": 1,
    "size_um": [256.0, 1000.0, 1000.0],  # [z, y, x]
    "voxel_um": 6.4,  # a 4x-binned 1.6 um scan
    "chunk": 64,  # voxels per OME-Zarr chunk edge
    "alveolus_um": 60.0,  # Worley cell size; air cells come out ~40-120 um across
    "septum_um": 6.0,  # septum thickness
    "psf_sigma_um": 5.0,  # Gaussian PSF of the scanner
    "spot_diameter_um": 55.0,
    "spot_pitch_um": 100.0,
    "section_thickness_um": 10.0,
    "section_margin_um": 40.0,  # closest a section plane gets to the top/bottom face
    "n_genes": 200,
    "library_size": 3000.0,  # median UMI per spot
    "n_landmarks": 12,
    "landmark_error_um": 5.0,  # sd of the landmark placement error in CT, per axis
    "hires_px": 600,  # longest side of the hires image
    "lowres_px": 200,
    "truth_spacing_um": 25.6,
    "tomo_angles": 0,  # 0: derived from the slice size
    # Realism options (docs/phantom.md, "Realism options"); all off except in `benchmark`.
    "fixed_calibration": False,  # one scanner calibration for every volume (else one per animal)
    "noise_scale": 1.0,  # every volume's drawn noise sigma times this (a faster, noisier scan; draws unchanged)
    "z_error_um": 0.0,  # recorded section z_um = true plane + U(-e, e) um
    "deformation_um": 0.0,  # smooth non-affine section warp: at most this many um per in-plane axis
    "unexplained_sd": 0.0,  # sd of a smooth log-normal factor per program, invisible in the CT
    "unexplained_length_um": 150.0,  # correlation length of that factor (um)
    "lesion_placement": "off_plane",  # off_plane: first lesion 60-150 um from every section; uniform
}

LESION_PLACEMENTS = ("off_plane", "uniform")

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(_BASE),
    "default": {
        **_BASE,
        "size_um": [600.0, 2500.0, 2500.0],
        "n_genes": 240,
        "library_size": 5000.0,
        "n_landmarks": 16,
        "hires_px": 1200,
        "lowres_px": 400,
    },
    "large": {
        **_BASE,
        "size_um": [6400.0, 6400.0, 6400.0],
        "n_genes": 300,
        "library_size": 5000.0,
        "n_landmarks": 20,
        "hires_px": 2000,
        "lowres_px": 600,
        "truth_spacing_um": 51.2,
    },
}
# The benchmark cohort: the default block, two animals per condition (mock_0, infected_0,
# vaccinated_0, mock_1, infected_1, vaccinated_1), every realism option on, lesions placed
# without regard to the sections.
PRESETS["benchmark"] = {
    **PRESETS["default"],
    "volumes": 6,
    "z_error_um": 20.0,
    "deformation_um": 8.0,
    "unexplained_sd": 0.35,
    "lesion_placement": "uniform",
}


def resolve_params(preset: str, **overrides: Any) -> dict[str, Any]:
    """Return the preset's parameters with non-None overrides applied, validated.

    Raises PhantomError naming the first offending parameter.
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        raise PhantomError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    params = copy.deepcopy(PRESETS[preset])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in params:
            raise PhantomError(f"unknown parameter {key!r}")
        params[key] = value
    validate_params(params)
    return params


def _positive(params: dict[str, Any], key: str, integer: bool = False) -> None:
    value = params[key]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "a positive integer" if integer else "a positive number"
        raise PhantomError(f"{key} must be {what}, got {value!r}")


def validate_params(params: dict[str, Any]) -> None:
    """Check a parameter dict; raise PhantomError naming the problem."""
    size = params["size_um"]
    if not (isinstance(size, (list, tuple)) and len(size) == 3):
        raise PhantomError(f"size_um must be three numbers [z, y, x] in um, got {size!r}")
    for name, s in zip("zyx", size):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise PhantomError(f"size_um[{name}] must be a positive number of um, got {s!r}")
    params["size_um"] = [float(s) for s in size]
    for key in ("voxel_um", "alveolus_um", "septum_um", "psf_sigma_um", "spot_diameter_um",
                "spot_pitch_um", "section_thickness_um", "library_size", "truth_spacing_um",
                "unexplained_length_um", "noise_scale"):
        _positive(params, key)
    for key in ("z_error_um", "deformation_um", "unexplained_sd"):
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise PhantomError(f"{key} must be a number >= 0, got {value!r}")
        params[key] = float(value)
    if not isinstance(params["fixed_calibration"], bool):
        raise PhantomError(f"fixed_calibration must be true or false, got {params['fixed_calibration']!r}")
    if params["lesion_placement"] not in LESION_PLACEMENTS:
        raise PhantomError(f"lesion_placement must be one of {', '.join(LESION_PLACEMENTS)}, "
                           f"got {params['lesion_placement']!r}")
    for key in ("volumes", "sections_per_volume", "chunk", "n_genes", "n_landmarks",
                "hires_px", "lowres_px"):
        _positive(params, key, integer=True)
    if params["spot_pitch_um"] < params["spot_diameter_um"]:
        raise PhantomError(
            f"spot_pitch_um ({params['spot_pitch_um']}) is below spot_diameter_um "
            f"({params['spot_diameter_um']}): spots would overlap")
    if params["n_genes"] < 100:
        raise PhantomError(f"n_genes must be at least 100, got {params['n_genes']}")
    if params["n_landmarks"] < 3:
        raise PhantomError(f"n_landmarks must be at least 3, got {params['n_landmarks']}")
    if params["lowres_px"] > params["hires_px"]:
        raise PhantomError("lowres_px must not exceed hires_px")
    vox = params["voxel_um"]
    if any(s < 8 * vox for s in params["size_um"]):
        raise PhantomError(f"size_um {params['size_um']} must be at least 8 voxels "
                           f"({8 * vox} um) along every axis")
    z = params["size_um"][0]
    half_patch = 20.0
    if params["section_margin_um"] < half_patch or 2 * params["section_margin_um"] >= z:
        raise PhantomError(
            f"size_um[z] = {z} um leaves no room for a section with "
            f"section_margin_um = {params['section_margin_um']} um above and below")
    if params["section_margin_um"] - params["z_error_um"] < half_patch:
        raise PhantomError(
            f"z_error_um = {params['z_error_um']} um could put a recorded section plane closer than "
            f"{half_patch} um to the volume's face (section_margin_um = {params['section_margin_um']} um)")
    if not isinstance(params["tomo_angles"], int) or params["tomo_angles"] < 0:
        raise PhantomError(f"tomo_angles must be a non-negative integer, got {params['tomo_angles']!r}")

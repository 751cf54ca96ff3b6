"""CT image formation: attenuation -> PSF blur -> noise -> scanner calibration -> uint8.

Each chunk is rendered with a halo of the PSF radius, so results do not depend on the
chunking; the noise of chunk (cz, cy, cx) comes from an RNG seeded by the volume's key and
the chunk index only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.ndimage import gaussian_filter

if TYPE_CHECKING:
    from .phantom import Phantom

TRUNCATE = 3.0


def psf_sigma_vox(params: dict[str, Any]) -> float:
    return float(params["psf_sigma_um"]) / float(params["voxel_um"])


def psf_radius(params: dict[str, Any]) -> int:
    """Kernel radius in voxels, as scipy.ndimage.gaussian_filter computes it."""
    return int(TRUNCATE * psf_sigma_vox(params) + 0.5)


def grid_points(zr: range, yr: range, xr: range, voxel: list[float]) -> np.ndarray:
    """Voxel-centre positions (N, 3) in um for index ranges, C order."""
    z, y, x = np.meshgrid(np.asarray(zr) * voxel[0], np.asarray(yr) * voxel[1],
                          np.asarray(xr) * voxel[2], indexing="ij")
    return np.column_stack([z.ravel(), y.ravel(), x.ravel()])


def blurred_attenuation(ph: "Phantom", vid: str, z: tuple[int, int], y: tuple[int, int],
                        x: tuple[int, int]) -> np.ndarray:
    """PSF-blurred attenuation (float32) over voxel index ranges; computed with a halo."""
    prm = ph.spec["params"]
    r = psf_radius(prm)
    ranges = [range(a - r, b + r) for a, b in (z, y, x)]
    att = ph.attenuation_grid(vid, *ranges)
    att = gaussian_filter(att, psf_sigma_vox(prm), truncate=TRUNCATE, mode="nearest")
    return att[r:att.shape[0] - r, r:att.shape[1] - r, r:att.shape[2] - r]


def chunk_noise(vol: dict[str, Any], chunk: int, index: tuple[int, int, int]) -> np.ndarray:
    """Standard normal noise (float32) of one full chunk, from its own RNG stream."""
    rng = np.random.default_rng([vol["noise_key"] & 0xFFFFFFFF, vol["noise_key"] >> 32, *index])
    return rng.standard_normal((chunk, chunk, chunk), dtype=np.float32)


def calibrate(signal: np.ndarray, cal: dict[str, Any], vol: dict[str, Any],
              y: tuple[int, int], x: tuple[int, int]) -> np.ndarray:
    """Apply cupping, gain, offset and gamma; return uint8 grey values."""
    ny, nx = vol["shape"][1], vol["shape"][2]
    yy = (np.arange(*y) - 0.5 * (ny - 1)) / (0.5 * ny)
    xx = (np.arange(*x) - 0.5 * (nx - 1)) / (0.5 * nx)
    r2 = 0.5 * (yy[:, None] ** 2 + xx[None, :] ** 2)
    s = signal * (1.0 - cal["cupping"] * (1.0 - r2))[None]
    s = cal["offset"] + cal["gain"] * np.power(np.clip(s, 0.0, None), cal["gamma"])
    return np.rint(np.clip(s, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_region(ph: "Phantom", vid: str, z: tuple[int, int], y: tuple[int, int],
                  x: tuple[int, int]) -> np.ndarray:
    """Final uint8 CT voxels over index ranges, chunk by chunk (halo'd blur, chunk noise)."""
    vol = ph.volume(vid)
    c = int(ph.spec["params"]["chunk"])
    cal = vol["calibration"]
    out = np.empty((z[1] - z[0], y[1] - y[0], x[1] - x[0]), np.uint8)
    for cz in range(z[0] // c, (z[1] - 1) // c + 1):
        for cy in range(y[0] // c, (y[1] - 1) // c + 1):
            for cx in range(x[0] // c, (x[1] - 1) // c + 1):
                lo = [max(a, k * c) for a, k in zip((z[0], y[0], x[0]), (cz, cy, cx))]
                hi = [min(b, (k + 1) * c) for b, k in zip((z[1], y[1], x[1]), (cz, cy, cx))]
                att = blurred_attenuation(ph, vid, (lo[0], hi[0]), (lo[1], hi[1]), (lo[2], hi[2]))
                noise = chunk_noise(vol, c, (cz, cy, cx))[
                    lo[0] - cz * c:hi[0] - cz * c, lo[1] - cy * c:hi[1] - cy * c, lo[2] - cx * c:hi[2] - cx * c]
                grey = calibrate(att + cal["noise_sigma"] * noise, cal, vol, (lo[1], hi[1]), (lo[2], hi[2]))
                out[lo[0] - z[0]:hi[0] - z[0], lo[1] - y[0]:hi[1] - y[0], lo[2] - x[0]:hi[2] - x[0]] = grey
    return out


def render_tomography_slab(ph: "Phantom", vid: str, z: tuple[int, int]) -> np.ndarray:
    """uint8 slices [z0, z1) with a simulated acquisition per axial slice.

    Blurred attenuation -> parallel-beam projections (skimage radon) -> Gaussian
    projection noise -> filtered back projection (iradon). Few angles and the block's
    edges give the usual streaks. Noise per slice is seeded by (volume key, z index).
    """
    from skimage.transform import iradon, radon

    vol = ph.volume(vid)
    _, ny, nx = vol["shape"]
    cal = vol["calibration"]
    att = blurred_attenuation(ph, vid, z, (0, ny), (0, nx))
    n = max(ny, nx)
    n_angles = int(ph.spec["params"]["tomo_angles"]) or max(60, n // 2)
    theta = np.linspace(0.0, 180.0, n_angles, endpoint=False)
    out = np.empty(att.shape, np.uint8)
    for i, sl in enumerate(att):
        img = np.zeros((n, n), np.float64)
        img[:ny, :nx] = sl
        sino = radon(img, theta=theta, circle=False)
        rng = np.random.default_rng([vol["noise_key"] & 0xFFFFFFFF, vol["noise_key"] >> 32, 1 << 20, z[0] + i])
        sino += rng.normal(0.0, cal["noise_sigma"] * math.sqrt(n_angles) * 0.35, sino.shape)
        rec = iradon(sino, theta=theta, circle=False, output_size=n, filter_name="ramp")
        out[i] = calibrate(rec[None, :ny, :nx], cal, vol, (0, ny), (0, nx))[0]
    return out

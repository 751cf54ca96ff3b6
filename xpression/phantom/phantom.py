"""The analytic phantom: attenuation and expression programs at any 3D point."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PhantomError
from .noise import blockwise, worley_f2_minus_f1
from .programs import compose, unexplained_factor
from .spec import SPEC_FORMAT
from .structures import capsule_sd, lesion_sd, organ_sd


def _soft(sd: np.ndarray, half_width: float) -> np.ndarray:
    """1 inside, 0 outside, linear ramp of +-half_width um across the surface (compact)."""
    return np.clip(0.5 - sd / (2.0 * half_width), 0.0, 1.0)


def disk_offsets(radius_um: float, thickness_um: float) -> np.ndarray:
    """Sample offsets (M, 3) z, y, x in um over a spot disk times the section thickness.

    19 in-plane points (centre, 6 at 0.45 r, 12 at 0.85 r) at 3 depths (-t/3, 0, +t/3).
    """
    pts = [(0.0, 0.0)]
    for n, rr in ((6, 0.45), (12, 0.85)):
        for k in range(n):
            a = 2 * math.pi * (k + 0.5 * (n == 12)) / n
            pts.append((rr * radius_um * math.sin(a), rr * radius_um * math.cos(a)))
    return np.array([(dz, y, x) for dz in (-thickness_um / 3, 0.0, thickness_um / 3) for y, x in pts])


class Phantom:
    """Analytic 3D truth of a synthetic cohort, rebuilt from its spec.

    Points are (N, 3) arrays in um, (z, y, x) order, in each volume's frame (voxel i sits
    at i * voxel_size_um).
    """

    def __init__(self, spec: dict[str, Any]):
        if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
            raise PhantomError(f"not a phantom spec (expected format {SPEC_FORMAT!r})")
        self.spec = spec
        self._volumes = {v["id"]: v for v in spec["volumes"]}

    @classmethod
    def from_spec(cls, path_or_dict: str | Path | dict[str, Any]) -> "Phantom":
        """Build from a spec dict or a path to truth/phantom.json (or the cohort.yaml beside it)."""
        if isinstance(path_or_dict, dict):
            return cls(copy.deepcopy(path_or_dict))
        path = Path(path_or_dict)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            manifest = yaml.safe_load(path.read_text())
            path = path.parent / manifest["truth"]["spec"]
        try:
            return cls(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise PhantomError(f"cannot read phantom spec {path}: {exc}") from exc

    def to_json(self, path: str | Path) -> None:
        """Write the spec as JSON."""
        Path(path).write_text(json.dumps(self.spec, indent=1))

    @property
    def program_names(self) -> list[str]:
        return list(self.spec["programs"])

    @property
    def volume_ids(self) -> list[str]:
        return list(self._volumes)

    def volume(self, volume_id: str) -> dict[str, Any]:
        """The spec entry of one volume."""
        try:
            return self._volumes[volume_id]
        except KeyError:
            raise PhantomError(f"unknown volume {volume_id!r} (have {', '.join(self._volumes)})") from None

    def shape(self, volume_id: str) -> tuple[int, int, int]:
        """Voxel counts (z, y, x)."""
        return tuple(self.volume(volume_id)["shape"])

    def voxel_size_um(self, volume_id: str) -> list[float]:
        return list(self.volume(volume_id)["voxel_size_um"])

    # ------------------------------------------------------------ attenuation

    def organ_sd(self, volume_id: str, points_um: np.ndarray) -> np.ndarray:
        """Signed distance (um) to the organ outline, negative inside tissue."""
        return organ_sd(_points(points_um), self.volume(volume_id)["organ"])

    def attenuation_at(self, volume_id: str, points_um: np.ndarray) -> np.ndarray:
        """Noise-free, unblurred linear attenuation (N,) float32 at points in um."""
        vol = self.volume(volume_id)
        return blockwise(_points(points_um), lambda p: self._attenuation(vol, p)).astype(np.float32)

    def attenuation_grid(self, volume_id: str, zr: range, yr: range, xr: range, tile: int = 24) -> np.ndarray:
        """attenuation_at over the voxel centres of index ranges, as a (z, y, x) float32 array."""
        from .ct import grid_points

        vol = self.volume(volume_id)
        vox = vol["voxel_size_um"]
        out = np.empty((len(zr), len(yr), len(xr)), np.float32)
        for i in range(0, len(zr), tile):
            for j in range(0, len(yr), tile):
                for k in range(0, len(xr), tile):
                    sub = (zr[i:i + tile], yr[j:j + tile], xr[k:k + tile])
                    bbox = (np.array([r[0] for r in sub]) * vox, np.array([r[-1] for r in sub]) * vox)
                    att = self._attenuation(vol, grid_points(*sub, vox), bbox)
                    out[i:i + tile, j:j + tile, k:k + tile] = att.reshape([len(r) for r in sub])
        return out

    def _attenuation(self, vol: dict[str, Any], p: np.ndarray,
                     bbox: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        a = self.spec["attenuation"]
        prm = self.spec["params"]
        so = organ_sd(p, vol["organ"]).astype(np.float64)
        att = np.full(len(p), a["paraffin"])
        inside = so < 8.0
        n_in = np.count_nonzero(inside)
        if n_in == 0:
            return att
        if n_in == len(p):
            q, so_in = p, so
        else:
            q, so_in = p[inside], so[inside]
        if bbox is None:
            bbox = (q.min(axis=0), q.max(axis=0))
        h = 0.5 * worley_f2_minus_f1(q, prm["alveolus_um"], vol["noise_key"], bbox)
        septum = _soft(h - 0.5 * prm["septum_um"], 1.5)
        cons = np.zeros(len(q))
        for les in _near_lesions(vol["lesions"], bbox, 16.0):
            reach = max(les["radii_um"]) * (1.0 + 2.0 * les["noise_amp"]) + 16.0
            m = np.square(q - np.asarray(les["center"])) @ np.ones(3) < reach * reach
            if m.any():
                cons[m] = np.maximum(cons[m], les["density"] * _soft(lesion_sd(q[m], les), 8.0))
        fill = a["air"] + (a["infiltrate"] - a["air"]) * cons
        lung = fill + (a["tissue"] - fill) * septum
        vl, vo = capsule_sd(q, np.asarray(vol["vessels"]), 16.0, bbox)
        lung += (a["wall"] - lung) * _soft(vo, 1.5)
        lung += (a["blood"] - lung) * _soft(vl, 1.5)
        al, ao = capsule_sd(q, np.asarray(vol["airways"]), 16.0, bbox)
        lung += (a["wall"] - lung) * _soft(ao, 1.5)
        lung += (a["air"] - lung) * _soft(al, 1.5)
        out = a["paraffin"] + (lung - a["paraffin"]) * _soft(so_in, 1.5)
        pleura = 0.6 * np.clip(1.0 - np.abs(so_in) / 5.0, 0.0, 1.0)
        out += (a["tissue"] - out) * pleura
        if n_in == len(p):
            return out
        att[inside] = out
        return att

    # ------------------------------------------------------------ programs

    def programs_at(self, volume_id: str, points_um: np.ndarray) -> np.ndarray:
        """True program compositions (N, P) float32 at points in um; rows sum to 1."""
        vol = self.volume(volume_id)
        return blockwise(_points(points_um), lambda p: self._programs(vol, p), block_um=320.0)

    def _programs(self, vol: dict[str, Any], p: np.ndarray) -> np.ndarray:
        pp = self.spec["program_params"]
        reach = float(pp["reach_um"])
        bbox = (p.min(axis=0), p.max(axis=0))
        _, d_aw = capsule_sd(p, np.asarray(vol["airways"]), reach, bbox)
        _, d_v = capsule_sd(p, np.asarray(vol["vessels"]), reach, bbox)
        # every lesion, however far: its logistic/exponential tails never reach exactly 0
        sds = [lesion_sd(p, les) for les in vol["lesions"]]
        field = vol.get("expression_field")
        factor = unexplained_factor(p, field) if field else None
        return compose(np.maximum(d_aw, 0.0).astype(np.float64), np.maximum(d_v, 0.0).astype(np.float64),
                       sds, vol["lesions"], pp, factor)

    def spot_programs(self, volume_id: str, centers_yx_um: np.ndarray, z_um: float) -> np.ndarray:
        """Mean programs (S, P) over each spot disk x section thickness of an axial section.

        centers_yx_um: (S, 2) spot centres (y, x) in um on the plane z = z_um.
        """
        prm = self.spec["params"]
        offs = disk_offsets(0.5 * prm["spot_diameter_um"], prm["section_thickness_um"])
        c = np.asarray(centers_yx_um, np.float64).reshape(-1, 2)
        centres = np.column_stack([np.full(len(c), float(z_um)), c])
        pts = (centres[:, None, :] + offs[None]).reshape(-1, 3)
        progs = self.programs_at(volume_id, pts).reshape(len(c), len(offs), -1).mean(axis=1)
        return (progs / progs.sum(axis=1, keepdims=True)).astype(np.float32)

    # ------------------------------------------------------------ CT image

    def render_block(self, volume_id: str, z: tuple[int, int], y: tuple[int, int],
                     x: tuple[int, int]) -> np.ndarray:
        """The stored CT voxels (uint8) of index ranges [z0, z1) x [y0, y1) x [x0, x1).

        Identical to the same region of the written volume (non-tomography mode).
        """
        from .ct import render_region

        return render_region(self, volume_id, z, y, x)


def _points(points_um: np.ndarray) -> np.ndarray:
    p = np.asarray(points_um, np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise PhantomError(f"points must have shape (N, 3) in (z, y, x) um, got {p.shape}")
    return p


def _near_lesions(lesions: list[dict], bbox: tuple[np.ndarray, np.ndarray], margin: float) -> list[dict]:
    """Lesions whose bounding sphere comes within margin um of a bounding box (lo, hi)."""
    lo, hi = bbox
    out = []
    for les in lesions:
        c = np.asarray(les["center"])
        r = max(les["radii_um"]) * (1.0 + 2.0 * les["noise_amp"]) + margin
        gap = np.maximum(0.0, np.maximum(lo - c, c - hi))
        if np.linalg.norm(gap) <= r:
            out.append(les)
    return out

"""A map's mean per axial plane beside the CT's, to see what a drift along z follows.

    python benchmarks/plane_profile.py MAPS_OME_ZARR [--volume CT] [--target infected] [--slab-um 32]

``MAPS_OME_ZARR`` is one volume's ``maps.ome.zarr`` written by ``infer.py``; the CT is the volume
it swept (recorded in the store; ``--volume`` for one moved since). For every plane of the map's
grid it prints the target's mean over the plane (grid points inside the tissue), the CT's mean
and sd over the slab of voxels around that plane, and the share of the slab's voxels above the
volume's 60th and 95th percentiles; then Pearson r of the map's plane means against each CT
statistic over the planes. Sizes are in um.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from xpression.data.volume import open_volume
from xpression.inference.writers import read_maps


def map_planes(path: str, target: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(z_vox, mean, metadata)``: per plane of ``path``'s grid, its voxel z in the swept volume
    and the plane's mean of ``target`` (grid points inside the tissue)."""
    try:
        data, meta = read_maps(path)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise SystemExit(f"{path}: not a maps.ome.zarr written by infer.py ({err})")
    if target not in meta["targets"]:
        raise SystemExit(f"{path}: no target {target!r} (targets: {', '.join(meta['targets'])})")
    grid = meta["grid"]
    plane = np.asarray(data[meta["targets"].index(target)], dtype=np.float64)
    z_vox = int(grid["origin_vox"][0]) + int(grid["step_vox"][0]) * np.arange(plane.shape[0])
    with np.errstate(all="ignore"):
        return z_vox, np.nanmean(plane.reshape(plane.shape[0], -1), axis=1), meta


def ct_planes(volume, z_vox: np.ndarray, half_vox: int) -> dict[str, np.ndarray]:
    """CT statistics over the slab of ``2 half_vox + 1`` voxels around each plane."""
    ct = np.asarray(volume[:, :, :], dtype=np.float32)
    p60, p95 = np.percentile(ct, [60, 95])
    out: dict[str, list[float]] = {"ct_mean": [], "ct_sd": [], "share_above_p60": [], "share_above_p95": []}
    for z in z_vox:
        slab = ct[max(int(z) - half_vox, 0): int(z) + half_vox + 1]
        for key, v in zip(out, (slab.mean(), slab.std(), (slab > p60).mean(), (slab > p95).mean())):
            out[key].append(float(v))
    return {k: np.asarray(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("maps", help="one volume's maps.ome.zarr (infer.py)")
    p.add_argument("--volume", help="the CT volume it swept (default: the path the store records)")
    p.add_argument("--target", default="infected", help="the map channel to profile")
    p.add_argument("--slab-um", type=float, default=32.0, help="CT slab thickness around each plane, um")
    args = p.parse_args(argv)
    z_vox, means, meta = map_planes(args.maps, args.target)
    path = args.volume or meta["settings"]["volume_path"]
    voxel = meta["grid"]["voxel_size_um"]
    try:
        volume = open_volume(path, voxel)
    except Exception as err:  # noqa: BLE001 - any reader's failure, named in one line
        raise SystemExit(f"{path}: cannot open the swept volume ({err}); pass --volume")
    ct = ct_planes(volume, z_vox, max(int(round(args.slab_um / 2 / float(voxel[0]))), 0))
    z_um = float(meta["grid"].get("volume_origin_um", [0.0])[0]) + z_vox * float(voxel[0])
    print(f"| z um | {args.target} mean | " + " | ".join(ct) + " |")
    print("|" + "---|" * (2 + len(ct)))
    for i, z in enumerate(z_um):
        print(f"| {z:.1f} | {means[i]:.4f} | " + " | ".join(f"{ct[k][i]:.4g}" for k in ct) + " |")
    ok = np.isfinite(means)
    print(f"\nPearson r over {int(ok.sum())} planes, {args.target} plane means against: " + ", ".join(
        f"{k} {np.corrcoef(means[ok], v[ok])[0, 1]:+.2f}" for k, v in ct.items() if v[ok].std() > 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())

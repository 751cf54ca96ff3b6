"""benchmarks/plane_profile.py: a map's plane means read at the grid's own z, beside the CT slab
around each plane, and their correlation; bad input in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from tests._inference_models import TinyValidNet
from tests._scripts import load_benchmark
from xpression.data.volume import open_volume
from xpression.inference.predictor import Predictor
from xpression.inference.volume_sweep import SweepSettings, infer_volume

torch.set_num_threads(1)


def _module():
    return load_benchmark("plane_profile")


def test_plane_profile_follows_the_map_and_the_ct(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ct = rng.integers(0, 100, size=(14, 40, 40)).astype(np.uint8)
    ct[6:9] += 120  # a bright band in the middle planes
    np.save(tmp_path / "v.npy", ct)
    volume = open_volume(tmp_path / "v.npy", voxel_size_um=6.4)
    store = tmp_path / "m.ome.zarr"
    infer_volume(volume, Predictor(TinyValidNet(), device="cpu", target_names=["a", "b", "c"]), store,
                 normalize=lambda b: b.astype(np.float32) / 255.0,
                 settings=SweepSettings(spacing_um=(6.4, 12.8, 12.8), tile_vox=(3, 16, 16), progress=False, prefetch=1))
    mod = _module()
    z_vox, _, meta = mod.map_planes(str(store), "b")
    level0 = zarr.open_group(str(store), mode="a")["0"]
    known = 0.1 + 0.01 * np.arange(len(z_vox))
    level0[1] = np.broadcast_to(known[:, None, None], level0.shape[1:]).astype(level0.dtype)
    z_vox2, means, _ = mod.map_planes(str(store), "b")
    np.testing.assert_array_equal(z_vox2, meta["grid"]["origin_vox"][0] + meta["grid"]["step_vox"][0] * np.arange(len(z_vox)))
    np.testing.assert_allclose(means, known, atol=1e-3)  # stored as float16
    stats = mod.ct_planes(volume, z_vox2, half_vox=1)
    for i, z in enumerate(z_vox2):
        slab = ct[max(z - 1, 0): z + 2].astype(np.float32)
        assert stats["ct_mean"][i] == pytest.approx(slab.mean(), rel=1e-5)
        assert stats["share_above_p95"][i] == pytest.approx((slab > np.percentile(ct, 95)).mean())
    assert mod.main([str(store), "--target", "b", "--slab-um", "12.8"]) == 0
    out = capsys.readouterr().out
    assert f"over {len(z_vox2)} planes" in out and "ct_mean" in out
    with pytest.raises(SystemExit, match="no target 'x'"):
        mod.main([str(store), "--target", "x"])
    with pytest.raises(SystemExit, match="not a maps.ome.zarr"):
        mod.main([str(tmp_path / "missing.ome.zarr")])

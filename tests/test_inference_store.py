"""Map stores: resumable, sharded, protected against mixing runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tests._inference_models import TinyValidNet
from xpression.data.volume import open_volume
from xpression.inference.predictor import InferenceError, Predictor
from xpression.inference.sweep import sweep
from xpression.inference.volume_sweep import SweepSettings, infer_volume
from xpression.inference.writers import downsample2_nanmean, read_maps

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SPACING = (6.4, 12.8, 12.8)
KW = dict(spacing_um=SPACING, tile_vox=(3, 16, 16), progress=False, prefetch=1)


def S(**over):
    """The test sweep's settings, with ``over`` changed."""
    return SweepSettings(**{**KW, **over})


def norm(block):
    return block.astype(np.float32) / 255.0


def blob_mask(p):
    return ((p[:, 1] - 130) ** 2 + (p[:, 2] - 140) ** 2) < 60**2


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory):
    arr = np.random.default_rng(1).integers(0, 255, size=(12, 44, 48), dtype=np.uint8)
    path = tmp_path_factory.mktemp("vol") / "v.npy"
    np.save(path, arr)
    return path


@pytest.fixture
def volume(volume_path):
    return open_volume(volume_path, voxel_size_um=6.4)


def pred():
    return Predictor(TinyValidNet(), device="cpu", target_names=["a", "b", "c"])


def test_store_matches_in_memory_sweep(volume, tmp_path):
    res = infer_volume(volume, pred(), tmp_path / "m.ome.zarr", mask=blob_mask, normalize=norm,
                       identity={"run": "r1"}, settings=S())
    assert res.complete and res.tiles_computed == res.tiles_tissue < res.tiles_total
    arr, meta = read_maps(res.path)
    assert arr.dtype == np.float16 and meta["complete"] and meta["targets"] == ["a", "b", "c"]
    ref = sweep(volume, pred(), res.grid, tile_shape=res.tile_shape, mask=blob_mask, normalize=norm)
    np.testing.assert_allclose(arr[:].astype(np.float32), ref, atol=2e-3, equal_nan=True)
    g = zarr.open_group(str(res.path), mode="r")
    ms = g.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"][1:] == list(res.grid.spacing_um)
    lv1 = g["1"][:].astype(np.float32)
    np.testing.assert_allclose(lv1, downsample2_nanmean(arr[:]), atol=2e-3, equal_nan=True)


def test_interrupted_sweep_resumes_without_recomputing(volume, tmp_path):
    out = tmp_path / "m.ome.zarr"
    seen = []

    def boom(tr):
        seen.append(tr.tile.index)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        infer_volume(volume, pred(), out, mask=blob_mask, normalize=norm, identity={"run": "r1"}, on_tile=boom, settings=S())
    again = []
    res = infer_volume(volume, pred(), out, mask=blob_mask, normalize=norm, identity={"run": "r1"},
                       on_tile=lambda tr: again.append(tr.tile.index), settings=S())
    assert not set(again) & set(seen) and len(again) == res.tiles_tissue - 3
    full = infer_volume(volume, pred(), tmp_path / "ref.ome.zarr", mask=blob_mask, normalize=norm,
                        identity={"run": "r1"}, settings=S())
    a, _ = read_maps(out)
    b, _ = read_maps(full.path)
    np.testing.assert_array_equal(a[:], b[:])
    # Finished: left alone; a different run's maps: a clear error; overwrite replaces.
    assert infer_volume(volume, pred(), out, normalize=norm, identity={"run": "r1"}, mask=blob_mask, settings=S()).skipped
    with pytest.raises(InferenceError, match="different run"):
        infer_volume(volume, pred(), out, normalize=norm, identity={"run": "r2"}, settings=S())
    with pytest.raises(InferenceError, match="different settings"):
        infer_volume(volume, pred(), out, normalize=norm, identity={"run": "r1"}, settings=S(mode="patch"))
    res = infer_volume(volume, pred(), out, normalize=norm, identity={"run": "r2"}, settings=S(overwrite=True))
    assert res.complete and not res.skipped


SHARD_SCRIPT = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from tests._inference_models import TinyValidNet
from tests.test_inference_store import S, blob_mask, norm
from xpression.data.volume import open_volume
from xpression.inference.predictor import Predictor
from xpression.inference.shards import dist_rank_world
from xpression.inference.volume_sweep import infer_volume
rank, world = dist_rank_world()
vol = open_volume(sys.argv[1], voxel_size_um=6.4)
p = Predictor(TinyValidNet(), device="cpu", target_names=["a", "b", "c"])
r = infer_volume(vol, p, sys.argv[2], mask=blob_mask, normalize=norm, identity={"run": "r1"},
                 rank=rank, world=world, settings=S(wait_s=120))
print("computed", rank, r.tiles_computed, r.tiles_tissue)
"""


def test_two_processes_match_one(volume_path, volume, tmp_path):
    out = tmp_path / "sharded.ome.zarr"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-c", SHARD_SCRIPT, str(volume_path), str(out)], cwd=REPO,
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-2000:]
    counts = [int(so.split()[2]) for so, _ in outs]
    total = int(outs[0][0].split()[3])
    assert sum(counts) == total and min(counts) >= total // 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two processes: a convolution's sums may round otherwise on more threads
    try:
        single = infer_volume(volume, pred(), tmp_path / "single.ome.zarr", mask=blob_mask, normalize=norm,
                              identity={"run": "r1"}, settings=S())
    finally:
        torch.set_num_threads(threads)
    a, meta = read_maps(out)
    b, _ = read_maps(single.path)
    assert meta["complete"]
    np.testing.assert_array_equal(a[:], b[:])


def test_bigtiff_export_and_ct_preview(volume, tmp_path):
    import tifffile

    from xpression.inference.writers import export_bigtiff, write_ct_preview

    res = infer_volume(volume, pred(), tmp_path / "m.ome.zarr", normalize=norm, identity={"run": "r1"}, settings=S())
    ct = write_ct_preview(volume, res.grid, tmp_path / "ct.ome.zarr")
    ct0 = zarr.open_group(str(ct), mode="r")["0"][:]
    c = res.grid.centres_vox
    np.testing.assert_array_equal(ct0, np.load(volume.path)[np.ix_(c(0), c(1), c(2))])
    tif = export_bigtiff(res.path, tmp_path / "m.tif", ct)
    data = tifffile.imread(tif)
    assert data.shape == (res.grid.shape[0], 4) + res.grid.shape[1:]
    np.testing.assert_allclose(data[:, 1:], np.moveaxis(read_maps(res.path)[0][:].astype(np.float32), 0, 1))


def test_resampled_volume_matches_native(volume):
    from xpression.data.patches import ResampledVolume

    same = ResampledVolume(volume, volume.voxel_size_um, None)
    np.testing.assert_array_equal(same.read_block((2, 3, 4), (6, 20, 30)), volume.read_block((2, 3, 4), (6, 20, 30)))
    coarse = ResampledVolume(volume, (12.8, 12.8, 12.8), None)
    assert coarse.shape == (6, 22, 24)
    # Each coarse voxel is the low-passed source at its centre: a block away from the edges agrees
    # with a smoothed 2x subsampling of the source (sigma sqrt(2^2 - 1) / 2 source voxels).
    from scipy import ndimage

    src = volume.read_block((0, 0, 0), volume.shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(src, np.sqrt(3.0) / 2.0, mode="nearest")
    np.testing.assert_allclose(coarse.read_block((3, 3, 3), (4, 8, 9)), smooth[6:7, 6:16:2, 6:18:2], rtol=1e-5)


def test_resampled_volume_values_on_a_ramp(tmp_path):
    """A linear intensity ramp is kept exactly by trilinear interpolation and the symmetric
    low-pass: view voxel i lies at source voxel i * ratio (same physical frame)."""
    from xpression.data.patches import ResampledVolume

    z, y, x = np.meshgrid(np.arange(20), np.arange(40), np.arange(44), indexing="ij")
    np.save(tmp_path / "ramp.npy", (2.0 * z + 0.5 * y + 0.25 * x + 1.0).astype(np.float32))
    view = ResampledVolume(open_volume(tmp_path / "ramp.npy", voxel_size_um=6.4), (12.8, 9.6, 9.6), None)  # ratios 2, 1.5, 1.5
    assert view.shape == (10, 27, 29) and view.voxel_size_um == (12.8, 9.6, 9.6)
    got = view.read_block((2, 4, 5), (7, 20, 22))  # interior: the low-pass never reaches the edges
    zi, yi, xi = np.meshgrid(np.arange(2, 7), np.arange(4, 20), np.arange(5, 22), indexing="ij")
    np.testing.assert_allclose(got, 2.0 * 2 * zi + 0.5 * 1.5 * yi + 0.25 * 1.5 * xi + 1.0, rtol=0, atol=1e-3)


def test_auto_tiles_follow_device_memory_and_a_resumed_store_keeps_its_own(volume, tmp_path):
    from xpression.inference.volume_sweep import DEFAULT_TILE_VOX, auto_tile_vox, plan_grid

    p = pred()
    grid, _ = plan_grid(volume, p, SPACING, "dense")
    assert auto_tile_vox(p, grid, volume.shape) == DEFAULT_TILE_VOX  # the CPU
    p.dense_geometry()
    p.device = torch.device("cuda")  # sized as if on a GPU with this much memory (nothing runs on it)
    big = (100, 5000, 5000)
    picks = [auto_tile_vox(p, grid, big, memory_bytes=m)[1] for m in (10**6, 10**8, 10**9, 10**12)]
    # 256 voxels where memory is short; 4096 where it is not, balanced to two tiles of 2560 over 5000
    assert picks == sorted(picks) and picks[0] == 256 and picks[-1] == 2560
    assert auto_tile_vox(p, grid, (100, 700, 600), memory_bytes=10**12)[1:] == (704, 640)  # no larger than the volume needs
    # An interrupted store resumed with tile_vox=auto keeps the tiles it was started with.
    out = tmp_path / "m.ome.zarr"
    kw = {**KW, "tile_vox": (3, 16, 16)}

    def stop(tr):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        infer_volume(volume, pred(), out, normalize=norm, identity={"run": "r1"}, on_tile=stop, settings=S(**kw))
    res = infer_volume(volume, pred(), out, normalize=norm, identity={"run": "r1"}, settings=S(**{**kw, "tile_vox": "auto"}))
    assert res.complete and res.tiles_computed == res.tiles_tissue - 1
    assert res.tile_shape == tuple(read_maps(out)[1]["tile_shape"])


def test_each_torchrun_process_takes_its_own_gpu(monkeypatch):
    from xpression.inference.shards import process_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_device("auto") == "auto"
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device("cuda") == "cuda"  # no GPU: unchanged
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert process_device("auto") == "cuda:1" and process_device(None) == "cuda:1"
    assert process_device("cpu") == "cpu" and process_device("cuda:3") == "cuda:3"


def test_unnamed_predictor_writes_every_channel(volume, tmp_path):
    """``Predictor(net)`` without target names: the store still gets one named channel per output."""
    from xpression.data.targets import TargetSpec

    res = infer_volume(volume, Predictor(TinyValidNet(targets=4), device="cpu"), tmp_path / "m.ome.zarr",
                       mask=blob_mask, normalize=norm, identity={"run": "r1"}, settings=S())
    maps, meta = read_maps(res.path)
    assert meta["targets"] == ["t0", "t1", "t2", "t3"] and maps.shape[0] == 4
    assert np.isfinite(maps[:].astype(np.float32)).any()
    net = TinyValidNet()
    net.target_spec = TargetSpec(["x", "y", "z"], "log_expression")
    assert Predictor(net, device="cpu").output_names() == ["x", "y", "z"]  # a model that knows its targets names them


def test_map_sinks_write_the_finished_maps(volume, tmp_path):
    """The registered sinks (bigtiff; a format added the way a new file adds one) write the
    same values as the store; an unknown sink is an error before anything is written."""
    import tifffile

    from xpression.inference.sinks import SINKS, check_exports, register_sink, write_exports

    class NpySink:
        name = "npy_test"

        def write(self, maps, out_dir):
            np.save(out_dir / "maps.npy", maps.values[:].astype(np.float32))
            return out_dir / "maps.npy"

    if "npy_test" not in SINKS:
        register_sink(NpySink())
    res = infer_volume(volume, pred(), tmp_path / "m.ome.zarr", mask=blob_mask, normalize=norm,
                       identity={"run": "r1"}, settings=S())
    written = write_exports(["ome_zarr", "bigtiff", "npy_test"], res.path, tmp_path)
    assert written == {"ome_zarr": res.path, "bigtiff": tmp_path / "maps.tif", "npy_test": tmp_path / "maps.npy"}
    store = read_maps(res.path)[0][:].astype(np.float32)
    np.testing.assert_array_equal(np.load(tmp_path / "maps.npy"), store)
    np.testing.assert_array_equal(np.moveaxis(tifffile.imread(tmp_path / "maps.tif"), 1, 0), store)
    with pytest.raises(InferenceError, match=r"exports: unknown map sink 'zarr2'; valid names: bigtiff, .*ome_zarr"):
        check_exports(["zarr2"])


def test_predictors_take_the_cache_uint8_levels_as_their_float_intensities():
    """Patches as the cache stores them (uint8 levels) give the predictions of their float32
    intensities, for a network's Predictor and a fitted model alike."""
    from xpression.data.patches import dequantise

    levels = np.random.default_rng(4).integers(0, 256, (3, *TinyValidNet().patch_shape), dtype=np.uint8)
    p = pred()
    want = p.predict_patches(dequantise(levels))
    np.testing.assert_array_equal(p.predict_patches(levels), want)
    assert np.ptp(want, axis=0).max() > 0  # the patches' predictions differ: the input reached the net

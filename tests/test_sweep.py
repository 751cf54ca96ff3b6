"""The sweep as a pure function: grids, tiles, patch vs dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests._inference_models import TinyPlaneNet, TinySameNet, TinyValidNet
from xpression.data.volume import open_volume
from xpression.inference.grid import GridError, Tiling, choose_tile_shape, make_grid
from xpression.inference.predictor import InferenceError, Predictor
from xpression.inference.sweep import dense_multiples, sweep, sweep_tiles, tissue_tiles

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=(17, 40, 44), dtype=np.uint8)
    path = tmp_path_factory.mktemp("vol") / "v.npy"
    np.save(path, arr)
    return open_volume(path, voxel_size_um=(6.4, 6.4, 6.4))


def norm(block):
    return block.astype(np.float32) / 255.0


def test_make_grid_rounds_and_reports():
    grid, notes = make_grid((100, 200, 200), (6.4, 6.4, 6.4), (33.6, 25.6, 25.6), multiple_of=(1, 2, 2))
    assert grid.step_vox == (5, 4, 4)
    assert any("z: spacing 33.6 um -> 32 um" in n for n in notes)
    assert grid.shape == (20, 50, 50)
    # Anchored: a grid plane through z = 320 um.
    g2, _ = make_grid((100, 200, 200), (6.4,) * 3, 32.0, anchor_um=(320.0, None, None))
    assert 320.0 in g2.axis_um(0)


def test_grid_finer_than_model_is_an_error():
    with pytest.raises(GridError, match="finer than the model"):
        make_grid((50, 50, 50), (6.4,) * 3, (32.0, 6.4, 6.4), multiple_of=(1, 2, 2))


def test_tiling_covers_grid_once():
    tiling = Tiling((7, 10, 9), (3, 4, 4))
    seen = np.zeros((7, 10, 9), int)
    for t in tiling:
        seen[t.slices] += 1
    assert (seen == 1).all() and len(tiling) == 3 * 3 * 3


def test_choose_tile_shape_aligns_to_chunks():
    grid, _ = make_grid((128, 256, 256), (1.0,) * 3, (4, 4, 4))
    assert choose_tile_shape(grid, (64, 100, 100), chunks=(32, 32, 32))[1:] == (24, 24)


@pytest.mark.parametrize("spacing", [(6.4, 12.8, 12.8), (32.0, 12.8, 25.6)])
def test_dense_equals_patch_for_dense_equivalent_net(volume, spacing):
    pred = Predictor(TinyValidNet(), device="cpu")
    mult = dense_multiples(pred, volume.voxel_size_um, spacing)
    grid, _ = make_grid(volume.shape, volume.voxel_size_um, spacing, multiple_of=mult)
    kw = dict(tile_shape=(2, 5, 4), normalize=norm)
    dense = sweep(volume, pred, grid, mode="dense", **kw)
    patch = sweep(volume, pred, grid, mode="patch", batch_size=7, **kw)
    assert dense.shape == (3,) + grid.shape and np.isfinite(dense).all()
    np.testing.assert_allclose(dense, patch, atol=1e-4, rtol=0)


def test_dense_on_a_grid_coarser_than_the_output_stride(volume):
    """cnn3d asked for every 2nd/3rd output (grid step > output stride) still equals patch mode."""
    from xpression.models.net import build_net
    from xpression.models.targets import TargetSpec

    torch.manual_seed(0)
    spec = TargetSpec(names=["a", "b", "c"], kind="composition")
    net = build_net({"name": "cnn3d", "widths": [4, 6, 8], "dense_width": 8}, spec, (5, 21, 21)).eval()
    pred = Predictor(net, device="cpu")
    assert pred._dense_takes_step and pred.output_stride == (1, 4, 4)
    grid, _ = make_grid(volume.shape, volume.voxel_size_um, (12.8, 51.2, 76.8), multiple_of=(1, 4, 4))
    assert grid.step_vox == (2, 8, 12)
    kw = dict(tile_shape=(3, 2, 2), normalize=norm)
    dense = sweep(volume, pred, grid, mode="dense", **kw)
    patch = sweep(volume, pred, grid, mode="patch", **kw)
    assert np.isfinite(dense).all()
    np.testing.assert_allclose(dense, patch, atol=1e-4, rtol=0)


def test_patch_mode_matches_direct_forward(volume):
    net = TinyValidNet()
    grid, _ = make_grid(volume.shape, volume.voxel_size_um, (32.0, 25.6, 25.6))
    out = sweep(volume, net, grid, mode="patch", tile_shape=(1, 4, 4), normalize=norm)
    i, j, k = 1, 2, 3
    c = np.asarray(grid.origin_vox) + np.array([i, j, k]) * np.asarray(grid.step_vox)
    lo = c - np.array(net.patch_shape) // 2
    block = norm(volume.read_block(lo, lo + np.array(net.patch_shape)))
    with torch.no_grad():
        ref = net(torch.from_numpy(block)[None, None]).numpy()[0]
    np.testing.assert_allclose(out[:, i, j, k], ref, atol=1e-6)


def test_mask_gives_nan_and_skips_tiles(volume):
    pred = Predictor(TinyValidNet(), device="cpu")
    grid, _ = make_grid(volume.shape, volume.voxel_size_um, (6.4, 12.8, 12.8), multiple_of=(1, 2, 2))
    mask = np.zeros(grid.shape, bool)
    mask[:, :2, :2] = True
    tiles = Tiling(grid.shape, (4, 2, 2))
    assert tissue_tiles(tiles, grid, mask) == [t.index for t in tiles if t.start[1:] == (0, 0)]
    results = list(sweep_tiles(volume, pred, grid, tile_shape=(4, 2, 2), mask=mask, normalize=norm))
    assert {r.tile.index for r in results} == set(tissue_tiles(tiles, grid, mask))
    out = sweep(volume, pred, grid, tile_shape=(4, 2, 2), mask=mask, normalize=norm)
    assert np.isnan(out[:, ~mask]).all() and np.isfinite(out[:, mask]).all()
    # A callable mask on um points works the same way.
    out2 = sweep(volume, pred, grid, tile_shape=(4, 2, 2), normalize=norm,
                 mask=lambda p: (p[:, 1] < 2 * grid.spacing_um[1] + grid.origin_um[1] - 1) & (p[:, 2] < 2 * grid.spacing_um[2] + grid.origin_um[2] - 1))
    np.testing.assert_array_equal(np.isnan(out2), np.isnan(out))


def test_not_dense_equivalent_net_runs_with_overlap(volume):
    pred = Predictor(TinySameNet(), device="cpu")
    grid, _ = make_grid(volume.shape, volume.voxel_size_um, (6.4, 12.8, 12.8), multiple_of=(1, 2, 2))
    dense = sweep(volume, pred, grid, mode="dense", tile_shape=(3, 3, 3), normalize=norm)
    patch = sweep(volume, pred, grid, mode="patch", tile_shape=(3, 3, 3), normalize=norm)
    assert np.isfinite(dense).all()
    assert 0 < np.abs(dense - patch).max() < 1.0


def test_plane_net_dense_mode(volume):
    pred = Predictor(TinyPlaneNet(), device="cpu")
    assert pred.dense_geometry().plane
    grid, _ = make_grid(volume.shape, volume.voxel_size_um, (19.2, 6.4, 6.4))
    dense = sweep(volume, pred, grid, mode="dense", tile_shape=(2, 8, 8), overlap=0.5, normalize=norm)
    patch = sweep(volume, pred, grid, mode="patch", tile_shape=(2, 8, 8), normalize=norm)
    # Zero padding at the patch border (patch) vs real neighbours (dense) differ only at the edge
    # of the 3x3 kernel's reach, which lies inside the 9x9 patch: identical here.
    np.testing.assert_allclose(dense, patch, atol=1e-5)


def test_dense_mode_without_dense_support_is_an_error(volume):
    class PatchOnly(torch.nn.Module):
        patch_shape = (5, 13, 13)

        def forward(self, x):
            return x.mean((2, 3, 4)).repeat(1, 2)

    grid, _ = make_grid(volume.shape, volume.voxel_size_um, 32.0)
    with pytest.raises(InferenceError, match="no dense mode"):
        sweep(volume, PatchOnly(), grid, mode="dense")
    out = sweep(volume, PatchOnly(), grid, mode="patch", tile_shape=(2, 4, 4))
    assert out.shape == (2,) + grid.shape


def test_gpu_style_reading_gives_the_same_maps(volume):
    """Read-ahead threads, tiles padded to one input shape and normalisation next to the network
    (the GPU path, run here on the CPU) give the maps of the plain sweep."""
    from xpression.data.intensity import IntensityNormalizer
    from xpression.data.patches import Quantised

    pred = Predictor(TinyValidNet(), device="cpu")
    grid, _ = make_grid(volume.shape, volume.voxel_size_um, (6.4, 12.8, 12.8), multiple_of=(1, 2, 2))
    mask = np.zeros(grid.shape, bool)
    mask[1:, 1:6, 2:] = True
    normalizer = Quantised(IntensityNormalizer(20.0, 230.0))
    kw = dict(tile_shape=(3, 4, 3), mask=mask, normalize=normalizer)
    plain = sweep(volume, pred, grid, prefetch=0, pad_tiles=False, normalize_on_device=False, **kw)
    threads = sweep(volume, pred, grid, prefetch=5, readers=3, **kw)
    np.testing.assert_array_equal(threads, plain)
    on_device = sweep(volume, pred, grid, normalize_on_device=True, **kw)
    np.testing.assert_array_equal(on_device, plain)
    padded = sweep(volume, pred, grid, pad_tiles=True, normalize_on_device=True, **kw)
    np.testing.assert_allclose(padded, plain, atol=1e-5, rtol=0)
    assert np.isfinite(plain[:, mask]).all() and np.isnan(padded[:, ~mask]).all()
    # every padded slab of a tile has one input shape, edge tiles included
    from xpression.inference.sweep import _read_tile, plan_sweep

    tiling = Tiling(grid.shape, (3, 4, 3))
    plan = plan_sweep(pred, grid, "dense", None, tiling.tile_shape)
    shapes = {tuple(b - a for a, b in zip(sl.vstart, sl.vstop))
              for t in tiling for sl in _read_tile(volume, plan, grid, t, None, norm, False, False, tiling.tile_shape).slabs}
    assert len(shapes) == 1


def test_a_read_error_reaches_the_caller(volume):
    class Broken:
        shape, dtype, voxel_size_um = volume.shape, volume.dtype, volume.voxel_size_um

        def read_block(self, start, stop, fill=0):
            if start[0] > 4:
                raise OSError("chunk 3/0/0 is corrupt")
            return volume.read_block(start, stop, fill)

    pred = Predictor(TinyValidNet(), device="cpu")
    grid, _ = make_grid(volume.shape, volume.voxel_size_um, (6.4, 12.8, 12.8), multiple_of=(1, 2, 2))
    with pytest.raises(OSError, match="corrupt"):
        sweep(Broken(), pred, grid, tile_shape=(3, 4, 4), normalize=norm, prefetch=3, readers=2)


@pytest.mark.parametrize("numpy_gather", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("shape, stride", [((3, 5, 4), (1, 1, 1)), ((2, 3, 3), (2, 3, 1))])
def test_patch_windows_are_the_slices_cut_one_by_one(numpy_gather, shape, stride):
    """The patch sweep's batched cut (numpy's on the CPU, torch's on a GPU) gives, per corner,
    exactly the strided slice of the block there, corners at the faces included."""
    from xpression.inference.sweep import _windows

    block = torch.rand(9, 14, 11, generator=torch.Generator().manual_seed(0))
    span = [(n - 1) * k + 1 for n, k in zip(shape, stride)]
    corners = np.array([[0, 0, 0], [9 - span[0], 14 - span[1], 11 - span[2]], [2, 5, 1], [2, 5, 1]])
    got = _windows(block, corners, shape, stride, numpy_gather=numpy_gather)
    want = torch.stack([block[a:a + s0, b:b + s1, c:c + s2][::stride[0], ::stride[1], ::stride[2]]
                        for (a, b, c), (s0, s1, s2) in zip(corners, [span] * len(corners))])
    assert got.shape == (len(corners),) + shape and torch.equal(got, want)

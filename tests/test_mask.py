"""Low-resolution tissue mask: blob recovery, small objects, box queries, cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

import xpression.data.mask as mask_mod
from xpression.data.mask import TissueMask, tissue_mask
from xpression.data.omezarr import write_omezarr
from xpression.data.volume import VolumeError, open_volume

VOX = 2.0
CENTRE_UM = np.array([40.0, 96.0, 80.0])  # voxel (20, 48, 40)
RADIUS_UM = 50.0
PARAMS = dict(window_um=12.0, stride_um=8.0, min_object_um2=300.0, feature="mean")


def blob(shape=(40, 96, 96), speck=False, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pos = np.indices(shape).transpose(1, 2, 3, 0) * VOX
    r = np.linalg.norm(pos - CENTRE_UM, axis=-1)
    a = np.where(r < RADIUS_UM, 150.0, 20.0) + rng.normal(0, 10, shape)
    if speck:
        a[:, 5:8, 85:88] = 150.0  # a 6x6 um bright speck in every slice, far from the blob
    return a.clip(0, 255).astype(np.uint8)


def truth_for(tm: TissueMask) -> np.ndarray:
    pts = np.indices(tm.shape).reshape(3, -1).T * np.asarray(tm.voxel_size_um) + np.asarray(tm.origin_um)
    return (np.linalg.norm(pts - CENTRE_UM, axis=1) < RADIUS_UM).reshape(tm.shape)


@pytest.fixture()
def zarr_vol(tmp_path):
    return open_volume(write_omezarr(blob(), tmp_path / "b.ome.zarr", VOX, chunk=(16, 32, 32)))


def test_mask_recovers_blob(zarr_vol):
    tm = tissue_mask(zarr_vol, **PARAMS, cache=False)
    assert tm.voxel_size_um == (8.0, 8.0, 8.0) and tm.origin_um == (0.0, 0.0, 0.0)
    assert tm.shape == (10, 24, 24)  # grid centres 0, 8, ..., up to the last voxel centre
    truth = truth_for(tm)
    assert (tm.mask == truth).mean() > 0.97
    dice = 2 * (tm.mask & truth).sum() / (tm.mask.sum() + truth.sum())
    assert dice > 0.95
    assert 20 < tm.threshold < 150


def test_pyramid_level_gives_same_mask(tmp_path, zarr_vol):
    # The zarr volume is read at its 8 um level; the .npy has no pyramid and is read at 2 um.
    np.save(tmp_path / "b.npy", blob())
    from_npy = tissue_mask(open_volume(tmp_path / "b.npy", VOX), **PARAMS, cache=False)
    from_zarr = tissue_mask(zarr_vol, **PARAMS, cache=False)
    assert from_npy.shape == from_zarr.shape
    assert (from_npy.mask == from_zarr.mask).mean() > 0.97


def test_path_input_and_anisotropic_stride(tmp_path):
    np.save(tmp_path / "b.npy", blob())
    tm = tissue_mask(tmp_path / "b.npy", voxel_size_um=VOX, window_um=12.0, stride_um=(4.0, 8.0, 8.0),
                     min_object_um2=300.0, feature="mean", cache=False)
    assert tm.voxel_size_um == (4.0, 8.0, 8.0) and tm.shape == (20, 24, 24)
    assert (tm.mask == truth_for(tm)).mean() > 0.97


def test_small_objects_removed(tmp_path):
    np.save(tmp_path / "s.npy", blob(speck=True))
    vol = open_volume(tmp_path / "s.npy", VOX)
    kept = tissue_mask(vol, window_um=8.0, stride_um=4.0, min_object_um2=0.0, feature="mean", cache=False)
    dropped = tissue_mask(vol, window_um=8.0, stride_um=4.0, min_object_um2=400.0, feature="mean", cache=False)
    speck_um = np.array([[20.0, 13.0, 173.0]])
    assert kept.contains(speck_um)[0] and not dropped.contains(speck_um)[0]
    assert dropped.contains(CENTRE_UM[None])[0]


def test_contains_and_fraction_in_box():
    rng = np.random.default_rng(0)
    m = rng.random((6, 7, 8)) < 0.4
    tm = TissueMask(m, (10.0, 5.0, 4.0), (1.0, 2.0, 3.0))
    idx = np.array([[0, 0, 0], [5, 6, 7], [2, 3, 4]])
    pts = idx * np.array([10.0, 5.0, 4.0]) + np.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(tm.contains(pts + 0.4), m[idx[:, 0], idx[:, 1], idx[:, 2]])
    assert not tm.contains([[-50.0, 0, 0], [1e4, 1e4, 1e4]]).any()
    centres_vox = np.indices(m.shape).reshape(3, -1).T
    centres_um = centres_vox * np.array([10.0, 5.0, 4.0]) + np.array([1.0, 2.0, 3.0])
    for _ in range(20):
        c = rng.uniform(-10, 70, 3)
        s = rng.uniform(5, 40, 3)
        inside = np.all(np.abs(centres_um - c) <= s / 2 + 1e-9, axis=1)
        if not inside.any():
            continue
        # Count of in-grid tissue over all lattice points in the box (outside counts as 0).
        lo = np.ceil((c - s / 2 - [1, 2, 3]) / [10, 5, 4] - 1e-9)
        hi = np.floor((c + s / 2 - [1, 2, 3]) / [10, 5, 4] + 1e-9)
        expect = m.reshape(-1)[inside].sum() / np.prod(hi - lo + 1)
        assert tm.fraction_in_box(c, s) == pytest.approx(expect)
    many = tm.fraction_in_box(centres_um[:5], 30.0)
    assert many.shape == (5,)
    # A box thinner than a mask voxel uses the nearest voxel plane.
    assert tm.fraction_in_box(pts[2], (1.0, 1.0, 1.0)) == float(m[2, 3, 4])
    assert tm.fraction_in_box([1e4, 0, 0], 10.0) == 0.0


def test_fraction_in_box_on_blob(zarr_vol):
    tm = tissue_mask(zarr_vol, **PARAMS, cache=False)
    assert tm.fraction_in_box(CENTRE_UM, 40.0) == 1.0
    assert tm.fraction_in_box([40.0, 5.0, 180.0], 20.0) == 0.0
    edge = tm.fraction_in_box(CENTRE_UM + [0, 0, RADIUS_UM], (16.0, 64.0, 64.0))
    assert 0.25 < edge < 0.75


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    path = tmp_path / "b.npy"
    np.save(path, blob())
    vol = open_volume(path, VOX)
    first = tissue_mask(vol, **PARAMS)
    files = sorted(tmp_path.glob("b.npy.mask-*.npz"))
    assert len(files) == 1

    calls = []
    real = mask_mod._compute
    monkeypatch.setattr(mask_mod, "_compute", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = tissue_mask(vol, **PARAMS)
    assert calls == [] and np.array_equal(again.mask, first.mask)
    assert again.voxel_size_um == first.voxel_size_um and again.threshold == first.threshold

    tissue_mask(vol, **dict(PARAMS, window_um=16.0))  # other parameters: another cache entry
    assert calls == [1] and len(list(tmp_path.glob("b.npy.mask-*.npz"))) == 2

    # The volume changes on disk: the stale cache is not reused.
    shifted = np.roll(blob(), 20, axis=2)
    np.save(path, shifted)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    moved = tissue_mask(open_volume(path, VOX), **PARAMS)
    assert calls == [1, 1] and not np.array_equal(moved.mask, first.mask)
    assert moved.contains((CENTRE_UM + [0, 0, 40.0])[None])[0]


def test_cache_dir_and_disabled(tmp_path, zarr_vol):
    tissue_mask(zarr_vol, **PARAMS, cache=False)
    assert not list(tmp_path.glob("*.npz"))
    cdir = tmp_path / "cache" / "masks"
    tm = tissue_mask(zarr_vol, **PARAMS, cache_dir=cdir)
    (cached,) = list(cdir.glob("b.ome.zarr.mask-*.npz"))
    loaded, key = TissueMask.load(cached)
    assert np.array_equal(loaded.mask, tm.mask) and key["window_um"] == PARAMS["window_um"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="could not cache"):
        tissue_mask(zarr_vol, **PARAMS, cache_dir=blocker / "sub")


def test_corrupt_cache_is_recomputed(tmp_path):
    np.save(tmp_path / "b.npy", blob())
    vol = open_volume(tmp_path / "b.npy", VOX)
    tm = tissue_mask(vol, **PARAMS)
    (cached,) = list(tmp_path.glob("b.npy.mask-*.npz"))
    cached.write_bytes(b"garbage")
    assert np.array_equal(tissue_mask(vol, **PARAMS).mask, tm.mask)


def test_empty_mask_raises(tmp_path):
    np.save(tmp_path / "flat.npy", np.full((20, 40, 40), 7, np.uint8))
    vol = open_volume(tmp_path / "flat.npy", VOX)
    with pytest.raises(VolumeError, match="tissue mask is empty") as e:
        tissue_mask(vol, **PARAMS)
    assert "flat.npy" in str(e.value)
    assert not list(tmp_path.glob("*.npz"))
    with pytest.raises(VolumeError, match="tissue mask is empty"):
        tissue_mask(open_volume(tmp_path / "flat.npy", VOX), **PARAMS, threshold=200.0)
    with pytest.raises(ValueError):
        tissue_mask(vol, window_um=0.0)


def test_std_feature_finds_porous_tissue_whose_mean_matches_the_medium(tmp_path):
    """Foam-like tissue (air and septa) averaging to the embedding medium's grey: only texture tells."""
    rng = np.random.default_rng(1)
    shape = (40, 96, 96)
    pos = np.indices(shape).transpose(1, 2, 3, 0) * VOX
    inside = np.linalg.norm(pos - CENTRE_UM, axis=-1) < RADIUS_UM
    foam = np.where(rng.random(shape) < 0.5, 30.0, 170.0)  # mean 100, strong texture
    a = np.where(inside, foam, 100.0) + rng.normal(0, 5, shape)
    np.save(tmp_path / "foam.npy", a.clip(0, 255).astype(np.uint8))
    vol = open_volume(tmp_path / "foam.npy", VOX)
    params = dict(window_um=12.0, stride_um=8.0, min_object_um2=300.0, cache=False)
    by_std = tissue_mask(vol, feature="std", **params)
    truth = truth_for(by_std)
    dice = 2 * (by_std.mask & truth).sum() / (by_std.mask.sum() + truth.sum())
    assert dice > 0.9
    by_mean = tissue_mask(vol, feature="mean", **params)
    dice_mean = 2 * (by_mean.mask & truth).sum() / max(by_mean.mask.sum() + truth.sum(), 1)
    assert dice_mean < 0.8  # the mean cannot separate them
    with pytest.raises(ValueError, match="feature"):
        tissue_mask(vol, feature="median", **params)

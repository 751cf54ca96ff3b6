"""Sampled intensity range, normaliser and histogram matching."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from xpression.data.intensity import (
    HistogramMatcher,
    IntensityNormalizer,
    histogram_match,
    intensity_transform,
    robust_range,
    sample_voxels,
)
from xpression.data.omezarr import write_omezarr
from xpression.data.volume import open_volume

QS = [10, 25, 50, 75, 90, 99]  # away from the clipped-at-zero tie mass


def scan(seed: int, shape=(40, 96, 96)) -> np.ndarray:
    """A bright ellipsoid with inner structure on a dark background, float 0..1."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    r = np.sqrt(((z - 20) / 18) ** 2 + ((y - 48) / 40) ** 2 + ((x - 48) / 36) ** 2)
    a = np.where(r < 1, 0.6 + 0.2 * np.sin(x / 5.0), 0.1) + rng.normal(0, 0.05, shape)
    return a.clip(0, 1)


@pytest.fixture(scope="module")
def ref_vol(tmp_path_factory):
    a = (scan(0) * 255).astype(np.uint8)
    out = write_omezarr(a, tmp_path_factory.mktemp("i") / "ref.ome.zarr", 2.0, chunk=(16, 32, 32))
    return a, open_volume(out)


def test_sample_is_bounded_and_deterministic(ref_vol):
    a, vol = ref_vol
    s1 = sample_voxels(vol, max_voxels=20_000, n_blocks=16, seed=3)
    s2 = sample_voxels(vol, max_voxels=20_000, n_blocks=16, seed=3)
    assert 0 < s1.size <= 20_000 * 1.5 and s1.dtype == np.uint8
    np.testing.assert_array_equal(s1, s2)
    assert sample_voxels(a, max_voxels=1000).size <= 2000


def test_robust_range_close_to_exact(ref_vol):
    a, vol = ref_vol
    exact = np.percentile(a, [0.5, 99.5])
    lo, hi = robust_range(vol)  # the volume is small enough to be read whole in 128 blocks
    assert (lo, hi) == pytest.approx(tuple(exact), abs=1)
    lo2, hi2 = robust_range(vol, sample=20_000)
    assert abs(lo2 - exact[0]) <= 8 and abs(hi2 - exact[1]) <= 8
    lo3, hi3 = robust_range(None, percentiles=(10, 90), sample=np.arange(101.0))
    assert (lo3, hi3) == (10.0, 90.0)


def test_normalizer():
    norm = IntensityNormalizer(50.0, 150.0)
    out = norm(np.array([0, 50, 100, 150, 255], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    assert IntensityNormalizer(50.0, 150.0, clip=False)(np.array([250.0]))[0] == pytest.approx(2.0)
    assert IntensityNormalizer.from_dict(norm.to_dict()) == norm
    for lo, hi in [(1, 1), (2, 1), (0, float("nan"))]:
        with pytest.raises(ValueError):
            IntensityNormalizer(lo, hi)


def test_normalizer_from_volume(ref_vol):
    a, vol = ref_vol
    norm = IntensityNormalizer.from_volume(vol)
    out = norm(vol[10:20, 30:60, 30:60])
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert np.mean(norm(a) >= 1.0) < 0.01


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_histogram_match_aligns_quantiles(ref_vol, tmp_path, dtype):
    a, vol = ref_vol
    # A second animal scanned with another calibration: gain, offset, gamma, other noise.
    other = scan(1) ** 1.4
    if dtype == np.uint8:
        b = (20 + 150 * other).astype(np.uint8)
    elif dtype == np.uint16:
        b = (1000 + 30000 * other).astype(np.uint16)
    else:
        b = (-3 + 10 * other).astype(np.float32)
    bvol = open_volume(write_omezarr(b, tmp_path / "b.ome.zarr", 2.0, chunk=(16, 32, 32)))
    before = np.abs(np.percentile(b.astype(float), QS) - np.percentile(a, QS)).max()
    matcher = histogram_match(bvol, vol)
    matched = np.concatenate([matcher(bvol[z : z + 8]).ravel() for z in range(0, 40, 8)])  # per block
    assert matched.dtype == np.float32
    after = np.abs(np.percentile(matched, QS) - np.percentile(a, QS)).max()
    assert after < 4.0 < before  # within a few grey levels of the reference
    # Monotone: order of intensities is preserved.
    ramp = np.linspace(b.min(), b.max(), 500).astype(dtype)
    assert np.all(np.diff(matcher(np.sort(ramp))) >= 0)


def test_histogram_match_lut_and_transform(ref_vol):
    a, vol = ref_vol
    b = (20 + 150 * scan(2) ** 1.4).astype(np.uint8)
    m = histogram_match(b, a)
    assert isinstance(m, HistogramMatcher) and m.lut is not None and m.lut.shape == (256,)
    with pytest.raises(TypeError):
        m(np.zeros(3, np.float32))
    t = intensity_transform(b, reference=vol)
    out = t(b)
    assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    ref_norm = IntensityNormalizer.from_volume(vol)(a)
    assert np.abs(np.percentile(out, QS) - np.percentile(ref_norm, QS)).max() < 0.03
    pickle.loads(pickle.dumps(t))  # travels to data-loader workers
    plain = intensity_transform(vol)
    assert isinstance(plain, IntensityNormalizer)


def test_divide255_scaling(ref_vol, tmp_path):
    a, vol = ref_vol
    t = intensity_transform(vol, scaling="divide255")
    assert t == IntensityNormalizer(0.0, 255.0)
    np.testing.assert_allclose(t(np.array([0, 51, 255], np.uint8)), [0.0, 0.2, 1.0], atol=1e-7)
    # with a reference: matched onto it first, then / 255 (not the reference's robust range)
    b = (20 + 150 * scan(2) ** 1.4).astype(np.uint8)
    matched = intensity_transform(b, reference=vol, scaling="divide255")
    np.testing.assert_allclose(matched(b), histogram_match(b, vol)(b) / 255.0, rtol=1e-6)
    wide = open_volume(write_omezarr((scan(1) * 4000).astype(np.uint16), tmp_path / "wide.ome.zarr", 2.0))
    with pytest.raises(ValueError, match="divide255 needs 8-bit volumes.*uint16"):
        intensity_transform(wide, scaling="divide255")
    with pytest.raises(ValueError, match="robust, divide255"):
        intensity_transform(vol, scaling="per_slice")


def test_torch_transforms_give_the_numpy_numbers(ref_vol):
    """``apply_torch`` (what a GPU sweep runs) equals the numpy transform bit for bit."""
    import torch

    from xpression.data.intensity import IntensityNormalizer, MatchedNormalizer, histogram_match
    from xpression.data.patches import Quantised

    block = np.random.default_rng(3).integers(0, 256, size=(4, 30, 31), dtype=np.uint8)
    norm = IntensityNormalizer(13.7, 201.3)
    matched = MatchedNormalizer(histogram_match(block, ref_vol[0]), norm)
    for transform in (norm, Quantised(norm), matched, Quantised(matched)):
        want = transform(block)
        got = transform.apply_torch(torch.from_numpy(block)).numpy()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    assert 0 < len(np.unique(Quantised(norm)(block))) <= 256

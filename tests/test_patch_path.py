"""One patch path: the patch a model trains on equals, bit for bit, the patch the whole-volume
sweep reads at the same point, for every sampler and resampling case (the sweep's host read is
``normalize(volume.read_block(lo, hi))`` with the pair ``InputSpec.prepare`` returns)."""

from __future__ import annotations

import numpy as np
import pytest

from xpression.data.datamodule import XPressionDataModule
from xpression.data.manifest import load_manifest
from xpression.data.patches import dequantise
from xpression.data.sampling import JitterSampler, SpotSampler, StratifiedSampler
from xpression.data.splits import SpatialBlocksSplit
from xpression.data.volume import open_volume

SAMPLERS = {"spot": SpotSampler, "stratified": StratifiedSampler, "jitter": JitterSampler}
VOXELS = {"native": None, "coarser": (12.8, 12.8, 12.8), "finer_z": (3.2, 6.4, 6.4)}


def sweep_patch(spec, volume, centre_um):
    """The patch the sweep feeds the model at the model-voxel point nearest ``centre_um``."""
    view, normalize = spec.prepare(volume)
    idx = (np.asarray(centre_um) - np.asarray(view.origin_um)) / np.asarray(view.voxel_size_um)
    np.testing.assert_allclose(idx, np.rint(idx), atol=1e-6)  # training centres lie on the model lattice
    half = np.asarray(spec.patch_shape_vox) // 2
    start = np.rint(idx).astype(int) - half
    return normalize(view.read_block(start, start + 2 * half + 1, fill=0))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("voxels", sorted(VOXELS))
def test_training_patch_equals_the_sweep_patch(tiny_cohort, sampler, voxels):
    kw = {"fraction": 1.0} if sampler == "jitter" else {}
    dm = XPressionDataModule(tiny_cohort, sampler=SAMPLERS[sampler](voxel_size_um=VOXELS[voxels], **kw),
                             split=SpatialBlocksSplit(block_um=300.0), batch_size=8, check_tissue_mask=False)
    dm.setup("fit")
    spec = dm.input_spec()
    assert spec.voxel_size_um == tuple(dm.voxel_size_um)
    ds = dm._datasets["all"]
    cohort = load_manifest(tiny_cohort)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(dm.spots), size=6, replace=False)
    checked = 0
    for row in rows:
        sid = ds.section[row]
        grid = ds.slabs[sid][1]
        entry = cohort.volume(dm.spots["volume_id"].iloc[row])
        volume = open_volume(entry.image, entry.voxel_size_um)
        # the spot's own patch and one shifted in the section plane (the jitter sampler's items)
        for du, dv in ((0.0, 0.0), (2 * grid.spacing_um[2], -grid.spacing_um[1])):
            patch, _ = ds.patch((int(row), du, dv))
            h, w = ds.centre_hw[row] + np.rint([dv / grid.spacing_um[1], du / grid.spacing_um[2]]).astype(int)
            centre = grid.world(np.array([[grid.centre_d, h, w]], float))[0]
            np.testing.assert_array_equal(dequantise(np.asarray(patch)), sweep_patch(spec, volume, centre))
            checked += 1
    assert checked == 12


@pytest.mark.parametrize("ratio", [(0.25, 0.25, 0.25), (0.731, 0.3217, 0.41), (2.5, 1.7, 3.3)])
def test_lattice_sampling_is_trilinear_interpolation(ratio):
    """The separable lattice sampler gives map_coordinates' trilinear numbers (order 1) to within
    one float32 unit, up- and down-sampling, whatever the block's start."""
    from scipy import ndimage

    from xpression.data.patches import _sample_lattice

    rng = np.random.default_rng(3)
    block = rng.random((30, 90, 80)).astype(np.float32)
    ratio = np.asarray(ratio)
    block_start = np.array([4, 7, 2])
    lattice_start = np.ceil(block_start / ratio) + 1  # the first point inside the block
    shape = tuple(int((n - 1 + s) / r - l) + 1 for n, s, r, l in zip(block.shape, block_start, ratio, lattice_start))
    coords = np.stack(np.meshgrid(*[(lattice_start[a] + np.arange(shape[a])) * ratio[a] - block_start[a] for a in range(3)],
                                  indexing="ij"))
    want = ndimage.map_coordinates(block, coords.reshape(3, -1), order=1).reshape(shape)
    got = _sample_lattice(block, block_start, lattice_start, ratio, shape)
    assert got.shape == want.shape and got.dtype == np.float32 and min(shape) >= 3
    np.testing.assert_array_max_ulp(got, want, maxulp=1)
    with pytest.raises(ValueError, match="outside the block"):
        _sample_lattice(block, block_start, lattice_start - 20, ratio, shape)

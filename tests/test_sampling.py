"""Samplers (spot, stratified, jitter) and batched dihedral augmentations."""

import numpy as np
import pytest
import torch

from xpression.data.augment import Augment, dihedral
from xpression.data.sampling import JitterSampler, SpotSampler, StratifiedSampler, stratified_extra_draws


def test_spot_sampler_each_spot_once_deterministic():
    rows = np.arange(10, 60)
    s = SpotSampler().build(rows, np.zeros(50), np.full(50, 27.5), seed=3)
    s.set_epoch(0)
    first = list(s)
    assert sorted(first) == rows.tolist()
    s2 = SpotSampler().build(rows, np.zeros(50), np.full(50, 27.5), seed=3)
    s2.set_epoch(0)
    assert list(s2) == first
    s.set_epoch(1)
    assert list(s) != first


def test_stratified_draws_rare_classes_more_capped():
    labels = np.array([0] * 100 + [1] * 30 + [2] * 5)
    extra = stratified_extra_draws(labels, cap=4)
    assert extra[0] == 0 and extra[100] == 2 and extra[130] == 4  # 100/30 -> 3x; 100/5 -> 20x capped at 1+4
    s = StratifiedSampler(cap=4).build(np.arange(135), labels, np.full(135, 27.5), seed=0)
    s.set_epoch(0)
    drawn = np.array(list(s))
    counts = np.bincount(labels[drawn], minlength=3)
    assert len(drawn) == len(s) == 100 + 30 * 3 + 5 * 5
    assert counts.tolist() == [100, 90, 25]
    assert np.bincount(drawn, minlength=135).max() == 5


def test_jitter_within_spot_radius_and_seeded():
    rows = np.arange(200)
    radius = np.full(200, 27.5)
    s = JitterSampler(fraction=1.0).build(rows, np.zeros(200), radius, seed=1)
    s.set_epoch(0)
    items = list(s)
    shifts = np.array([[du, dv] for _, du, dv in items])
    norms = np.linalg.norm(shifts, axis=1)
    assert norms.max() <= 27.5 and norms.max() > 20.0  # uniform over the disc, not a tiny box
    assert sorted(r for r, _, _ in items) == rows.tolist()
    again = JitterSampler(fraction=1.0).build(rows, np.zeros(200), radius, seed=1)
    again.set_epoch(0)
    assert list(again) == items


def test_dihedral_is_the_symmetry_group_of_the_square():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 1, 3, 5, 5)
    outs = [dihedral(x, k) for k in range(8)]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    n = x[0, 0, 0].numpy()
    expected = [np.rot90(n, k) for k in range(4)] + [np.rot90(n[:, ::-1], k) for k in range(4)]
    for k in range(8):
        np.testing.assert_array_equal(outs[k][0, 0, 0].numpy(), expected[k])
    # Closed under composition, every element has an inverse: a group of order 8.
    table = {}
    for a in range(8):
        for b in range(8):
            y = dihedral(dihedral(x, b), a)
            table[a, b] = next(k for k in range(8) if torch.equal(y, outs[k]))
    for a in range(8):
        assert sorted(table[a, b] for b in range(8)) == list(range(8))
        assert any(table[a, b] == 0 for b in range(8))


def test_augment_batched_is_per_sample_symmetry_and_deterministic():
    x = torch.rand(16, 1, 5, 9, 9)
    aug = Augment(dihedral=True, z_flip=True, intensity_scale=0.0, intensity_shift=0.0)
    y = aug(x, torch.Generator().manual_seed(0))
    y2 = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(y, y2) and y.shape == x.shape and y.dtype == x.dtype
    for i in range(16):
        cands = [dihedral(x[i], k) for k in range(8)]
        cands += [c.flip(1) for c in cands]
        assert any(torch.equal(y[i], c) for c in cands)
    z = Augment(dihedral=False, z_flip=False, intensity_scale=0.1, intensity_shift=0.05)(x, torch.Generator().manual_seed(0))
    ratio = (z - z.mean(dim=(2, 3, 4), keepdim=True)) / (x - x.mean(dim=(2, 3, 4), keepdim=True))
    assert torch.allclose(ratio.flatten(1).std(1), torch.zeros(16), atol=1e-3)  # affine per sample


def _augment_per_sample(aug, x, generator):
    """The augmentation written one sample at a time from the same draws: the reference the
    batched version must match exactly."""
    ks, flip, scale, shift = aug.draws(x.shape[0], x.shape[-1] == x.shape[-2], generator)
    out = []
    for i in range(x.shape[0]):
        y = dihedral(x[i], int(ks[i])) if ks is not None else x[i]
        y = y.flip(1) if flip is not None and flip[i] else y
        out.append(y * scale[i] + shift[i] if scale is not None else y)
    return torch.stack(out)


@pytest.mark.parametrize("options", [{}, {"dihedral": False}, {"z_flip": False}, {"intensity_scale": 0.0, "intensity_shift": 0.0},
                                     {"dihedral": False, "z_flip": False, "intensity_scale": 0.0, "intensity_shift": 0.0}])
@pytest.mark.parametrize("shape", [(32, 1, 5, 9, 9), (6, 2, 4, 6, 8)])
def test_augment_matches_per_sample_reference_exactly(options, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    aug = Augment(**options)
    for seed in range(3):
        g, ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        y = aug(x, g)
        assert torch.equal(y, _augment_per_sample(aug, x, ref))
        assert torch.equal(g.get_state(), ref.get_state())  # the same draws, no more
    if options.get("dihedral", True) and shape[-1] != shape[-2]:
        assert set(aug.draws(64, False, torch.Generator().manual_seed(0))[0].tolist()) <= {0, 2, 4, 6}


def test_transform_patch_is_dihedral_and_zflip():
    from xpression.data.augment import TRANSFORM_NAMES, transform_patch

    x = np.arange(3 * 5 * 5, dtype=np.float32).reshape(3, 5, 5)
    for k, name in enumerate(TRANSFORM_NAMES[:8]):
        np.testing.assert_array_equal(transform_patch(x, name), dihedral(torch.from_numpy(x), k).numpy())
    np.testing.assert_array_equal(transform_patch(x, "zflip"), x[::-1])
    assert len({transform_patch(x, n).tobytes() for n in TRANSFORM_NAMES}) == 9


def test_stratified_copies_get_distinct_fixed_symmetries():
    from xpression.data.sampling import PAPER_COPY_TRANSFORMS

    labels = np.array([0] * 100 + [1] * 30 + [2] * 5)
    s = StratifiedSampler(cap=4, copy_transforms=list(PAPER_COPY_TRANSFORMS)).build(np.arange(135) + 7, labels, np.full(135, 27.5), seed=0)
    epochs = []
    for epoch in range(2):
        s.set_epoch(epoch)
        draws = {}
        for row, du, dv, k in s:
            draws.setdefault(row, []).append(k)
        epochs.append(draws)
    extra = stratified_extra_draws(labels, cap=4)
    for i, row in enumerate(np.arange(135) + 7):
        ks = epochs[0][row]
        assert len(ks) == 1 + extra[i] and ks.count(0) == 1 and len(set(ks)) == len(ks)
        assert sorted(ks) == sorted(epochs[1][row])  # the same copies every epoch
    assert len({tuple(sorted(epochs[0][r])) for r in range(137, 142)}) > 1  # spots differ in their copies
    plain = StratifiedSampler(cap=4).build(np.arange(135), labels, np.full(135, 27.5), seed=0)
    plain.set_epoch(0)
    assert all(isinstance(r, int) for r in plain)


@pytest.mark.parametrize("kwargs, words", [
    (dict(cap=4, copy_transforms=["rot90", "flip", "zflip"]), "cap = 4"),
    (dict(copy_transforms=["rot90", "spin"]), "spin"),
    (dict(copy_transforms=["identity", "rot90"]), "identity"),
    (dict(cap=2, copy_transforms=["rot90", "rot90"]), "no repeats"),
])
def test_copy_transforms_checked_at_configuration(kwargs, words):
    with pytest.raises(ValueError, match=words):
        StratifiedSampler(**kwargs)

"""Splits: spatial blocks leave no train/test patch overlap; the published split does."""

import numpy as np
import pandas as pd
import pytest

from xpression.data.geometry import DataError, Plane
from xpression.data.splits import LeaveSectionOut, SpatialBlocksSplit, StratifiedRandomSplit, VolumesSplit, patch_overlap

PATCH_UM = (34.0, 205.0, 205.0)


def _hex_spots(section, volume, z, n=30, pitch=100.0, seed=0):
    rows = []
    for r in range(n):
        for c in range(n):
            u = c * pitch + (pitch / 2 if r % 2 else 0.0)
            v = r * pitch * np.sqrt(3) / 2
            rows.append((u, v))
    uv = np.array(rows)
    rng = np.random.default_rng(seed)
    dom = np.where(rng.random(len(uv)) < 0.15, 1, 0) + (uv[:, 0] > 2000)
    return pd.DataFrame({
        "section_id": section, "volume_id": volume, "u_um": uv[:, 0], "v_um": uv[:, 1],
        "z_um": z, "y_um": uv[:, 1], "x_um": uv[:, 0], "dominant": dom,
    })


@pytest.fixture()
def spots():
    return pd.concat([_hex_spots("a", "v0", 300.0), _hex_spots("b", "v1", 200.0, seed=1)], ignore_index=True)


PLANES = {"a": Plane.axial(300.0), "b": Plane.axial(200.0)}


def test_spatial_blocks_no_overlap_random_split_overlaps(spots):
    blocks = SpatialBlocksSplit(block_um=600.0, fractions=(0.7, 0.15, 0.15)).assign(spots, PLANES, PATCH_UM, seed=0)
    paper = StratifiedRandomSplit().assign(spots, PLANES, PATCH_UM, seed=0)
    overlaps = {}
    for name, lab in [("blocks", blocks), ("paper", paper)]:
        tr, te, va = spots[lab == "train"], spots[lab == "test"], spots[lab == "val"]
        overlaps[name] = (patch_overlap(tr, te, PLANES, PATCH_UM), patch_overlap(tr, va, PLANES, PATCH_UM))
    assert overlaps["blocks"] == (0, 0)
    assert overlaps["paper"][0] > 500 and overlaps["paper"][1] > 1000
    counts = pd.Series(blocks).value_counts()
    assert counts["train"] > 0.4 * len(spots) and counts["val"] > 50 and counts["test"] > 50 and counts["excluded"] > 0
    # The paper split keeps its proportions within each dominant program.
    frac = pd.Series(paper).value_counts(normalize=True)
    assert abs(frac["train"] - 0.8) < 0.01 and abs(frac["val"] - 0.14) < 0.01 and abs(frac["test"] - 0.06) < 0.01


def test_patch_overlap_counts_pairs_exactly():
    a = pd.DataFrame({"section_id": "a", "volume_id": "v0", "z_um": 0.0, "y_um": [0.0], "x_um": [0.0]})
    b = pd.DataFrame({"section_id": "a", "volume_id": "v0", "z_um": 0.0, "y_um": [0.0, 100.0, 204.0, 205.0, 300.0], "x_um": 0.0})
    planes = {"a": Plane.axial(0.0)}
    assert patch_overlap(a, b, planes, PATCH_UM) == 3  # 205 um apart = touching faces: no overlap
    c = b.assign(volume_id="v1")
    assert patch_overlap(a, c, planes, PATCH_UM) == 0


def test_tilted_patches_overlap_test():
    tilted = Plane.from_points([[0, 0, 0], [0, 100, 0], [100, 0, 100]])  # 45 deg about y
    planes = {"a": Plane.axial(0.0), "t": tilted}
    a = pd.DataFrame({"section_id": "a", "volume_id": "v", "z_um": [0.0], "y_um": [0.0], "x_um": [0.0]})
    # An axial box (34 x 205 x 205) and one tilted 45 deg about y, shifted along x: the tilted
    # box's normal separates them once x / sqrt(2) >= (17 + 102.5) / sqrt(2) + 17.
    gap = 119.5 + 17 * np.sqrt(2)
    far = pd.DataFrame({"section_id": "t", "volume_id": "v", "z_um": [0.0], "y_um": [0.0], "x_um": [gap + 0.1]})
    near = far.assign(x_um=far["x_um"] - 1.0)
    assert patch_overlap(a, far, planes, PATCH_UM) == 0
    assert patch_overlap(a, near, planes, PATCH_UM) == 1


def test_split_deterministic_under_seed(spots):
    s = SpatialBlocksSplit(block_um=500.0)
    np.testing.assert_array_equal(s.assign(spots, PLANES, PATCH_UM, 4), s.assign(spots, PLANES, PATCH_UM, 4))
    assert not np.array_equal(s.assign(spots, PLANES, PATCH_UM, 4), s.assign(spots, PLANES, PATCH_UM, 5))


def test_leave_section_out_and_volumes(spots):
    lab = LeaveSectionOut(test_sections=["b"]).assign(spots, PLANES, PATCH_UM, 0)
    assert set(lab[spots["section_id"] == "b"]) == {"test"}
    assert {"train", "val"} <= set(lab[spots["section_id"] == "a"])
    tr, va = spots[lab == "train"], spots[lab == "val"]
    assert patch_overlap(tr, va, PLANES, PATCH_UM) == 0
    lab = VolumesSplit(test_volumes=["v0"]).assign(spots, PLANES, PATCH_UM, 0)
    assert set(lab[spots["volume_id"] == "v0"]) == {"test"}
    assert {"train", "val", "excluded"} == set(lab[spots["volume_id"] == "v1"])
    with pytest.raises(DataError, match="nothing left to train"):
        VolumesSplit(test_volumes=["v0"], val_volumes=["v1"]).assign(spots, PLANES, PATCH_UM, 0)
    with pytest.raises(DataError, match="unknown section_id"):
        LeaveSectionOut(test_sections=["zz"]).assign(spots, PLANES, PATCH_UM, 0)

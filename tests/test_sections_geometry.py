"""Planes, patch geometry and oblique (tilted-plane) sampling on small synthetic volumes."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from xpression.data.datamodule import PatchDataset
from xpression.data.geometry import DataError, PatchGeometry, Plane, SlabGrid
from xpression.data.patches import read_slab
from xpression.data.volume import open_volume


def test_axial_plane_frame():
    p = Plane.axial(320.0)
    q = Plane.from_points([[320.0, 0.0, 0.0], [320.0, 100.0, 0.0], [320.0, 0.0, 50.0], [320.0, 80.0, 90.0]])
    for a, b in [(p.origin, [320, 0, 0]), (p.n, [1, 0, 0]), (p.v, [0, 1, 0]), (p.u, [0, 0, 1])]:
        np.testing.assert_allclose(a, b)
    for a, b in [(q.origin, p.origin), (q.n, p.n), (q.v, p.v), (q.u, p.u)]:
        np.testing.assert_allclose(a, b, atol=1e-12)
    assert q.is_axial
    np.testing.assert_allclose(p.to_world([[10.0, 20.0]]), [[320.0, 20.0, 10.0]])


def test_tilted_plane_frame():
    rng = np.random.default_rng(0)
    n_true = np.array([0.9, 0.3, -0.2])
    n_true /= np.linalg.norm(n_true)
    basis = np.linalg.svd(n_true[None])[2][1:]
    pts = 200.0 * n_true + rng.normal(size=(5, 2)) @ (100 * basis)
    p = Plane.from_points(pts)
    np.testing.assert_allclose(p.n, n_true, atol=1e-9)
    assert p.n[0] >= 0 and p.v[1] >= 0
    np.testing.assert_allclose(p.axes @ p.axes.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.cross(p.n, p.u) @ p.v, np.sign(np.cross(p.n, p.u) @ p.v))
    uvw = p.to_uvw(pts)
    np.testing.assert_allclose(uvw[:, 2], 0.0, atol=1e-9)
    np.testing.assert_allclose(p.to_world(uvw[:, :2]), pts, atol=1e-9)
    with pytest.raises(DataError, match="collinear"):
        Plane.from_points([[0, 0, 0], [1, 1, 1], [2, 2, 2]])


def test_patch_shape_is_odd_and_paper_sized():
    g = PatchGeometry()
    assert g.shape_vox((1.6, 1.6, 1.6)) == (21, 129, 129)
    assert g.shape_vox((6.4, 6.4, 6.4)) == (5, 33, 33)
    assert all(s % 2 == 1 for s in PatchGeometry((30.0, 100.0, 100.0)).shape_vox((5.0, 5.0, 5.0)))


def _smooth_volume(shape):
    z, y, x = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    return (0.5 + 0.2 * np.sin(z / 5.0) + 0.15 * np.cos(y / 7.0 + x / 9.0) + 0.1 * np.sin(x / 6.0 - z / 8.0)).astype(np.float32)


def test_tilted_patch_matches_rotated_volume(tmp_path):
    vs = 2.0
    arr = _smooth_volume((48, 56, 56))
    np.save(tmp_path / "v.npy", arr)
    vol = open_volume(tmp_path / "v.npy", voxel_size_um=vs)
    centre = np.array([24.0, 28.0, 28.0]) * vs
    rot = Rotation.from_euler("xyz", [20, -15, 10], degrees=True).as_matrix()
    n = rot @ np.array([1.0, 0.0, 0.0])
    plane = Plane.from_points([centre, centre + 50 * rot @ [0, 1, 0], centre + 50 * rot @ [0, 0, 1]])
    np.testing.assert_allclose(abs(plane.n @ n), 1.0, atol=1e-9)
    patch_shape = (7, 15, 15)
    uv = plane.to_uvw(centre[None])[:, :2]
    grid = SlabGrid.around(plane, uv, patch_shape, (vs, vs, vs), margin_um=4.0)
    data = read_slab(vol, grid, transform=None, dtype="float16")
    ds = PatchDataset({"s": (data, grid)}, np.array(["s"]), grid.index_of(uv), np.zeros((1, 1)), patch_shape)
    patch = np.asarray(ds.patch(0)[0], dtype=np.float32)

    # The same patch cut from a volume rotated so that the section is axial.
    hw = grid.index_of(uv)[0]
    p_vox = grid.world([[grid.centre_d, hw[0], hw[1]]])[0] / vs
    m = plane.axes.T  # output axes (z', y', x') -> input (n, v, u)
    out_shape = (15, 25, 25)
    o_c = np.array(out_shape) // 2
    rotated = ndimage.affine_transform(arr, m, offset=p_vox - m @ o_c, output_shape=out_shape, order=1)
    half = np.array(patch_shape) // 2
    ref = rotated[tuple(slice(c - h, c + h + 1) for c, h in zip(o_c, half))]
    assert patch.shape == ref.shape == patch_shape
    assert np.abs(patch - ref).max() < 2e-3  # float16 cache rounding

    # Both equal the analytic field up to trilinear interpolation error.
    idx = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), -1).reshape(-1, 3)
    idx = idx + [grid.centre_d, hw[0], hw[1]]
    world = grid.world(idx) / vs
    z, y, x = world.T
    exact = 0.5 + 0.2 * np.sin(z / 5.0) + 0.15 * np.cos(y / 7.0 + x / 9.0) + 0.1 * np.sin(x / 6.0 - z / 8.0)
    assert np.abs(patch.ravel() - exact).max() < 5e-3


def test_axial_slab_is_exact_block(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, size=(20, 30, 40), dtype=np.uint8)
    np.save(tmp_path / "v.npy", arr)
    vol = open_volume(tmp_path / "v.npy", voxel_size_um=(3.0, 2.0, 2.0))
    plane = Plane.axial(30.0)  # slice 10
    uv = np.array([[40.0, 30.0], [41.2, 29.2]])  # (u, v) = (x, y) um -> voxel (15, 20)
    grid = SlabGrid.around(plane, uv, (5, 7, 9), (3.0, 2.0, 2.0))
    data = read_slab(vol, grid, transform=lambda b: b.astype(np.float32) / 255.0, dtype="uint8")
    ds = PatchDataset({"s": (data, grid)}, np.array(["s", "s"]), grid.index_of(uv), np.zeros((2, 1)), (5, 7, 9))
    for row, (y, x) in enumerate([(15, 20), (15, 21)]):
        np.testing.assert_array_equal(ds.patch(row)[0], arr[8:13, y - 3 : y + 4, x - 4 : x + 5])


def test_resampled_slab_matches_zoom(tmp_path):
    arr = _smooth_volume((24, 40, 40))
    np.save(tmp_path / "v.npy", arr)
    vol = open_volume(tmp_path / "v.npy", voxel_size_um=2.0)
    plane = Plane.axial(24.0)
    uv = np.array([[40.0, 40.0]])
    grid = SlabGrid.around(plane, uv, (3, 9, 9), (4.0, 4.0, 4.0))
    data = read_slab(vol, grid, dtype="float16").astype(np.float32)
    hw = grid.index_of(uv)[0]
    pts = grid.world([[grid.centre_d, hw[0], hw[1]]])[0]
    np.testing.assert_allclose(data[grid.centre_d, hw[0], hw[1]], arr[tuple((pts / 2.0).astype(int))], atol=0.02)


def test_resampled_patches_do_not_depend_on_the_threads(tmp_path):
    """Depth planes sampled on several threads, patches dequantised as one stack: the numbers
    of one thread and of patch-by-patch dequantisation."""
    import torch

    from xpression.data.patches import cut_patch, dequantise, read_patches, slab_grid

    arr = _smooth_volume((24, 40, 40))
    np.save(tmp_path / "v.npy", arr)
    vol = open_volume(tmp_path / "v.npy", voxel_size_um=2.0)
    plane, uv = Plane.axial(24.0), np.array([[30.0, 30.0], [41.0, 47.0], [50.0, 38.0]])
    norm = lambda b: b.astype(np.float32) / float(arr.max())  # noqa: E731
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        grid = slab_grid(plane, vol, uv, (5, 9, 9), (0.7, 0.7, 0.7))
        slab = read_slab(vol, grid, norm, "uint8")
        one = read_patches(vol, plane, uv, (5, 9, 9), (0.7, 0.7, 0.7), norm, "uint8")
        torch.set_num_threads(3)
        np.testing.assert_array_equal(read_slab(vol, grid, norm, "uint8"), slab)
        np.testing.assert_array_equal(read_patches(vol, plane, uv, (5, 9, 9), (0.7, 0.7, 0.7), norm, "uint8"), one)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(one, np.stack([dequantise(cut_patch(slab, grid, h, w, (5, 9, 9))) for h, w in grid.index_of(uv)]))
    stored = read_patches(vol, plane, uv, (5, 9, 9), (0.7, 0.7, 0.7), norm, "uint8", stored=True)
    assert stored.dtype == np.uint8 and stored.max() > 100
    np.testing.assert_array_equal(dequantise(stored), one)

"""Multi-scale input: the context view a training batch carries equals, bit for bit, the view the
off-plane probe and the whole-volume sweep read at the same point; it travels in the checkpoint's
input spec; a multi-scale model builds and trains a step on CPU; bad sizes fail in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xpression.data.context import ContextView
from xpression.data.datamodule import XPressionDataModule
from xpression.data.geometry import DataError, Plane
from xpression.data.input_spec import InputSpec
from xpression.data.manifest import load_manifest
from xpression.data.patches import dequantise, read_patches
from xpression.data.sampling import JitterSampler, SpotSampler
from xpression.data.splits import SpatialBlocksSplit
from xpression.data.volume import open_volume
from xpression.inference.predictor import Predictor
from xpression.models import XPressionModule

CONTEXT_UM = (100.0, 600.0, 600.0)  # around the tiny cohort's default 34 x 205 x 205 um patch
FINE = {"cnn3d": {"name": "cnn3d"},
        "resnet3d_valid": {"name": "resnet3d", "arch": "mc3", "widths": [8, 16], "layers": [1, 1],
                           "strides": [[1, 1, 1], [1, 2, 2]], "stem_kernel": [1, 5, 5], "stem_stride": [1, 2, 2],
                           "padding": "valid"}}


def _datamodule(cohort, sampler=SpotSampler, context_um=CONTEXT_UM, **kw):
    return XPressionDataModule(cohort, sampler=sampler(context_um=context_um, **kw), split=SpatialBlocksSplit(block_um=300.0),
                               batch_size=8, check_tissue_mask=False)


def sweep_context(spec: InputSpec, volume, centre_um) -> np.ndarray:
    """The context view the sweep feeds the model at the model-voxel point nearest ``centre_um``:
    every ``stride``-th voxel of ``InputSpec.prepare_context``'s volume around it."""
    view, normalize = spec.prepare_context(volume)
    context = spec.context
    idx = (np.asarray(centre_um) - np.asarray(view.origin_um)) / np.asarray(view.voxel_size_um)
    np.testing.assert_allclose(idx, np.rint(idx), atol=1e-6)
    half = np.asarray(context.span_shape) // 2
    start = np.rint(idx).astype(int) - half
    block = view.read_block(start, start + 2 * half + 1, fill=0)
    kd, kh, kw = context.stride
    return normalize(block[::kd, ::kh, ::kw])


def test_context_view_geometry_and_bad_sizes():
    view = ContextView.of((172.8, 600.0, 600.0), (57.6, 205.0, 205.0), (9, 33, 33), (6.4, 6.4, 6.4))
    assert view.stride == (3, 3, 3)
    assert view.span_shape == (25, 97, 97)
    np.testing.assert_allclose(view.step_um, (19.2, 19.2, 19.2))
    np.testing.assert_allclose(view.extent_um, (172.8, 633.6, 633.6))
    with pytest.raises(ValueError, match=r"patch.context_um \[34.0, 600.0, 100.0\] um is smaller than the patch .* along x"):
        ContextView.of((34.0, 600.0, 100.0), (34.0, 205.0, 205.0), (5, 33, 33), (6.4, 6.4, 6.4))
    with pytest.raises(ValueError, match="must be 3 positive numbers"):
        ContextView.of((600.0, 600.0), (34.0, 205.0, 205.0), (5, 33, 33), (6.4, 6.4, 6.4))


@pytest.mark.parametrize("sampler", ["spot", "jitter"])
@pytest.mark.parametrize("voxels", [None, (12.8, 12.8, 12.8)], ids=["native", "coarser"])
def test_training_context_view_equals_the_probe_and_sweep_view(tiny_cohort, sampler, voxels):
    cls, kw = (JitterSampler, {"fraction": 1.0}) if sampler == "jitter" else (SpotSampler, {})
    dm = _datamodule(tiny_cohort, cls, voxel_size_um=voxels, **kw)
    dm.setup("fit")
    spec, context, ds = dm.input_spec(), dm.context, dm._datasets["all"]
    assert spec.context == context and context.stride[1] > 1
    cohort = load_manifest(tiny_cohort)
    rows = np.random.default_rng(0).choice(len(dm.spots), size=5, replace=False)
    for row in rows:
        grid = ds.slabs[ds.section[row]][1]
        entry = cohort.volume(dm.spots["volume_id"].iloc[row])
        volume = open_volume(entry.image, entry.voxel_size_um)
        norm = dm.normalizers[entry.id]
        for du, dv in ((0.0, 0.0), (2 * grid.spacing_um[2], -grid.spacing_um[1])):  # the jitter sampler's shifted items
            views, _ = ds.patch((int(row), du, dv))
            assert views.shape == (2, *dm.patch_shape_vox)
            h, w = ds.centre_hw[row] + np.rint([dv / grid.spacing_um[1], du / grid.spacing_um[2]]).astype(int)
            centre = grid.world(np.array([[grid.centre_d, h, w]], float))[0]
            trained = dequantise(np.asarray(views[1]))
            np.testing.assert_array_equal(trained, sweep_context(spec, volume, centre))
            plane, uv = Plane.axial(centre[0]), centre[None, [2, 1]]
            np.testing.assert_array_equal(trained, context.read(volume, plane, uv, norm, dm.cache_dtype)[0])
            # channel 0 is still the plain patch, as the probe reads it
            fine = read_patches(volume, plane, uv, dm.patch_shape_vox, dm.voxel_size_um, norm, dm.cache_dtype)[0]
            np.testing.assert_array_equal(dequantise(np.asarray(views[0])), fine)
            assert trained.std() > 0 and not np.array_equal(trained, fine)  # a real, different view


def test_context_view_travels_in_the_input_spec(tiny_cohort):
    dm = _datamodule(tiny_cohort)
    spec = dm.input_spec()
    d = spec.to_dict()
    assert d["version"] == 3 and d["context_um"] == list(CONTEXT_UM) and d["context"]["stride"] == list(spec.context.stride)
    assert d["context_edges"] == "mirror" and spec.context.edges == "mirror"
    back = InputSpec.from_dict(d)
    assert back.context_um == CONTEXT_UM and back.context == spec.context and back.views == 2
    # a spec written before context_edges existed (version 2) read its views with the fill
    old = {k: v for k, v in d.items() if k != "context_edges"} | {"version": 2}
    assert InputSpec.from_dict(old).context.edges == "fill"
    fill = _datamodule(tiny_cohort, context_edges="fill").input_spec().to_dict()
    assert fill["version"] == 2 and fill["context_edges"] == "fill"
    plain = XPressionDataModule(tiny_cohort, split=SpatialBlocksSplit(block_um=300.0), check_tissue_mask=False).input_spec()
    assert plain.version == 1 and "context_um" not in plain.to_dict() and plain.context is None
    with pytest.raises(DataError, match="context_um .* is smaller than the patch"):
        InputSpec.from_dict({**d, "context_um": [10.0, 10.0, 10.0]}, where="model.ckpt")


def test_bad_context_size_fails_before_any_voxel_is_read(tiny_cohort, monkeypatch):
    def no_reads(*a, **k):
        raise AssertionError("a voxel was read")

    monkeypatch.setattr("xpression.data.datamodule.read_slab", no_reads)
    with pytest.raises(DataError, match=r"^patch.context_um \[34.0, 100.0, 600.0\] um is smaller than the patch .* along y; ") as err:
        _datamodule(tiny_cohort, context_um=(34.0, 100.0, 600.0)).input_spec()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fine", sorted(FINE))
def test_multiscale_model_trains_a_step_and_predicts_like_the_predictor(tiny_cohort, fine):
    torch.manual_seed(0)
    dm = _datamodule(tiny_cohort)
    dm.setup("fit")
    spec = dm.input_spec()
    module = XPressionModule({"name": "multiscale", "fine": FINE[fine]}, dm.target_spec, dm.patch_shape_vox, input_spec=spec)
    backbone = module.net.backbone
    assert backbone.num_features == backbone.fine.num_features + backbone.context.num_features
    assert module.checkpoint_spec()["context_um"] == list(CONTEXT_UM)
    batch = dm.apply_augment(next(iter(dm.train_dataloader())))
    assert batch["image"].shape == (8, 2, *dm.patch_shape_vox)
    before = [p.detach().clone() for p in (backbone.fine.parameters(), backbone.context.parameters()) for p in p]
    opt = torch.optim.SGD(module.net.parameters(), lr=0.1)
    loss = module.loss_fn(module.net.forward_raw(batch["image"]), batch["target"])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    after = [p.detach() for p in (backbone.fine.parameters(), backbone.context.parameters()) for p in p]
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) >= 2  # both encoders learn
    module.eval()
    x = batch["image"][:4]
    np.testing.assert_allclose(Predictor(module, device="cpu", precision="fp32", channels_last=False).predict_patches(x.numpy()),
                               module(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_views_must_match_the_model(tiny_cohort):
    spec = _datamodule(tiny_cohort).input_spec()
    targets = spec.target_spec
    with pytest.raises(ValueError, match="takes the patch only; use a multi-scale model"):
        XPressionModule({"name": "cnn3d"}, targets, spec.patch_shape_vox, input_spec=spec)
    plain = XPressionDataModule(tiny_cohort, split=SpatialBlocksSplit(block_um=300.0), check_tissue_mask=False).input_spec()
    with pytest.raises(ValueError, match="patch.context_um is null; set it"):
        XPressionModule({"name": "multiscale", "fine": {"name": "cnn3d"}}, targets, plain.patch_shape_vox, input_spec=plain)
    with pytest.raises(ValueError, match="'fine' needs the 'name' of a single-view backbone"):
        XPressionModule({"name": "multiscale", "fine": {"name": "multiscale"}}, targets, spec.patch_shape_vox)


def test_sweep_feeds_a_multiscale_model_the_training_views(tiny_cohort):
    """Patch-mode sweep with a ContextSource: at a training spot's grid point the map holds the
    model's answer on that spot's training views; elsewhere its answer on the probe's views."""
    from xpression.inference.grid import OutputGrid
    from xpression.inference.sweep import ContextSource, sweep

    torch.manual_seed(0)
    dm = _datamodule(tiny_cohort)
    dm.setup("fit")
    spec, ds = dm.input_spec(), dm._datasets["all"]
    module = XPressionModule({"name": "multiscale", "fine": FINE["cnn3d"]}, dm.target_spec, dm.patch_shape_vox, input_spec=spec).eval()
    row = int(np.flatnonzero(dm.spots["volume_id"].to_numpy() == dm.spots["volume_id"].iloc[0])[len(dm.spots) // 4])
    entry = load_manifest(tiny_cohort).volume(dm.spots["volume_id"].iloc[row])
    volume = open_volume(entry.image, entry.voxel_size_um)
    grid_s = ds.slabs[ds.section[row]][1]
    centre_um = grid_s.world(np.array([[grid_s.centre_d, *ds.centre_hw[row]]], float))[0]
    centre = np.rint((centre_um - np.asarray(volume.origin_um)) / np.asarray(volume.voxel_size_um)).astype(int)
    step = np.array([1, 3, 3])
    grid = OutputGrid(tuple(centre - step), tuple(step), (3, 3, 3), tuple(volume.voxel_size_um), tuple(volume.origin_um))
    view, normalize = spec.prepare(volume)
    out = sweep(view, module, grid, mode="patch", tile_shape=(1, 2, 2), batch_size=5, normalize=normalize,
                context=ContextSource(*spec.prepare_context(volume), spec.context))
    assert np.isfinite(out).all()
    trained = dequantise(np.asarray(ds.patch(row)[0]))[None]
    np.testing.assert_allclose(out[:, 1, 1, 1], module(torch.from_numpy(trained)).detach().numpy()[0], rtol=1e-5, atol=1e-6)
    corner_um = np.asarray(volume.origin_um) + (centre - step) * np.asarray(volume.voxel_size_um)
    plane, uv = Plane.axial(corner_um[0]), corner_um[None, [2, 1]]
    norm = dm.normalizers[entry.id]
    probe = np.stack([read_patches(volume, plane, uv, dm.patch_shape_vox, dm.voxel_size_um, norm, dm.cache_dtype),
                      dm.context.read(volume, plane, uv, norm, dm.cache_dtype)], axis=1)
    np.testing.assert_allclose(out[:, 0, 0, 0], module(torch.from_numpy(probe)).detach().numpy()[0], rtol=1e-5, atol=1e-6)
    assert np.abs(out[:, 0, 0, 0] - out[:, 1, 1, 1]).max() > 1e-4  # different points, different answers


@pytest.mark.parametrize("overrides, context", [
    (["model=cnn3d"], None),
    (["model=multiscale_cnn3d"], [102.0, 615.0, 615.0]),  # 3 x the default 34 x 205 x 205 um patch
    (["model=multiscale_resnet3d_valid", "patch.size_um=[57.6,205,205]"], [172.8, 615.0, 615.0]),
    (["model=multiscale_cnn3d", "patch.context_um=[172.8,600,600]"], [172.8, 600.0, 600.0]),  # set: it wins
    (["model=multiscale_cnn3d", "sampler.patch_size_um=[57.6,205,205]"], [172.8, 615.0, 615.0]),
])
def test_a_multiscale_model_brings_a_context_view_three_times_the_patch(overrides, context):
    from xpression.config import compose, sync_patch

    cfg = compose("train", overrides)
    sync_patch(cfg)
    if context is None:
        assert cfg.patch.context_um is None and cfg.sampler.context_um is None
    else:
        np.testing.assert_allclose(list(cfg.patch.context_um), context)
        np.testing.assert_allclose(list(cfg.sampler.context_um), context)


class _ArrayVolume:
    """A numpy array as a volume (``read_block`` with the fill past its faces)."""

    def __init__(self, array: np.ndarray, voxel_size_um=(6.4, 6.4, 6.4), origin_um=(0.0, 0.0, 0.0)):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.voxel_size_um, self.origin_um = tuple(voxel_size_um), tuple(origin_um)

    def read_block(self, start, stop, fill=0, out=None):
        start, stop = np.asarray(start, int), np.asarray(stop, int)
        block = np.full(tuple(stop - start), fill, self.array.dtype)
        lo, hi = np.maximum(start, 0), np.minimum(stop, self.shape)
        if np.all(hi > lo):
            block[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = self.array[tuple(slice(a, b) for a, b in zip(lo, hi))]
        return block


def test_mirrored_volume_reads_numpys_symmetric_padding():
    from xpression.data.context import MirroredVolume

    array = np.random.default_rng(0).integers(0, 255, (7, 9, 11), dtype=np.uint8)
    padded = np.pad(array, 20, mode="symmetric")
    mirrored = MirroredVolume(_ArrayVolume(array))
    for start, stop in [((0, 0, 0), (7, 9, 11)), ((-3, 2, -1), (4, 12, 5)), ((-20, -20, -20), (27, 29, 31)), ((9, 10, 12), (15, 12, 14))]:
        expected = padded[tuple(slice(a + 20, b + 20) for a, b in zip(start, stop))]
        np.testing.assert_array_equal(mirrored.read_block(start, stop), expected)
    assert mirrored.shape == array.shape and mirrored.voxel_size_um == (6.4, 6.4, 6.4)


def test_a_mirror_view_at_a_face_reads_the_volume_reflected_there():
    """A context view reaching past the z face: with edges=mirror it equals the view of the same
    point in a copy of the volume padded by reflection (training, probe and sweep read it the
    same way); with edges=fill it sees the fill there instead."""
    rng = np.random.default_rng(1)
    array = rng.integers(20, 235, (30, 60, 60), dtype=np.uint8)
    pad, vs = 40, 6.4
    reflected = _ArrayVolume(np.pad(array, pad, mode="symmetric"), origin_um=(-pad * vs,) * 3)
    centre = np.array([2, 10, 50])  # two voxels below the top face, near a side
    plane, uv = Plane.axial(centre[0] * vs), np.array([[centre[2] * vs, centre[1] * vs]])
    views = {}
    for edges in ("mirror", "fill"):
        view = ContextView.of((96.0, 288.0, 288.0), (32.0, 96.0, 96.0), (5, 15, 15), (vs, vs, vs), edges=edges)
        assert view.stride == (3, 3, 3)
        views[edges] = view.read(_ArrayVolume(array), plane, uv, None, "float32")[0]
    padded_view = ContextView.of((96.0, 288.0, 288.0), (32.0, 96.0, 96.0), (5, 15, 15), (vs, vs, vs), edges="fill")
    np.testing.assert_allclose(views["mirror"], padded_view.read(reflected, plane, uv, None, "float32")[0], atol=1e-4)
    assert np.abs(views["mirror"][:2] - views["fill"][:2]).max() > 10  # the two layers above the face differ


def test_a_bad_context_edges_is_one_line_before_anything_is_read():
    from xpression.config import ConfigError, check_train_config, compose

    with pytest.raises(ConfigError) as err:
        check_train_config(compose("train", ["patch.context_edges=reflect", "data.manifest=unused"]))
    assert err.value.problems == ["patch.context_edges: must be one of 'mirror', 'fill', got 'reflect'"]
    with pytest.raises(ValueError, match="patch.context_edges must be one of mirror, fill, got 'reflect'"):
        ContextView.of((96.0, 288.0, 288.0), (32.0, 96.0, 96.0), (5, 15, 15), (6.4, 6.4, 6.4), edges="reflect")

"""Backbones: registry, shapes, gradients, dense equivalence, construction-time errors."""

import numpy as np
import pytest
import torch

from xpression.models import XPressionNet, build_net, create_backbone, list_backbones
from xpression.models.targets import TargetSpec

torch.set_num_threads(1)
COMP = TargetSpec(names=["alveolar", "airway", "vascular", "immune"], kind="composition")
PATCH = (5, 33, 33)  # the data module's default: odd, spot at the centre voxel

CASES = [
    ({"name": "cnn3d"}, PATCH),
    ({"name": "cnn3d_paper"}, (8, 32, 32)),  # the published layers on a reduced input
    ({"name": "timm", "model_name": "resnet18"}, PATCH),
    ({"name": "timm", "model_name": "convnext_atto"}, PATCH),
    ({"name": "timm", "model_name": "vit_tiny_patch16_224", "fit": "resize"}, PATCH),
    ({"name": "timm", "model_name": "vit_tiny_patch16_224", "model_kwargs": {"patch_size": 11}},
     PATCH),
    ({"name": "unet", "encoder": "resnet18"}, PATCH),
]


def test_registry_lists_and_rejects_unknown():
    assert {"cnn3d", "cnn3d_paper", "timm", "unet", "resnet3d", "vit3d"} <= set(list_backbones())
    with pytest.raises(ValueError, match="valid names: .*cnn3d.*unet"):
        create_backbone("resnet9000", patch_shape=PATCH)


@pytest.mark.parametrize("cfg,patch", CASES, ids=lambda c: str(c.get("model_name", c.get("name")))
                         if isinstance(c, dict) else "")
def test_forward_backward_shapes(cfg, patch):
    torch.manual_seed(0)
    net = build_net(cfg, COMP, patch, spot_radius_vox=4.3)
    assert isinstance(net, XPressionNet)
    x = torch.rand(3, 1, *patch)
    f = net.forward_features(x)
    assert f.shape == (3, net.backbone.num_features)
    raw = net.forward_head(f)
    pred = net(x)
    assert raw.shape == pred.shape == (3, len(COMP.names))
    torch.testing.assert_close(pred.sum(1), torch.ones(3))
    assert (pred >= 0).all()
    raw.pow(2).mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads[:2])  # reaches the first layers


def test_heads_by_kind():
    x = torch.rand(4, 1, *PATCH)
    for kind, check in [("log_expression", lambda p, r: torch.equal(p, r)),
                        ("counts", lambda p, r: bool((p > 0).all()))]:
        net = build_net({"name": "cnn3d"}, TargetSpec(names=["g1", "g2"], kind=kind), PATCH).eval()
        r = net.forward_raw(x)
        assert check(net(x), r)


def test_cnn3d_dense_equivalent():
    torch.manual_seed(0)
    net = build_net({"name": "cnn3d", "dropout": 0.3}, COMP, PATCH).eval()
    assert net.dense_equivalent and net.patch_shape == PATCH
    sz, sy, sx = net.output_stride
    assert net.backbone.used_shape == PATCH  # the receptive field is the whole patch
    x = torch.rand(2, 1, 7, 47, 46)
    dense = net.dense_forward(x)
    d, h, w = dense.shape[2:]
    assert dense.shape[:2] == (2, len(COMP.names))
    assert (d, h, w) == ((7 - 5) // sz + 1, (47 - 33) // sy + 1, (46 - 33) // sx + 1) == (3, 4, 4)
    crops, ref = [], []
    for k in range(d):
        for i in range(h):
            for j in range(w):
                crops.append(x[:, :, k * sz:k * sz + 5, i * sy:i * sy + 33, j * sx:j * sx + 33])
                ref.append(dense[:, :, k, i, j])
    per_patch = net(torch.cat(crops))
    torch.testing.assert_close(per_patch, torch.cat(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cfg,patch,shape", [
    ({}, PATCH, (7, 70, 61)),  # the Dense layer takes the stride in y and x, z falls back to it
    ({"widths": [4, 4, 4, 4], "kernel_size": [[3, 5, 5]] * 3 + [[1, 5, 5]],
      "pool": [[1, 2, 2], [2, 2, 2], [1, 2, 2]]}, (11, 69, 69), (14, 130, 109)),  # last conv does
])
def test_cnn3d_dense_step_computes_only_kept_outputs(cfg, patch, shape):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    bb = create_backbone("cnn3d", patch_shape=patch, **cfg).eval()
    x = torch.rand(2, 1, *shape)
    with torch.no_grad():
        with FlopCounterMode(display=False) as full_count:
            full = bb.dense_features(x)
        for step in [(1, 2, 2), (2, 3, 1), (1, 1, 5)]:
            with FlopCounterMode(display=False) as count:
                part = bb.dense_features(x, step=step)
            ref = full[:, :, :: step[0], :: step[1], :: step[2]]
            assert part.shape == ref.shape
            torch.testing.assert_close(part, ref, atol=1e-5, rtol=0)
            assert count.get_total_flops() < full_count.get_total_flops()
    with pytest.raises(ValueError, match="step must be >= 1"):
        bb.dense_features(x, step=(1, 0, 1))


def test_paper_preset_not_dense_equivalent():
    net = build_net({"name": "cnn3d_paper"}, COMP, (8, 32, 32)).eval()
    assert not net.dense_equivalent
    assert net.output_stride == (8, 8, 8)
    bb = net.backbone
    assert [m.out_channels for m in bb.trunk if isinstance(m, torch.nn.Conv3d)] == [32, 64, 128, 256]
    assert all(m.kernel_size == (3, 9, 9) for m in bb.trunk if isinstance(m, torch.nn.Conv3d))
    assert bb.num_features == 64 and bb.drop.p == 0.3
    x = torch.rand(1, 1, 8, 40, 40)
    dense = net.dense_forward(x)
    assert dense.shape == (1, 4, 1, 2, 2)
    # a same-padded patch sees zeros at its border, the dense run sees its neighbours
    assert not torch.allclose(dense[:, :, 0, 0, 0], net(x[:, :, :, :32, :32]), atol=1e-6)


def test_paper_preset_full_size_builds():
    bb = create_backbone("cnn3d_paper", patch_shape=(21, 129, 129))
    assert bb.feature_shape == (2, 16, 16)
    assert bb.dense.in_features == 256 * 2 * 16 * 16


@pytest.mark.parametrize("cfg,patch,match", [
    ({"name": "cnn3d"}, (3, 32, 32), "too small for cnn3d"),
    ({"name": "cnn3d"}, (5, 12, 12), "too small for cnn3d"),
    ({"name": "cnn3d_paper"}, (4, 128, 128), "too small for cnn3d"),
    ({"name": "timm", "model_name": "convnext_atto"}, (5, 8, 8), "does not fit"),
    ({"name": "timm", "model_name": "vit_tiny_patch16_224"}, (5, 30, 30), "divisible by 16"),
    ({"name": "unet"}, (5, 6, 6), "spot disk"),
    ({"name": "unet"}, (5, 16, 16), None),  # fits: only checks the build succeeds
])
def test_bad_patch_fails_at_construction(cfg, patch, match):
    if match is None:
        build_net(cfg, COMP, patch, spot_radius_vox=3.0)
        return
    with pytest.raises(ValueError, match=match):
        build_net(cfg, COMP, patch, spot_radius_vox=4.3)


@pytest.mark.parametrize("fit,hw,size", [("pad", 30, 32), ("resize", 30, 32), ("pad", 33, 48),
                                         ("resize", 33, 32)])
def test_vit_pad_and_resize(fit, hw, size):
    net = build_net({"name": "timm", "model_name": "vit_tiny_patch16_224", "fit": fit},
                    COMP, (5, hw, hw))
    assert net.backbone.input_size == (size, size)
    assert net(torch.rand(2, 1, 5, hw, hw)).shape == (2, 4)


def test_timm_local_weights(tmp_path):
    import timm

    src = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    bb = create_backbone("timm", patch_shape=PATCH, model_name="resnet18", weights=str(path))
    torch.testing.assert_close(bb.model.layer4[0].conv1.weight, src.layer4[0].conv1.weight)
    assert bb.model.conv1.weight.shape[1] == PATCH[0]
    with pytest.raises(FileNotFoundError):
        create_backbone("timm", patch_shape=PATCH, model_name="resnet18",
                        weights=str(tmp_path / "missing.pth"))


def test_unet_dense_map_and_disk():
    torch.manual_seed(0)
    net = build_net({"name": "unet"}, COMP, PATCH, spot_radius_vox=4.3).eval()
    x = torch.rand(2, 1, *PATCH)
    fmap = net.dense_forward(x, raw=True)
    assert fmap.shape == (2, 4, 33, 33)
    disk = net.backbone.disk
    yy, xx = np.mgrid[:33, :33] - 16.0  # voxel centres relative to the patch's centre voxel
    assert disk.numpy().tolist() == (yy ** 2 + xx ** 2 <= 4.3 ** 2).tolist()
    # the spot output is the map averaged over the disk (the head is linear)
    torch.testing.assert_close(net.forward_raw(x), fmap[:, :, disk].mean(-1), atol=1e-5, rtol=1e-5)
    plane = net.dense_forward(torch.rand(1, 1, 5, 64, 96))
    assert plane.shape == (1, 4, 64, 96)
    torch.testing.assert_close(plane.sum(1), torch.ones(1, 64, 96))
    avg = net.dense_forward(x, raw=True, spot_average=True)
    assert avg.shape == fmap.shape
    # every pixel of the averaged map is the disk mean around it: the spot output at the centre ...
    torch.testing.assert_close(avg[:, :, 16, 16], net.forward_raw(x), atol=1e-5, rtol=1e-5)
    # ... and the disk shifted anywhere it fits inside the patch
    shifted = torch.roll(disk, shifts=(-6, 5), dims=(0, 1))  # centred on (10, 21)
    torch.testing.assert_close(avg[:, :, 10, 21], fmap[:, :, shifted].mean(-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="spot_radius_vox"):
        create_backbone("unet", patch_shape=PATCH)


def test_timm_has_no_dense_mode():
    net = build_net({"name": "timm", "model_name": "resnet18"}, COMP, PATCH)
    assert not net.dense_equivalent
    with pytest.raises(NotImplementedError):
        net.dense_forward(torch.rand(1, 1, 5, 64, 64))


def test_cnn3d_warns_when_patch_not_fully_read(caplog):
    with caplog.at_level("WARNING", logger="xpression.models.backbones.cnn3d"):
        bb = create_backbone("cnn3d", patch_shape=(5, 32, 32))
    assert bb.used_shape == (5, 29, 29)
    assert "reads only" in caplog.text

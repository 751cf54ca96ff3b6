"""True 3D backbones: torchvision's video ResNets (resnet3d) and the 3D ViT (vit3d)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from xpression.config import compose

from xpression.models import XPressionModule, build_net, create_backbone
from xpression.models.targets import TargetSpec

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[1] / "conf"
SPEC = TargetSpec(names=["alveolar", "airway", "vascular"], kind="composition")
# Narrow versions of the shipped configs: the same layout, small enough for a CPU test.
SMALL = {
    "r3d_18": {"widths": [8, 8, 16, 16]},
    "mc3_18": {"widths": [8, 8, 16, 16]},
    "r2plus1d_18": {"widths": [8, 8, 16, 16]},
    "resnet3d_valid": {"widths": [8, 16]},
    "vit3d_tiny": {"embed_dim": 48, "depth": 2},
}
DEPTHS = (5, 9, 21)


def module_from_config(name: str, patch: tuple[int, int, int], **backbone) -> XPressionModule:
    """The shipped conf/model/<name>.yaml, instantiated as train.py does, with backbone overrides."""
    cfg = compose("train", [f"model={name}", "loss=auto"])
    OmegaConf.set_struct(cfg, False)
    cfg.loss = None
    cfg.model.backbone = OmegaConf.merge(cfg.model.backbone, backbone)
    return instantiate(cfg.model)(target_spec=SPEC, patch_shape=list(patch), spot_radius_vox=4.3)


def stem_weight(net) -> torch.Tensor:
    bb = net.backbone
    return bb.patch_embed.proj.weight if hasattr(bb, "patch_embed") else bb.stem[0].weight


@pytest.mark.parametrize("name", sorted(SMALL))
def test_config_builds_and_trains_one_step(name):
    torch.manual_seed(0)
    module = module_from_config(name, (5, 33, 33), **SMALL[name])
    net = module.net.train()
    x = torch.rand(4, 1, 5, 33, 33)
    y = torch.softmax(torch.randn(4, 3), 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    first = stem_weight(net).detach().clone()
    loss = module.loss_fn(net.forward_raw(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    grad = stem_weight(net).grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(stem_weight(net), first)
    assert torch.isfinite(module.loss_fn(net.forward_raw(x), y))


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_output_shapes_for_5_to_21_slices(name, depth):
    patch = (depth, 33, 33)
    net = module_from_config(name, patch, **SMALL[name]).net.eval()
    x = torch.rand(2, 1, *patch)
    with torch.no_grad():
        f, pred = net.forward_features(x), net(x)
    assert f.shape == (2, net.backbone.num_features)
    assert pred.shape == (2, 3)
    torch.testing.assert_close(pred.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="expected a patch"):
        net.forward_features(torch.rand(1, 1, depth, 33, 31))


def test_resnet3d_keeps_the_patch_depth_by_default():
    """Depth is never strided, so even 5 slices keep 5 feature planes (a video stride would not)."""
    for depth in DEPTHS:
        bb = create_backbone("resnet3d", patch_shape=(depth, 33, 33), widths=[4, 4, 4, 4])
        assert bb.feature_shape == (depth, 3, 3)
    bb = create_backbone("resnet3d", patch_shape=(21, 33, 33), arch="r2plus1d", widths=[4, 4, 4, 4],
                         strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]], stem_stride=[1, 1, 1])
    assert bb.feature_shape == (6, 5, 5)  # 21 -> 11 -> 6 in depth, 33 -> 17 -> 9 -> 5 in-plane
    assert bb.layer2[0].conv1[0][3].stride == (2, 1, 1) and bb.layer2[0].conv1[0][0].stride == (1, 2, 2)


TORCHVISION = {"r3d": "r3d_18", "mc3": "mc3_18", "r2plus1d": "r2plus1d_18"}


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test."""
    import urllib.request

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("arch", sorted(TORCHVISION))
def test_resnet3d_loads_a_local_torchvision_checkpoint(arch, tmp_path, no_network, caplog):
    import torchvision.models.video as tvv

    torch.manual_seed(1)
    src = getattr(tvv, TORCHVISION[arch])(weights=None)
    for m in src.modules():  # non-trivial BN statistics, as a trained checkpoint has
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / f"{arch}.pth"
    torch.save(src.state_dict(), path)
    with caplog.at_level("WARNING"):
        bb = create_backbone("resnet3d", patch_shape=(5, 33, 33), arch=arch, weights=str(path))
    assert "not used" not in caplog.text  # every tensor but the classifier found its place
    ref = src.state_dict()
    ours = bb.state_dict()
    assert set(ours) == set(ref) - {"fc.weight", "fc.bias"}
    for k in ours:
        if k != "stem.0.weight":
            assert torch.equal(ours[k], ref[k]), k
    torch.testing.assert_close(ours["stem.0.weight"], ref["stem.0.weight"].sum(1, keepdim=True))
    # A grey input (R = G = B) gives the same stem response as the RGB network's
    x = torch.rand(1, 1, 5, 33, 33)
    with torch.no_grad():
        torch.testing.assert_close(bb.stem[0](x), src.stem[0](x.expand(-1, 3, -1, -1, -1)), atol=1e-4, rtol=1e-4)


def test_resnet3d_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_backbone("resnet3d", patch_shape=(5, 33, 33), weights=str(tmp_path / "missing.pth"))
    small = create_backbone("resnet3d", patch_shape=(5, 33, 33), widths=[8, 8, 16, 16])
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match=r"small.pth: layer4.0.conv1.0.weight has shape \(16, 16, 3, 3, 3\) but .*widths \[8, 8, 16, 32\] needs \(32, 16, 3, 3, 3\)"):
        create_backbone("resnet3d", patch_shape=(5, 33, 33), widths=[8, 8, 16, 32], weights=str(tmp_path / "small.pth"))
    # its own checkpoint (Lightning-style nesting) loads back exactly
    torch.save({"state_dict": small.state_dict()}, tmp_path / "nested.pth")
    again = create_backbone("resnet3d", patch_shape=(5, 33, 33), widths=[8, 8, 16, 16],
                            weights=str(tmp_path / "nested.pth"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), small.state_dict().values()))


def test_vit3d_loads_its_own_and_a_timm_vit_checkpoint(tmp_path, no_network):
    import timm
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    own = create_backbone("vit3d", patch_shape=(9, 33, 33), embed_dim=48, depth=2).eval()
    torch.save(own.state_dict(), tmp_path / "own.pth")
    again = create_backbone("vit3d", patch_shape=(9, 33, 33), embed_dim=48, depth=2,
                            weights=str(tmp_path / "own.pth")).eval()
    x = torch.rand(2, 1, 9, 33, 33)
    with torch.no_grad():
        torch.testing.assert_close(again(x), own(x), atol=0, rtol=0)

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "vit_tiny.pth")
    # tokens 5 x 16 x 16 on a 10 x 32 x 32 patch: 2 x 2 x 2 tokens, no in-plane resampling
    bb = create_backbone("vit3d", patch_shape=(10, 32, 32), token_size=[5, 16, 16], depth=3,
                         weights=str(tmp_path / "vit_tiny.pth")).eval()
    assert torch.equal(bb.blocks[2].mlp.fc1.weight, src.blocks[2].mlp.fc1.weight)
    assert torch.equal(bb.norm.weight, src.norm.weight)
    torch.testing.assert_close(bb.cls_token, src.cls_token + src.pos_embed[:, :1])
    # a depth-constant grey patch embeds as the 2D network embeds the grey image (R = G = B)
    img = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        tokens3d = bb.patch_embed(img[:, :, None].expand(-1, -1, 10, -1, -1))  # (1, 8, C): z, y, x
        tokens2d = src.patch_embed.proj(img.expand(-1, 3, -1, -1)).flatten(2).transpose(1, 2)  # y, x
    torch.testing.assert_close(tokens3d[:, :4], tokens2d, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tokens3d[:, 4:], tokens2d, atol=1e-4, rtol=1e-4)
    pos2d = resample_abs_pos_embed(src.pos_embed[:, 1:], [2, 2], [14, 14], num_prefix_tokens=0)
    torch.testing.assert_close(bb.pos_embed, pos2d.repeat(1, 2, 1))
    with pytest.raises(ValueError, match="another architecture or width"):
        create_backbone("vit3d", patch_shape=(5, 33, 33), embed_dim=96, depth=1,
                        weights=str(tmp_path / "vit_tiny.pth"))


def test_vit3d_tokens_and_position_embedding():
    from xpression.models.backbones.vit3d import sincos_3d, token_grid

    assert token_grid((5, 33, 33), [None, 8, 8], "pad") == ((5, 8, 8), (1, 5, 5))
    assert token_grid((9, 33, 33), [None, 8, 8], "pad") == ((5, 8, 8), (2, 5, 5))
    assert token_grid((21, 33, 33), [None, 8, 8], "pad") == ((7, 8, 8), (3, 5, 5))
    with pytest.raises(ValueError, match="whole number of"):
        create_backbone("vit3d", patch_shape=(5, 33, 33), fit="error", depth=1)
    pe = sincos_3d((2, 3, 4), 12)
    assert pe.shape == (24, 12)
    # token (z, y, x) = (1, 2, 3) is row 1*12 + 2*4 + 3; the lowest frequency (1) of each axis
    row = pe[1 * 12 + 2 * 4 + 3]
    torch.testing.assert_close(row[[0, 2, 4, 6, 8, 10]], torch.tensor([np.sin(1), np.cos(1), np.sin(2),
                                                                        np.cos(2), np.sin(3), np.cos(3)]).float())
    with pytest.raises(ValueError, match="divisible by 6"):
        create_backbone("vit3d", patch_shape=(5, 33, 33), embed_dim=64, num_heads=2, pos_embed="sincos")
    bb = create_backbone("vit3d", patch_shape=(5, 33, 33), embed_dim=48, depth=1, pos_embed="sincos", pool="mean")
    assert "pos_embed" not in bb.state_dict() and bb.cls_token is None
    # the zero padding is centred: a patch and its mirror image give mirrored padded inputs
    assert bb.input_shape == (5, 40, 40)


def randomize_batchnorm(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


@pytest.mark.parametrize("depth", DEPTHS)
def test_resnet3d_valid_dense_equals_patch(depth):
    torch.manual_seed(0)
    patch = (depth, 33, 33)
    net = module_from_config("resnet3d_valid", patch, **SMALL["resnet3d_valid"]).net
    randomize_batchnorm(net)
    net.eval()
    bb = net.backbone
    assert net.dense_equivalent and net.output_stride == (1, 4, 4)
    assert bb.used_shape == patch  # the receptive field is the whole patch, centred
    assert [b.crop for stage in bb.stages() for b in stage] == [(2, 2, 2), (0, 3, 3)]
    x = torch.rand(2, 1, depth + 2, 46, 42)
    with torch.no_grad():
        dense = net.dense_forward(x)
        assert dense.shape == (2, 3, 3, 4, 3)  # (L - P) // stride + 1 per axis
        crops, ref = [], []
        for k in range(3):
            for i in range(4):
                for j in range(3):
                    crops.append(x[:, :, k:k + depth, 4 * i:4 * i + 33, 4 * j:4 * j + 33])
                    ref.append(dense[:, :, k, i, j])
        per_patch = net(torch.cat(crops))
    torch.testing.assert_close(per_patch, torch.cat(ref), atol=1e-5, rtol=0)


def test_resnet3d_valid_through_the_sweep(tmp_path):
    """The sweep runs the valid network densely and gets its patch-mode numbers."""
    from xpression.data.volume import open_volume
    from xpression.inference.grid import make_grid
    from xpression.inference.predictor import Predictor
    from xpression.inference.sweep import dense_multiples, default_overlap, sweep

    rng = np.random.default_rng(0)
    np.save(tmp_path / "v.npy", rng.integers(0, 255, size=(9, 44, 48), dtype=np.uint8))
    volume = open_volume(tmp_path / "v.npy", voxel_size_um=(6.4, 6.4, 6.4))
    torch.manual_seed(0)
    net = module_from_config("resnet3d_valid", (5, 33, 33), **SMALL["resnet3d_valid"]).net
    randomize_batchnorm(net, 1)
    pred = Predictor(net.eval(), device="cpu")
    assert pred.can_dense and pred.dense_equivalent and default_overlap(pred, "dense") == 0.0
    spacing = (6.4, 25.6, 25.6)
    grid, _ = make_grid(volume.shape, volume.voxel_size_um, spacing,
                        multiple_of=dense_multiples(pred, volume.voxel_size_um, spacing))
    norm = lambda b: b.astype(np.float32) / 255.0  # noqa: E731
    dense = sweep(volume, pred, grid, mode="dense", tile_shape=(3, 3, 3), normalize=norm)
    patch = sweep(volume, pred, grid, mode="patch", tile_shape=(3, 3, 3), normalize=norm)
    assert np.isfinite(dense).all() and dense.shape == (3,) + grid.shape
    np.testing.assert_allclose(dense, patch, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["r3d_18", "vit3d_tiny"])
def test_networks_without_dense_mode_sweep_patch_by_patch(name, tmp_path):
    from xpression.data.volume import open_volume
    from xpression.inference.grid import make_grid
    from xpression.inference.predictor import InferenceError, Predictor
    from xpression.inference.sweep import sweep
    from xpression.inference.volume_sweep import plan_grid

    rng = np.random.default_rng(1)
    np.save(tmp_path / "v.npy", rng.integers(0, 255, size=(7, 40, 40), dtype=np.uint8))
    volume = open_volume(tmp_path / "v.npy", voxel_size_um=(6.4, 6.4, 6.4))
    torch.manual_seed(0)
    net = module_from_config(name, (5, 33, 33), **SMALL[name]).net.eval()
    assert not net.dense_equivalent and net.output_stride is None
    pred = Predictor(net, device="cpu")
    assert not pred.can_dense
    with pytest.raises(InferenceError, match="no dense mode; use mode=patch"):
        plan_grid(volume, pred, 12.8, "dense")
    grid, _ = plan_grid(volume, pred, (19.2, 64.0, 64.0), "patch")
    assert grid.shape[0] >= 2 and min(grid.shape[1:]) >= 3
    norm = lambda b: b.astype(np.float32) / 255.0  # noqa: E731
    out = sweep(volume, pred, grid, mode="patch", tile_shape=(2, 2, 2), normalize=norm)
    assert np.isfinite(out).all()
    c = np.asarray(grid.origin_vox) + np.array([1, 1, 2]) * np.asarray(grid.step_vox)
    lo = c - np.array([5, 33, 33]) // 2
    block = norm(volume.read_block(lo, lo + np.array([5, 33, 33])))
    with torch.no_grad():
        ref = net(torch.from_numpy(block)[None, None]).numpy()[0]
    np.testing.assert_allclose(out[:, 1, 1, 2], ref, atol=1e-5)
    with pytest.raises(NotImplementedError):
        net.dense_forward(torch.rand(1, 1, 5, 40, 40))


@pytest.mark.parametrize("kwargs,match", [
    ({"padding": "valid"}, "too small for resnet3d"),  # the 18-layer network needs far more than 33 voxels
    ({"arch": "r4d"}, "arch must be one of"),
    ({"widths": [8, 8], "layers": [1, 1, 1]}, "one entry per stage"),
    ({"widths": [8, 8], "layers": [1, 0], "strides": [1, 1]}, "at least one block"),
    ({"padding": "reflect"}, "padding must be"),
])
def test_resnet3d_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_backbone("resnet3d", patch_shape=(5, 33, 33), **kwargs)


def test_resnet3d_warns_when_patch_not_fully_read(caplog):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "backbone" / "resnet3d_valid.yaml"))
    cfg.pop("name")
    with caplog.at_level("WARNING", logger="xpression.models.backbones.resnet3d"):
        bb = create_backbone("resnet3d", patch_shape=(5, 35, 35), **{**cfg, "widths": [4, 4]})
    assert bb.used_shape == (5, 33, 33)
    assert "reads only" in caplog.text


def test_build_net_names_the_families():
    for cfg in ({"name": "resnet3d", "widths": [4, 4, 4, 4]}, {"name": "vit3d", "embed_dim": 12, "depth": 1}):
        net = build_net(cfg, SPEC, (5, 33, 33), spot_radius_vox=4.3)
        assert net(torch.rand(1, 1, 5, 33, 33)).shape == (1, 3)

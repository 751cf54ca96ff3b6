"""3D convolutions folded into 2D ones give F.conv3d's numbers, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xpression.models.backbones import depth_fold
from xpression.models.backbones.cnn3d import CNN3D
from xpression.models.backbones.depth_fold import FoldConv3d, conv3d, conv3d_folded, fold_choices


@pytest.fixture
def fold_mode():
    old = depth_fold.FOLD_MODE["mode"]
    yield depth_fold.FOLD_MODE
    depth_fold.FOLD_MODE["mode"] = old


CASES = [  # (C in, C out, kernel, stride, padding, input D H W)
    (1, 4, (3, 5, 5), (1, 1, 1), (0, 0, 0), (7, 12, 11)),
    (3, 2, (3, 3, 3), (2, 1, 2), (0, 0, 0), (9, 10, 10)),
    (2, 3, (3, 5, 3), (1, 1, 1), (1, 2, 1), (3, 8, 9)),
    (4, 5, (2, 3, 3), (3, 2, 1), (0, 1, 0), (8, 7, 6)),
]


COLUMNS = pytest.mark.parametrize("columns, multiple", [(False, 1), (True, 1), (True, 8)],
                                  ids=["depth", "depth+x", "depth+x8"])


@COLUMNS
@pytest.mark.parametrize("cin, cout, k, stride, pad, dhw", CASES)
def test_folded_equals_conv3d_values_and_gradients(cin, cout, k, stride, pad, dhw, columns, multiple):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, *dhw, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cout, cin, *k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, generator=g, dtype=torch.float64, requires_grad=True)
    want = F.conv3d(x, w, b, stride, pad)
    got = conv3d_folded(x, w, b, stride, pad, columns=columns, channel_multiple=multiple)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(want.shape, generator=g, dtype=torch.float64)
    grads_want = torch.autograd.grad(want, (x, w, b), upstream)
    grads_got = torch.autograd.grad(got, (x, w, b), upstream)
    for a, e in zip(grads_got, grads_want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@COLUMNS
def test_channels_last_input_gives_a_channels_last_output(columns, multiple):
    x = torch.randn(2, 3, 5, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(8, 3, 3, 5, 5)
    got = conv3d_folded(x, w, None, columns=columns, channel_multiple=multiple)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(got, F.conv3d(x, w), rtol=1e-4, atol=1e-4)


@COLUMNS
def test_under_autocast_the_folded_planes_are_copied_in_the_lower_precision(columns, multiple, monkeypatch):
    x, w, b = torch.randn(2, 1, 5, 20, 20), torch.randn(4, 1, 3, 5, 5), torch.randn(4)
    stacked = []
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda ts, *a, **k: stacked.append(ts[0].dtype) or real_stack(ts, *a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.conv3d(x, w, b)
        got = conv3d_folded(x, w, b, columns=columns, channel_multiple=multiple)
    assert stacked and set(stacked) == {torch.bfloat16}
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)


def test_the_x_fold_pads_its_channels_with_zeros_to_the_multiple():
    from xpression.models.backbones.depth_fold import _x_taps

    x = torch.arange(2 * 1 * 5 * 4 * 9, dtype=torch.float32).reshape(2, 1, 5, 4, 9)
    cols, d_out = _x_taps(x, 3, 5, 1, 2, 8)  # 15 taps -> 16 channels
    assert d_out == 3 and cols.shape == (6, 16, 4, 3) and cols.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cols[:, 15], torch.zeros(6, 4, 3))
    # channel (i, j) = 5 i + j of output plane (n, d) is x[n, 0, d + i, :, j::2][..., :3]
    assert torch.equal(cols[4, 5 * 2 + 3], x[1, 0, 1 + 2, :, 3 : 3 + 5 : 2])


def test_a_too_shallow_input_is_refused():
    with pytest.raises(ValueError, match="smaller than the kernel extent 3"):
        conv3d_folded(torch.zeros(1, 1, 2, 8, 8), torch.zeros(2, 1, 3, 3, 3), None)


@pytest.mark.parametrize("way", ["depth", "depth+x", "depth+x8"])
def test_published_layers_fold_to_the_same_patch_and_dense_outputs(fold_mode, way):
    torch.manual_seed(0)
    net = CNN3D((9, 40, 40), widths=(4, 6, 8), kernel_size=[(3, 5, 5), (3, 5, 5), (1, 5, 5)],
                pool=[(1, 2, 2), (1, 2, 2)], padding="valid", dense_width=5).double().eval()
    assert all(isinstance(m, FoldConv3d) for m in net.trunk if isinstance(m, nn.Conv3d))
    x = torch.randn(3, 1, 9, 40, 40, dtype=torch.float64)
    big = torch.randn(1, 1, 13, 72, 72, dtype=torch.float64)
    fold_mode["mode"] = "off"
    ref = net(x), net.dense_features(big), net.dense_features(big, step=(2, 3, 2))
    fold_mode["mode"] = way
    got = net(x), net.dense_features(big), net.dense_features(big, step=(2, 3, 2))
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_same_padding_network_folds_exactly(fold_mode):
    torch.manual_seed(1)
    net = CNN3D((5, 24, 24), widths=(3, 4), kernel_size=(3, 5, 5), pool=2, padding="same", dense_width=4).double().eval()
    x = torch.randn(2, 1, 5, 24, 24, dtype=torch.float64)
    fold_mode["mode"] = "off"
    ref = net(x)
    for way in ("depth", "depth+x", "depth+x8"):
        fold_mode["mode"] = way
        torch.testing.assert_close(net(x), ref, rtol=1e-10, atol=1e-10)


def test_auto_mode_leaves_cpu_convolutions_alone(fold_mode):
    fold_mode["mode"] = "auto"
    before = len(fold_choices())
    x, w = torch.randn(1, 1, 5, 12, 12), torch.randn(2, 1, 3, 3, 3)
    torch.testing.assert_close(conv3d(x, w, None), F.conv3d(x, w))  # same call, bit for bit
    assert len(fold_choices()) == before


def test_fold_conv_keeps_the_conv3d_state_dict():
    a, b = nn.Conv3d(2, 3, (3, 5, 5)), FoldConv3d(2, 3, (3, 5, 5))
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 2, 4, 9, 9)
    torch.testing.assert_close(b(x), a(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_mode_times_both_on_cuda_and_matches(fold_mode):
    fold_mode["mode"] = "auto"
    x = torch.randn(2, 1, 21, 256, 256, device="cuda")
    w = torch.randn(32, 1, 3, 9, 9, device="cuda")
    got = conv3d(x, w, None)
    torch.testing.assert_close(got, F.conv3d(x, w), rtol=2e-3, atol=2e-3)
    chosen = [c for c in fold_choices() if c["weight"] == [32, 1, 3, 9, 9]]
    assert chosen and set(chosen[-1]["ms"]) == {"3d", "depth", "depth+x", "depth+x8"}

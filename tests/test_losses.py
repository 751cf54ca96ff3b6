"""Losses: values on hand-computed examples, kind checks, registry errors."""

import math

import pytest
import torch

from xpression.models import build_loss, list_losses

LN2 = math.log(2)
COMP_T = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
COMP_P = torch.tensor([[0.25, 0.25, 0.5], [0.8, 0.1, 0.1]])


def test_kl_hand_computed():
    raw = COMP_P.log()  # softmax(log p) = p
    raw.requires_grad_(True)
    loss = build_loss("kl", "composition")(raw, COMP_T)
    # row 1: 2 * 0.5 ln(0.5 / 0.25) = ln 2 (the 0 target adds 0); row 2: ln(1 / 0.8)
    assert loss.item() == pytest.approx((LN2 + math.log(1 / 0.8)) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(raw.grad).all()
    # zero when the prediction equals the target, even with zero entries
    assert build_loss("kl", "composition")(torch.tensor([[0.0, 0.0, -30.0]]),
                                           torch.tensor([[0.5, 0.5, 0.0]])).item() < 1e-6


def test_mse_huber_hand_computed():
    raw = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[0.0, 2.0], [3.0, 6.0]])
    assert build_loss("mse", "log_expression")(raw, y).item() == pytest.approx(5 / 4)
    # errors 1, 0, 0, 2 -> 0.5 * 1^2, 0, 0, 1 * (2 - 0.5)
    assert build_loss({"name": "huber", "delta": 1.0}, "log_expression")(raw, y).item() == \
        pytest.approx((0.5 + 1.5) / 4)
    # composition: mse acts on the softmax predictions
    expected = ((0.25 ** 2 * 2 + 0.5 ** 2) + (0.2 ** 2 + 0.1 ** 2 * 2)) / 6
    assert build_loss("mse", "composition")(COMP_P.log(), COMP_T).item() == pytest.approx(expected)


def test_poisson_hand_computed():
    rate = torch.tensor([[1.0, 2.0]])
    raw = torch.log(torch.expm1(rate))  # softplus^-1
    y = torch.tensor([[0.0, 3.0]])
    expected = ((1 - 0) + (2 - 3 * LN2)) / 2
    assert build_loss("poisson", "counts")(raw, y).item() == pytest.approx(expected, rel=1e-5)


def test_pearson_hand_computed():
    raw = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    y = torch.tensor([[2.0, 3.0], [4.0, 2.0], [6.0, 1.0]])
    # column 1: r = 1 -> 0; column 2: r = -1 -> 2
    assert build_loss("pearson", "log_expression")(raw, y).item() == pytest.approx(1.0, abs=1e-6)
    const = build_loss("pearson", "log_expression")(torch.ones(3, 2), y)
    assert torch.isfinite(const) and const.item() == pytest.approx(1.0)


def test_mix_is_weighted_sum():
    cfg = {"name": "mix", "terms": [{"name": "kl", "weight": 1.0}, {"name": "mse", "weight": 0.5}]}
    raw = COMP_P.log()
    kl = build_loss("kl", "composition")(raw, COMP_T)
    mse = build_loss("mse", "composition")(raw, COMP_T)
    assert build_loss(cfg, "composition")(raw, COMP_T).item() == pytest.approx((kl + 0.5 * mse).item())


@pytest.mark.parametrize("cfg,kind", [
    ("kl", "log_expression"), ("kl", "counts"), ("poisson", "composition"),
    ("poisson", "log_expression"),
    ({"name": "mix", "terms": [{"name": "mse"}, {"name": "kl"}]}, "counts"),
])
def test_kind_mismatch_errors(cfg, kind):
    from xpression.cli import input_error

    with pytest.raises(ValueError, match=f"accepts targets of kind .*not '{kind}': choose another loss=") as err:
        build_loss(cfg, kind)
    assert input_error(err.value) is err.value  # train.py prints it as one line, not a traceback


def test_registry_and_defaults():
    assert set(list_losses()) == {"kl", "mse", "huber", "poisson", "pearson", "mix"}
    with pytest.raises(ValueError, match="valid names: huber, kl, mix, mse, pearson, poisson"):
        build_loss("focal", "composition")
    assert build_loss(None, "composition").name == "kl"
    assert build_loss(None, "log_expression").name == "mse"
    assert build_loss(None, "counts").name == "poisson"

"""The recipe's pieces: which parameters decay, the learning-rate schedule, the custom L2 term."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import randomize_bn
from repvgg import create_model, reparameterize_model
from repvgg.training.optim import build_optimizer, custom_l2, learning_rate, parameter_groups


def _names(model: torch.nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_follows_the_official_recipe() -> None:
    model = create_model("repvgg_tiny", num_classes=10, use_se=True)
    decay, no_decay = parameter_groups(model, 1e-4)
    decayed, plain = _names(model, decay), _names(model, no_decay)
    assert decayed.isdisjoint(plain)
    assert decayed | plain == {n for n, _ in model.named_parameters()}
    assert "stage0.rbr_dense.conv.weight" in decayed and "linear.weight" in decayed
    assert "stage1.1.rbr_identity.weight" in decayed  # identity BN scale is decayed
    assert "stage1.1.se.down.weight" in decayed
    for name in ("stage1.1.rbr_dense.bn.weight", "stage1.1.rbr_1x1.bn.weight", "stage1.1.rbr_identity.bias",
                 "stage1.1.rbr_dense.bn.bias", "linear.bias", "stage1.1.se.up.bias"):
        assert name in plain, name
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0


def test_custom_l2_moves_branch_kernels_out_of_optimizer_decay() -> None:
    model = create_model("repvgg_tiny", num_classes=10)
    decay, no_decay = parameter_groups(model, 1e-4, custom_l2=True)
    assert "stage0.rbr_dense.conv.weight" in _names(model, no_decay)
    assert "stage1.0.rbr_1x1.conv.weight" in _names(model, no_decay)
    assert "linear.weight" in _names(model, decay)
    optimizer = build_optimizer(model, 0.1, 0.9, 1e-4, custom_l2=True)
    assert optimizer.defaults["momentum"] == 0.9


def test_custom_l2_is_the_norm_of_the_fused_kernels_and_differentiable() -> None:
    model = randomize_bn(create_model("repvgg_tiny", num_classes=10)).eval()
    value = custom_l2(model)
    fused = reparameterize_model(model)
    expected = sum(float(m.rbr_reparam.weight.detach().double().square().sum()) for m in fused.modules()
                   if hasattr(m, "rbr_reparam") and m.rbr_reparam is not None)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert model.stage1[1].rbr_1x1.conv.weight.grad.abs().sum() > 0
    assert float(custom_l2(fused)) == 0.0


def test_learning_rate_schedule() -> None:
    base, total, warm = 0.1, 100, 10
    lrs = [learning_rate(s, total, base, warm) for s in range(total)]
    assert lrs[0] == pytest.approx(base / warm)
    assert lrs[warm - 1] == pytest.approx(base)
    assert lrs[warm] == pytest.approx(base)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(0.5 * base * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(total, total, base, warm) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(0, total, base, 0) == pytest.approx(base)

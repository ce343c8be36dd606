"""The recipe's pieces: which parameters decay, the learning-rate schedule, the custom L2 term."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import randomize_bn
from repvgg import RepVGGBlock, create_model, reparameterize_model
from repvgg.training.optim import build_optimizer, custom_l2, learning_rate, parameter_groups


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)


def _official_term(block: RepVGGBlock) -> float:
    """The official per-block custom L2 (``get_custom_L2``), written out channel by channel in float64."""
    k3 = block.rbr_dense.conv.weight.detach().double()
    k1 = block.rbr_1x1.conv.weight.detach().double()[:, :, 0, 0]
    t3, t1 = _bn_scale(block.rbr_dense.bn), _bn_scale(block.rbr_1x1.bn)
    outer = torch.ones(3, 3, dtype=torch.bool)
    outer[1, 1] = False
    total = k3[:, :, outer].square().sum().item()
    for c in range(k3.shape[0]):
        centre = k3[c, :, 1, 1] * t3[c] + k1[c] * t1[c]
        total += (centre.square().sum() / (t3[c] ** 2 + t1[c] ** 2)).item()
    return total


@pytest.mark.parametrize("kwargs", [dict(), dict(groups=4), dict(stride=2), dict(groups=2, dilation=2)])
def test_custom_l2_of_a_block_is_the_official_formula(kwargs: dict) -> None:
    block = randomize_bn(RepVGGBlock(8, 8, **kwargs), seed=3)
    assert custom_l2(block).item() == pytest.approx(_official_term(block), rel=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_custom_l2_of_a_model_is_the_sum_over_its_blocks(groups: int) -> None:
    model = randomize_bn(create_model("repvgg_tiny", num_classes=10, groups=groups), seed=groups)
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    assert len(blocks) == 10 and any(b.groups == groups for b in blocks)
    expected = sum(_official_term(b) for b in blocks)
    assert custom_l2(model).item() == pytest.approx(expected, rel=1e-6)
    # It is not the squared norm of the fused kernels (the identity and the BN scales are not decayed).
    fused_norm = sum(float(b.equivalent_kernel_bias()[0].detach().double().square().sum()) for b in blocks)
    assert abs(fused_norm - expected) > 1e-3 * expected


def test_custom_l2_gradient_reaches_the_kernels_only() -> None:
    block = randomize_bn(RepVGGBlock(8, 8, groups=2), seed=1)
    running = {n: b.clone() for n, b in block.named_buffers()}
    custom_l2(block).backward()
    for name, param in block.named_parameters():
        if name not in ("rbr_dense.conv.weight", "rbr_1x1.conv.weight"):
            assert param.grad is None, name  # BN scales are constants of the term; biases are not in it
    for name, buffer in block.named_buffers():
        assert torch.equal(buffer, running[name]), name
    k3, k1 = block.rbr_dense.conv.weight, block.rbr_1x1.conv.weight
    t3 = _bn_scale(block.rbr_dense.bn).reshape(-1, 1, 1, 1)
    t1 = _bn_scale(block.rbr_1x1.bn).reshape(-1, 1, 1, 1)
    centre = k3.detach().double()[:, :, 1:2, 1:2] * t3 + k1.detach().double() * t1
    norm = t3 ** 2 + t1 ** 2
    expected_k3 = 2 * k3.detach().double()
    expected_k3[:, :, 1:2, 1:2] = 2 * centre * t3 / norm
    torch.testing.assert_close(k3.grad.double(), expected_k3, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(k1.grad.double(), 2 * centre * t1 / norm, rtol=1e-5, atol=1e-7)


def test_custom_l2_leaves_out_the_identity_branch() -> None:
    block = randomize_bn(RepVGGBlock(8, 8), seed=2)
    before = custom_l2(block).item()
    with torch.no_grad():
        block.rbr_identity.weight.mul_(3.0)
        block.rbr_identity.running_var.mul_(0.25)
        block.rbr_identity.running_mean.add_(1.0)
    assert custom_l2(block).item() == before
    without = RepVGGBlock(8, 8, use_identity=False)
    without.load_state_dict({k: v for k, v in block.state_dict().items() if "rbr_identity" not in k})
    assert custom_l2(without).item() == before


def test_custom_l2_on_blocks_without_a_1x1_branch_or_fused() -> None:
    no_1x1 = randomize_bn(RepVGGBlock(8, 8, use_1x1=False))
    assert custom_l2(no_1x1).item() == pytest.approx(no_1x1.rbr_dense.conv.weight.square().sum().item(), rel=1e-6)
    # Post-addition BN: no BN inside the branches, so both scales are 1 and the centre is (K3_c + K1)^2 / 2.
    post = RepVGGBlock(8, 8, post_bn=True)
    k3, k1 = post.rbr_dense.conv.weight.detach(), post.rbr_1x1.conv.weight.detach()
    expected = k3.square().sum() - k3[:, :, 1:2, 1:2].square().sum() + ((k3[:, :, 1:2, 1:2] + k1) ** 2 / 2).sum()
    assert custom_l2(post).item() == pytest.approx(float(expected), rel=1e-6)
    model = randomize_bn(create_model("repvgg_tiny", num_classes=10))
    assert custom_l2(reparameterize_model(model)).item() == 0.0
    mixed = nn.Sequential(randomize_bn(RepVGGBlock(8, 8), seed=5), RepVGGBlock(8, 8, deploy=True))
    assert custom_l2(mixed).item() == pytest.approx(_official_term(mixed[0]), rel=1e-6)
    # Both BN scales of a channel exactly 0: that centre contributes 0 rather than NaN.
    dead = RepVGGBlock(8, 8)
    with torch.no_grad():
        dead.rbr_dense.bn.weight[0] = 0.0
        dead.rbr_1x1.bn.weight[0] = 0.0
    assert math.isfinite(custom_l2(dead).item())


def _small_model() -> nn.Module:
    return nn.Sequential(OrderedDict(
        stem=RepVGGBlock(3, 8, stride=2),
        body=RepVGGBlock(8, 8, groups=2, use_se=True),
        fused=RepVGGBlock(8, 8, deploy=True),
        head=nn.Sequential(nn.Flatten(), nn.Linear(8, 10)),
    ))


ALWAYS_DECAYED = {"body.rbr_identity.weight", "body.se.down.weight", "body.se.up.weight", "fused.rbr_reparam.weight",
                  "head.1.weight"}
BRANCH_KERNELS = {"stem.rbr_dense.conv.weight", "stem.rbr_1x1.conv.weight", "body.rbr_dense.conv.weight",
                  "body.rbr_1x1.conv.weight"}


@pytest.mark.parametrize("use_custom_l2", [False, True])
def test_parameter_groups_by_name(use_custom_l2: bool) -> None:
    model = _small_model()
    decay, no_decay = parameter_groups(model, 1e-4, custom_l2=use_custom_l2)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    expected = ALWAYS_DECAYED if use_custom_l2 else ALWAYS_DECAYED | BRANCH_KERNELS
    all_names = {n for n, _ in model.named_parameters()}
    assert _names(model, decay) == expected
    assert _names(model, no_decay) == all_names - expected
    assert len(decay["params"]) + len(no_decay["params"]) == len(all_names)


def test_parameter_groups_of_a_registered_model_with_custom_l2() -> None:
    model = create_model("repvgg_tiny", num_classes=10)
    model.stage1[0].rbr_dense.bn.weight.requires_grad_(False)
    decay, no_decay = parameter_groups(model, 1e-4, custom_l2=True)
    identity_scales = {f"stage{s}.rbr_identity.weight" for s in ("1.1", "2.1", "3.1", "3.2", "3.3")}
    assert _names(model, decay) == {"linear.weight"} | identity_scales
    assert "stage1.0.rbr_dense.bn.weight" not in _names(model, no_decay)  # frozen: in no group


@pytest.mark.parametrize("use_custom_l2", [False, True])
def test_one_sgd_step_applies_the_decay(use_custom_l2: bool) -> None:
    model = _small_model().double()
    lr, wd = 0.1, 0.05
    optimizer = build_optimizer(model, lr, 0.9, wd, custom_l2=use_custom_l2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for name, param in model.named_parameters():
        param.grad = grads[name].clone()
    optimizer.step()
    params = dict(model.named_parameters())
    decayed = ALWAYS_DECAYED if use_custom_l2 else ALWAYS_DECAYED | BRANCH_KERNELS
    # First step: the momentum buffer is the (decayed) gradient itself, so p <- p - lr * (g + wd * p).
    for name in ("head.1.weight", "body.rbr_identity.weight", "stem.rbr_dense.conv.weight", "head.1.bias",
                 "body.rbr_dense.bn.weight"):
        w, g = before[name], grads[name]
        expected = w - lr * (g + wd * w) if name in decayed else w - lr * g
        torch.testing.assert_close(params[name].detach(), expected, rtol=0, atol=1e-12)
    assert optimizer.defaults["momentum"] == 0.9


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

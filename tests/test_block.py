"""The block: branches, exact fusion, the deploy form, and the differentiable equivalent kernel."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import randomize_bn, relative_error
from repvgg import RepVGGBlock, reparameterize_model
from repvgg.nn.fusion import fold_batchnorm, fuse_conv_bn_modules, identity_kernel, pad_kernel_to


def test_training_forward_is_sum_of_branches_through_relu() -> None:
    block = randomize_bn(RepVGGBlock(8, 8)).eval()
    x = torch.randn(2, 8, 7, 7)
    dense = block.rbr_dense.bn(F.conv2d(x, block.rbr_dense.conv.weight, padding=1))
    one = block.rbr_1x1.bn(F.conv2d(x, block.rbr_1x1.conv.weight))
    ident = block.rbr_identity(x)
    torch.testing.assert_close(block(x), F.relu(dense + one + ident))


@pytest.mark.parametrize(
    "kwargs, has_identity, has_1x1",
    [
        (dict(in_channels=8, out_channels=8), True, True),
        (dict(in_channels=8, out_channels=16), False, True),
        (dict(in_channels=8, out_channels=8, stride=2), False, True),
        (dict(in_channels=8, out_channels=8, use_identity=False), False, True),
        (dict(in_channels=8, out_channels=8, use_1x1=False), True, False),
    ],
)
def test_branches_exist_only_when_they_should(kwargs: dict, has_identity: bool, has_1x1: bool) -> None:
    block = RepVGGBlock(**kwargs)
    assert (block.rbr_identity is not None) == has_identity
    assert (block.rbr_1x1 is not None) == has_1x1
    assert not block.deploy


def test_identity_kernel_is_identity_for_groups() -> None:
    for groups in (1, 2, 4, 8):
        kernel = identity_kernel(8, groups, 3)
        x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(F.conv2d(x, kernel, padding=1, groups=groups), x)


def test_pad_kernel_to_puts_1x1_in_centre() -> None:
    kernel = torch.randn(4, 2, 1, 1)
    padded = pad_kernel_to(kernel, 3)
    assert padded.shape == (4, 2, 3, 3)
    torch.testing.assert_close(padded[:, :, 1, 1], kernel[:, :, 0, 0])
    assert padded.abs().sum() == kernel.abs().sum()
    with pytest.raises(ValueError):
        pad_kernel_to(torch.randn(1, 1, 2, 2), 3)


def test_fold_batchnorm_matches_conv_then_bn() -> None:
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
    bn = randomize_bn(nn.BatchNorm2d(6)).eval()
    kernel, bias = fold_batchnorm(conv.weight, bn)
    x = torch.randn(2, 3, 8, 8)
    expected = bn(conv(x))
    actual = F.conv2d(x.double(), kernel, bias, padding=1)
    assert relative_error(actual, expected) < 1e-6


def test_fuse_conv_bn_modules_folds_existing_bias() -> None:
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=True)
    bn = randomize_bn(nn.BatchNorm2d(6)).eval()
    fused = fuse_conv_bn_modules(conv, bn)
    x = torch.randn(2, 3, 8, 8)
    assert relative_error(fused(x), bn(conv(x))) < 1e-6


def test_bn_without_running_stats_is_refused() -> None:
    block = RepVGGBlock(4, 4)
    block.rbr_dense.bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        block.reparameterize()


@settings(max_examples=60, deadline=None)
@given(
    channels=st.sampled_from([(4, 4), (8, 8), (4, 8), (8, 4), (12, 12), (6, 12)]),
    groups=st.sampled_from([1, 2, 4]),
    stride=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2, 3]),
    use_identity=st.booleans(),
    use_1x1=st.booleans(),
    identity_bn=st.booleans(),
    post_bn=st.booleans(),
    use_se=st.booleans(),
    height=st.integers(min_value=5, max_value=13),
    width=st.integers(min_value=5, max_value=13),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_fusion_is_exact_over_block_configurations(
    channels: tuple[int, int], groups: int, stride: int, dilation: int, use_identity: bool, use_1x1: bool,
    identity_bn: bool, post_bn: bool, use_se: bool, height: int, width: int, seed: int,
) -> None:
    in_ch, out_ch = channels
    if in_ch % groups or out_ch % groups:
        groups = 1
    torch.manual_seed(seed)
    block = RepVGGBlock(
        in_ch, out_ch, stride=stride, groups=groups, dilation=dilation, use_se=use_se,
        use_identity=use_identity, use_1x1=use_1x1, identity_bn=identity_bn, post_bn=post_bn,
    )
    randomize_bn(block, seed)
    x = torch.randn(2, in_ch, height, width)
    block.eval()
    expected = block(x)
    fused = reparameterize_model(block)
    actual = fused(x)
    assert actual.shape == expected.shape
    assert actual.shape[-2:] == ((height - 1) // stride + 1, (width - 1) // stride + 1)
    assert relative_error(actual, expected) <= 1e-5
    assert fused.deploy and fused.rbr_dense is None and fused.rbr_1x1 is None and fused.rbr_identity is None
    assert fused.rbr_reparam.groups == groups and fused.rbr_reparam.dilation == (dilation, dilation)


def test_conversion_uses_running_stats_even_in_train_mode() -> None:
    block = randomize_bn(RepVGGBlock(8, 8))
    block.train()
    x = torch.randn(4, 8, 6, 6)
    fused = reparameterize_model(block)  # caller forgot .eval()
    assert not fused.training
    assert block.training, "the source model must be left untouched"
    assert relative_error(fused(x), block.eval()(x)) <= 1e-6


def test_reparameterize_is_idempotent_and_drops_branches() -> None:
    block = randomize_bn(RepVGGBlock(8, 8, use_se=True)).eval()
    x = torch.randn(1, 8, 6, 6)
    expected = block(x)
    block.reparameterize()
    weight = block.rbr_reparam.weight.clone()
    block.reparameterize()
    torch.testing.assert_close(block.rbr_reparam.weight, weight)
    keys = set(block.state_dict())
    assert keys == {"rbr_reparam.weight", "rbr_reparam.bias", "se.down.weight", "se.down.bias",
                    "se.up.weight", "se.up.bias"}
    assert relative_error(block(x), expected) <= 1e-6


def test_deploy_constructed_block_loads_fused_state_dict_and_runs() -> None:
    block = randomize_bn(RepVGGBlock(8, 16, stride=2, groups=2, dilation=1)).eval()
    x = torch.randn(2, 8, 9, 9)
    expected = block(x)
    fused_state = reparameterize_model(block).state_dict()
    deployed = RepVGGBlock(8, 16, stride=2, groups=2, deploy=True)
    assert deployed.deploy and deployed.rbr_dense is None
    deployed.load_state_dict(fused_state)
    assert relative_error(deployed.eval()(x), expected) <= 1e-6
    # padding follows dilation in the deploy constructor too
    dilated = RepVGGBlock(8, 8, dilation=2, deploy=True)
    assert dilated.rbr_reparam.padding == (2, 2)
    assert dilated(torch.randn(1, 8, 7, 7)).shape == (1, 8, 7, 7)


def test_equivalent_kernel_bias_is_differentiable() -> None:
    block = randomize_bn(RepVGGBlock(4, 4))
    kernel, bias = block.equivalent_kernel_bias()
    assert kernel.dtype == torch.float32 and kernel.shape == (4, 4, 3, 3) and bias.shape == (4,)
    (kernel.square().sum() + bias.square().sum()).backward()
    for param in (block.rbr_dense.conv.weight, block.rbr_1x1.conv.weight, block.rbr_dense.bn.weight,
                  block.rbr_identity.weight, block.rbr_identity.bias):
        assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conversion_in_reduced_precision(dtype: torch.dtype) -> None:
    block = randomize_bn(RepVGGBlock(8, 8, groups=2)).eval()
    reference = reparameterize_model(block)
    low = copy.deepcopy(block).to(dtype)
    fused = reparameterize_model(low)
    assert fused.rbr_reparam.weight.dtype == dtype
    # Fused in float64 then cast once: the low-precision kernel is the exact kernel rounded.
    torch.testing.assert_close(
        fused.rbr_reparam.weight.float(), reference.rbr_reparam.weight, rtol=1e-2, atol=1e-2,
    )
    x = torch.randn(1, 8, 6, 6)
    assert relative_error(fused(x.to(dtype)).float(), block(x)) < 3e-2


def test_deepcopy_and_state_dict_round_trip() -> None:
    block = randomize_bn(RepVGGBlock(8, 8)).eval()
    clone = copy.deepcopy(block)
    fresh = RepVGGBlock(8, 8)
    fresh.load_state_dict(block.state_dict())
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(clone(x), block(x))
    torch.testing.assert_close(fresh.eval()(x), block(x))


@pytest.mark.parametrize(
    "kwargs",
    [dict(in_channels=6, out_channels=8, groups=4), dict(in_channels=0, out_channels=8),
     dict(in_channels=8, out_channels=8, stride=0), dict(in_channels=8, out_channels=8, dilation=1.5)],
)
def test_bad_block_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RepVGGBlock(**kwargs)


@pytest.mark.parametrize("variant", [dict(), dict(identity_bn=False), dict(post_bn=True), dict(use_1x1=False)])
def test_block_with_sync_and_frozen_batchnorm_fuses_like_batchnorm(variant: dict) -> None:
    from torchvision.ops import FrozenBatchNorm2d

    block = randomize_bn(RepVGGBlock(8, 8, **variant), seed=3).eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        expected = block(x)
        kernel, bias = block.equivalent_kernel_bias()
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(block))
        k_sync, b_sync = sync.equivalent_kernel_bias()
        frozen = copy.deepcopy(block)
        for parent in list(frozen.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    replacement = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(replacement, name).copy_(getattr(child, name))
                    setattr(parent, child_name, replacement)
        k_frozen, b_frozen = frozen.equivalent_kernel_bias()
    for k, b in ((k_sync, b_sync), (k_frozen, b_frozen)):
        assert relative_error(k, kernel) <= 1e-6 and relative_error(b, bias) <= 1e-6
    sync.reparameterize()
    with torch.no_grad():
        assert relative_error(sync(x), expected) <= 1e-5


@pytest.mark.parametrize("norm", [lambda c: nn.GroupNorm(2, c), lambda c: nn.InstanceNorm2d(c, affine=True)])
def test_a_norm_that_cannot_fold_is_a_clear_error_naming_the_layer(norm) -> None:
    from repvgg import create_model, reparameterize_model

    model = create_model("repvgg_tiny", num_classes=3)
    block = model.stage2[1]
    block.rbr_dense.bn = norm(block.rbr_dense.bn.num_features)
    with pytest.raises(ValueError, match=r"stage2\.1.*cannot fold (GroupNorm|InstanceNorm2d)"):
        reparameterize_model(model)


@pytest.mark.parametrize("groups", [1, 2])
def test_the_quantization_friendly_block_fuses_exactly(groups: int) -> None:
    block = randomize_bn(RepVGGBlock(8, 8, groups=groups, quant_friendly=True), seed=5).eval()
    assert isinstance(block.rbr_identity, nn.Identity) and isinstance(block.rbr_1x1.bn, nn.Identity)
    assert block.rbr_1x1.conv.bias is None and isinstance(block.rbr_dense.bn, nn.BatchNorm2d)
    assert isinstance(block.post_bn, nn.BatchNorm2d)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        expected = block(x)
        fused = reparameterize_model(block)
        assert relative_error(fused(x), expected) <= 1e-5
    with pytest.raises(ValueError, match="quant_friendly"):
        RepVGGBlock(8, 8, quant_friendly=True, post_bn=True)

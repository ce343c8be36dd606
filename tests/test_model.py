"""The model family: every variant converts exactly, counts match the architecture, backbone use works."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from conftest import narrow as narrow_widths, randomize_bn, relative_error
from repvgg import RepVGG, RepVGGBlock, RepVGGSpec, create_model, get_spec, list_models, reparameterize_model
from repvgg.nn.complexity import count_macs, count_parameters, model_complexity

#: Each paper model's counts, made once for the two tests that check them (a second each on two cores).
_counts = functools.cache(model_complexity)

PAPER_MODELS = ["repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g2", "repvgg_b1g4",
                "repvgg_b2", "repvgg_b2g2", "repvgg_b2g4", "repvgg_b3", "repvgg_b3g2", "repvgg_b3g4", "repvgg_d2se"]


def test_registry_lists_the_paper_family_sorted() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(PAPER_MODELS) <= set(names)


def test_list_models_filters_by_pattern() -> None:
    import repvgg

    assert list_models("repvgg_b3*") == ["repvgg_b3", "repvgg_b3g2", "repvgg_b3g4"]
    assert list_models("RepVGG-B3*") == list_models("repvgg_b3*")  # the paper's spelling
    assert list_models("*g4") == sorted(n for n in list_models() if n.endswith("g4")) and len(list_models("*g4")) == 6
    assert list_models("nothing*") == []
    assert "build_model" not in repvgg.__all__ and "create_model" in repvgg.__all__  # one public builder


@pytest.mark.parametrize("name, narrow", [(name, True) for name in list_models()] + [("repvgg_a0", False)])
def test_every_variant_converts_exactly(name: str, narrow: bool) -> None:
    model = randomize_bn(create_model(name, num_classes=10, **(narrow_widths(name) if narrow else {})),
                         seed=len(name)).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = model(x)
        fused = reparameterize_model(model)
        actual = fused(x)
    assert relative_error(actual, expected) <= 1e-5
    assert fused.deploy and not model.deploy
    blocks = [m for m in fused.modules() if isinstance(m, RepVGGBlock)]
    assert len(blocks) == sum(get_spec(name).depths)
    assert all(b.rbr_dense is None for b in blocks)
    # A --sync-bn run's model (SyncBatchNorm everywhere) fuses to the same function as its BatchNorm2d twin.
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    fused_sync = reparameterize_model(sync)
    with torch.no_grad():
        assert relative_error(fused_sync(x), expected) <= 1e-5
    reference = fused.state_dict()
    for key, value in fused_sync.state_dict().items():
        assert relative_error(value, reference[key]) <= 1e-5 or value.abs().max() == reference[key].abs().max() == 0


def _analytic_counts(spec: RepVGGSpec, num_classes: int, img: int) -> tuple[int, int, int, int]:
    """Parameters and MACs derived from the paper's definition, independently of the module code."""
    a, b = spec.width_multipliers
    widths = [min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b)]
    p_train = p_deploy = macs_train = macs_deploy = 0
    in_ch, size, layer = 3, img, 0
    for stage, depth in enumerate(spec.depths):
        for i in range(depth):
            layer += 1
            out = widths[stage]
            stride = 2 if i == 0 else 1
            g = spec.groups if layer >= 3 and layer % 2 == 1 else 1
            size = (size - 1) // stride + 1
            k3, k1 = out * in_ch // g * 9, out * in_ch // g
            identity = in_ch == out and stride == 1
            se = 0
            if spec.use_se:
                hidden = out // 16
                se = out * hidden + hidden + hidden * out + out
            p_train += k3 + 2 * out + k1 + 2 * out + (2 * out if identity else 0) + se
            p_deploy += k3 + out + se
            macs_train += (k3 + k1) * size * size + (out * hidden + hidden * out if spec.use_se else 0)
            macs_deploy += k3 * size * size + (out * hidden + hidden * out if spec.use_se else 0)
            in_ch = out
    head = in_ch * num_classes + num_classes
    return p_train + head, p_deploy + head, macs_train + in_ch * num_classes, macs_deploy + in_ch * num_classes


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_parameter_and_mac_counts_match_the_architecture(name: str) -> None:
    counted = _counts(name, 224)
    expected = _analytic_counts(get_spec(name), 1000, 224)
    assert (counted.params_train, counted.params_deploy, counted.macs_train, counted.macs_deploy) == expected


@pytest.mark.parametrize(
    "name, params_deploy_m, gflops",
    # Paper Table 4 (deploy params in millions, theoretical FLOPs in billions at 224x224).
    [("repvgg_a0", 8.30, 1.36), ("repvgg_a1", 12.78, 2.37), ("repvgg_a2", 25.49, 5.12),
     ("repvgg_b0", 14.33, 3.06), ("repvgg_b1", 51.82, 11.82), ("repvgg_b1g2", 41.36, 8.82),
     ("repvgg_b1g4", 36.12, 7.31), ("repvgg_b2", 80.31, 18.38), ("repvgg_b2g4", 55.77, 11.34),
     ("repvgg_b3", 110.96, 26.21), ("repvgg_b3g4", 75.62, 16.08)],
)
def test_counts_agree_with_the_paper_table(name: str, params_deploy_m: float, gflops: float) -> None:
    c = _counts(name, 224)
    assert c.params_deploy / 1e6 == pytest.approx(params_deploy_m, abs=0.015)
    assert c.macs_deploy / 1e9 == pytest.approx(gflops, abs=0.025)


@pytest.mark.parametrize("kwargs, train_params, deploy_params, train_macs, deploy_macs", [
    # 8 -> 8 at 10x10: 3x3 kernel 8*8*9, 1x1 kernel 8*8, three BNs with 8 scales + 8 shifts each;
    # fused: the 3x3 kernel plus an 8-element bias. Running statistics are buffers, not counted.
    (dict(in_channels=8, out_channels=8),
     8 * 8 * 9 + 2 * 8 + 8 * 8 + 2 * 8 + 2 * 8, 8 * 8 * 9 + 8,
     (8 * 8 * 9 + 8 * 8) * 10 * 10, 8 * 8 * 9 * 10 * 10),
    # 8 -> 16, stride 2, 2 groups (each output sees 4 inputs), 5x5 output, no identity branch.
    (dict(in_channels=8, out_channels=16, stride=2, groups=2),
     16 * 4 * 9 + 2 * 16 + 16 * 4 + 2 * 16, 16 * 4 * 9 + 16,
     (16 * 4 * 9 + 16 * 4) * 5 * 5, 16 * 4 * 9 * 5 * 5),
    # 16 -> 16 with SE (16 // 16 = 1 hidden unit: down 16*1 + 1, up 1*16 + 16, run on the pooled 1x1 map).
    (dict(in_channels=16, out_channels=16, use_se=True),
     16 * 16 * 9 + 2 * 16 + 16 * 16 + 2 * 16 + 2 * 16 + (16 + 1) + (16 + 16), 16 * 16 * 9 + 16 + (16 + 1) + (16 + 16),
     (16 * 16 * 9 + 16 * 16) * 10 * 10 + 16 + 16, 16 * 16 * 9 * 10 * 10 + 16 + 16),
])
def test_counts_of_one_block_by_hand(kwargs: dict, train_params: int, deploy_params: int, train_macs: int,
                                     deploy_macs: int) -> None:
    block = RepVGGBlock(**kwargs)
    shape = (1, kwargs["in_channels"], 10, 10)
    assert count_parameters(block) == train_params
    assert count_macs(block, shape) == train_macs
    block.reparameterize()
    assert count_parameters(block) == deploy_params
    assert count_macs(block, shape) == deploy_macs


def test_count_macs_on_a_real_model_restores_mode() -> None:
    model = create_model("repvgg_tiny", num_classes=10)
    for training in (True, False):
        model.train(training)
        assert count_macs(model, (1, 3, 32, 32)) > 0
        assert model.training is training and all(m.training is training for m in model.modules())


def test_groupwise_layers_are_every_second_from_the_third() -> None:
    model = create_model("repvgg_b1g4")
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    grouped = [i + 1 for i, b in enumerate(blocks) if b.groups == 4]
    assert grouped == list(range(3, 28, 2))
    a = create_model("repvgg_a0", groups=2)
    a_blocks = [m for m in a.modules() if isinstance(m, RepVGGBlock)]
    assert [i + 1 for i, b in enumerate(a_blocks) if b.groups == 2] == list(range(3, 22, 2))


def test_widths_and_strides() -> None:
    model = create_model("repvgg_a0")
    assert get_spec("repvgg_a0").widths == (48, 48, 96, 192, 1280)
    features = model.forward_stages(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [48, 48, 96, 192, 1280]
    assert [64 // f.shape[-1] for f in features] == [2, 4, 8, 16, 32]
    assert [info["reduction"] for info in model.feature_info] == [2, 4, 8, 16, 32]


def test_features_only_backbone() -> None:
    backbone = create_model("repvgg_tiny", features_only=True, out_indices=(2, 4))
    assert backbone.linear is None
    outs = backbone(torch.randn(2, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [8, 2]
    with pytest.raises(RuntimeError, match="features_only"):
        backbone.forward_head(outs[-1])
    with pytest.raises(ValueError, match="out_indices"):
        create_model("repvgg_tiny", features_only=True, out_indices=(5,))


def test_forward_features_then_head_equals_forward() -> None:
    model = randomize_bn(create_model("repvgg_tiny", num_classes=7)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
    assert model(x).shape == (2, 7)


def test_custom_architecture_in_one_call() -> None:
    model = create_model("repvgg_a0", depths=(1, 2, 2, 2, 1), width_multipliers=(0.25, 0.5), groups=2,
                         num_classes=5, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    spec = RepVGGSpec(depths=(1, 1, 1, 1, 1), width_multipliers=(0.25, 0.25), use_se=True)
    assert RepVGG(spec, num_classes=3).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert RepVGGSpec.from_dict(spec.to_dict()) == spec


def test_gradient_checkpointing_gives_same_gradients() -> None:
    model = randomize_bn(create_model("repvgg_tiny", num_classes=4))
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_unknown_model_name_lists_close_matches() -> None:
    with pytest.raises(ValueError, match="repvgg_a0"):
        create_model("repvgg_ao")
    assert create_model("RepVGG-A0", num_classes=2).name == "repvgg_a0"


@pytest.mark.parametrize(
    "kwargs, error",
    [(dict(depths=(1, 2, 3)), ValueError), (dict(width_multipliers=(0, 1)), ValueError),
     (dict(depth=(1, 2, 2, 2, 1)), TypeError), (dict(num_classes=-1), ValueError),
     (dict(depths=(2, 2, 2, 2, 2)), ValueError)],
)
def test_bad_model_arguments_raise(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        create_model("repvgg_tiny", **kwargs)


def test_reparameterize_model_walks_any_module_and_returns_a_copy() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = create_model("repvgg_tiny", features_only=True, out_indices=(4,))
            self.head = nn.Sequential(nn.Conv2d(self.backbone.num_features, 3, 1), nn.BatchNorm2d(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x)[0])

    model = randomize_bn(Wrapper())
    x = torch.randn(2, 3, 32, 32)
    fused = reparameterize_model(model)
    assert not fused.training and model.training
    assert not model.backbone.deploy and fused.backbone.deploy
    assert isinstance(fused.head[1], nn.BatchNorm2d)
    assert relative_error(fused(x), model.eval()(x)) <= 1e-5
    same = reparameterize_model(model, inplace=True)
    assert same is model and model.backbone.deploy
    with pytest.raises(TypeError):
        reparameterize_model("not a module")  # type: ignore[arg-type]


def test_qarepvgg_models_fuse_to_the_same_plain_network_and_are_recognised() -> None:
    from repvgg.io.loading import infer_architecture

    assert {f"qa{name}" for name in PAPER_MODELS if name != "repvgg_d2se"} <= set(list_models())
    qa, plain = create_model("QARepVGG-A0", num_classes=10), create_model("repvgg_a0", num_classes=10)
    assert qa.name == "qarepvgg_a0" and qa.spec.quant_friendly
    assert count_parameters(reparameterize_model(qa)) == count_parameters(reparameterize_model(plain))
    assert count_parameters(qa) != count_parameters(plain)
    tiny = create_model("qarepvgg_tiny", num_classes=10)
    assert infer_architecture(tiny.state_dict()) == "qarepvgg_tiny"
    assert infer_architecture(create_model("repvgg_tiny", num_classes=10).state_dict()) == "repvgg_tiny"


def test_pretrained_takes_true_or_false_only() -> None:
    """A hub reference given as ``pretrained`` was taken as True (timm's weights, fetched); it goes in ``weights``."""
    with pytest.raises(TypeError, match="for a hub reference pass weights='hf-hub:me/cls'"):
        create_model("repvgg_tiny", pretrained="hf-hub:me/cls")


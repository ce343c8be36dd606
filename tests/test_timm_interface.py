"""The model interface the ecosystem calls: timm's (features, heads, intermediates, helpers), TorchScript,
mmdetection/mmsegmentation backbone options, and mmpretrain checkpoints."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from conftest import narrow, randomize_bn, relative_error
from repvgg import create_model, list_models, load_model, reparameterize_model


@pytest.mark.parametrize("name", list_models())
@torch.no_grad()
def test_the_timm_interface_on_every_registered_model(name: str) -> None:
    # every model's layout at 1/8 of its widths: the interface is the same at any width, and running it is
    # cheaper than meta tensors
    model = create_model(name, num_classes=0, **narrow(name))
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)  # the body once; the heads below run on its output
    pooled = model.forward_head(features)
    assert tuple(pooled.shape) == (2, model.num_features) and isinstance(model.get_classifier(), nn.Identity)
    model.reset_classifier(7)
    assert tuple(model.forward_head(features).shape) == (2, 7) and model.get_classifier().out_features == 7
    assert tuple(model.forward_head(features, pre_logits=True).shape) == (2, model.num_features)
    final, maps = model.forward_intermediates(x, indices=3)
    info = model.feature_info
    assert [m.shape[1] for m in maps] == info.channels()[-3:] and final.shape == maps[-1].shape
    assert [64 // m.shape[-1] for m in maps] == info.reduction()[-3:]
    assert info.reduction() == [2, 4, 8, 16, 32] and info.module_name() == [f"stage{i}" for i in range(5)]
    assert len(model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)) == 2
    fused = reparameterize_model(model)
    assert fused.deploy and tuple(fused(x).shape) == (2, 7)


def test_stage_indices_and_class_counts_out_of_range_are_refused() -> None:
    """timm's indices: a count of the last stages, or stage indices, negative ones from the end; out of range they
    wrapped round (5 was stage 0) or repeated stages, and reset_classifier took -1 or 2.5."""
    model = create_model("repvgg_tiny", num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        last, first = model.forward_intermediates(x, indices=[-1, 0], intermediates_only=True)
    assert last.shape[-1] == 1 and first.shape[-1] == 16
    for bad in ([5], [-6], 6, 0, [], [True]):
        with pytest.raises(ValueError, match="stage indices run from -5 to 4|takes the last 1 to 5 stages"):
            model.forward_intermediates(x, indices=bad)
        with pytest.raises(ValueError):
            model.prune_intermediate_layers(bad)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
            model.reset_classifier(bad)  # type: ignore[arg-type]
    setattr(model, "card", object())  # a loaded file's names of the old outputs go with them
    model.reset_classifier(5)
    assert not hasattr(model, "card")


@pytest.mark.parametrize("name", ["repvgg_tiny", "qarepvgg_tiny", "repvgg_a0"])
def test_torchscript_of_both_forms_matches_eager(name: str) -> None:
    model = randomize_bn(create_model(name, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    for form in (model, reparameterize_model(model)):
        scripted = torch.jit.script(form)
        with torch.no_grad():
            assert torch.allclose(scripted(x), form(x), rtol=1e-5, atol=1e-6)
    backbone = create_model("repvgg_tiny", features_only=True, out_indices=(1, 3)).eval()
    outputs = torch.jit.script(backbone)(x)
    assert [o.shape[1] for o in outputs] == backbone.feature_info.channels([1, 3])


def test_switch_to_deploy_fuses_in_place() -> None:
    model = randomize_bn(create_model("repvgg_tiny", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.switch_to_deploy()
        assert model.deploy and relative_error(model(x), expected) <= 1e-5


def test_frozen_stages_and_norm_eval() -> None:
    model = create_model("repvgg_tiny", num_classes=10, frozen_stages=1, norm_eval=True).train()
    frozen = [p for s in (model.stage0, model.stage1) for p in s.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in model.stage2.parameters())
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.stage3.training  # the rest trains
    with pytest.raises(ValueError, match="frozen_stages"):
        create_model("repvgg_tiny", frozen_stages=5)


def test_timm_helpers_accept_the_model() -> None:
    from timm.data import resolve_model_data_config
    from timm.models import FeatureListNet
    from timm.optim import create_optimizer_v2

    model = create_model("repvgg_tiny", num_classes=10)
    config = resolve_model_data_config(model)
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == 0.875
    features = FeatureListNet(model, out_indices=(1, 3))
    outputs = features(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outputs] == model.feature_info.channels([1, 3])
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.7)
    scales = {round(g["lr_scale"], 6) for g in optimizer.param_groups}
    assert len(scales) > 3 and max(scales) == 1.0  # deeper layers learn faster, by layer


def _to_mmpretrain(key: str) -> str:
    """The inverse mapping, written independently of the package's rules."""
    key = "head.fc." + key[len("linear."):] if key.startswith("linear.") else key
    key = re.sub(r"^stage0\.", "backbone.stem.", key)
    key = re.sub(r"^stage(\d)\.", r"backbone.stage_\1.", key)
    key = key.replace(".rbr_dense.bn.", ".branch_3x3.norm.").replace(".rbr_dense.", ".branch_3x3.")
    key = key.replace(".rbr_1x1.bn.", ".branch_1x1.norm.").replace(".rbr_1x1.", ".branch_1x1.")
    key = key.replace(".rbr_identity.", ".branch_norm.").replace(".rbr_reparam.", ".branch_reparam.")
    return key.replace(".se.down.", ".se_layer.conv1.conv.").replace(".se.up.", ".se_layer.conv2.conv.")


@pytest.fixture
def narrow_d2se():
    """RepVGG-D2se's layout (SE in every block) at 1/8 of its widths, registered while the test runs: the SE keys
    and the architecture inference are what matter, not 133M parameters written and read twice."""
    import dataclasses

    from repvgg import get_spec, register_model
    from repvgg.nn.registry import MODEL_SPECS

    spec = get_spec("repvgg_d2se")
    register_model("repvgg_d2se_narrow", dataclasses.replace(spec, base_widths=tuple(w // 8 for w in spec.base_widths)))
    try:
        yield "repvgg_d2se_narrow"
    finally:
        del MODEL_SPECS["repvgg_d2se_narrow"]


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_d2se_narrow"])
def test_mmpretrain_checkpoints_load(name: str, tmp_path, request: pytest.FixtureRequest) -> None:
    if name == "repvgg_d2se_narrow":
        request.getfixturevalue("narrow_d2se")
    model = randomize_bn(create_model(name, num_classes=10)).eval()
    for form in (model, reparameterize_model(model)):
        mm = {"meta": {"epoch": 1}, "state_dict": {_to_mmpretrain(k): v for k, v in form.state_dict().items()}}
        assert any(k.startswith("backbone.stage_") for k in mm["state_dict"])
        torch.save(mm, tmp_path / "mm.pth")
        loaded = load_model(tmp_path / "mm.pth").eval()
        assert loaded.name == name and loaded.deploy == form.deploy
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(loaded(x), form(x))

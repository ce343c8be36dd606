"""This package's models inside timm and segmentation_models_pytorch."""

from __future__ import annotations

import pytest
import torch

from conftest import relative_error
from repvgg import reparameterize_model
from repvgg.integrations import register_timm_models


def test_timm_builds_our_models_by_name() -> None:
    import timm

    names = register_timm_models()
    assert "pkg_repvgg_a0" in names and register_timm_models() == names  # idempotent
    model = timm.create_model("pkg_repvgg_tiny", num_classes=7).eval()
    assert model.name == "repvgg_tiny" and model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    backbone = timm.create_model("pkg_repvgg_tiny", features_only=True, output_stride=8, out_indices=(2, 4)).eval()
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [64 // 8, 64 // 8]  # dilated: output stride 8


def test_timms_pretrained_cfg_overlay_is_applied() -> None:
    """timm.create_model(..., pretrained_cfg_overlay=...) replaces fields of the model's data configuration, as for
    timm's own models (it was dropped)."""
    import timm

    register_timm_models()
    model = timm.create_model("pkg_repvgg_tiny", pretrained_cfg_overlay=dict(input_size=(3, 64, 64), mean=(0.5,) * 3))
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 64, 64) and config["mean"] == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["architecture"] == "pkg_repvgg_tiny"


def test_an_smp_unet_on_our_encoder_converts_exactly() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    register_timm_models()
    net = smp.Unet("tu-pkg_repvgg_tiny", encoder_weights=None, classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
        fused = reparameterize_model(net)  # the encoder's blocks fuse inside smp's model
        assert expected.shape == (2, 3, 64, 64) and relative_error(fused(x), expected) <= 1e-5


@pytest.mark.parametrize("out_indices", [(2, 3, 4), (1, 3), (0, 1, 2, 3, 4), (4,)])
def test_feature_info_answers_as_timm_does(out_indices: tuple[int, ...]) -> None:
    """An FPN sizes itself from feature_info: ours must list what forward returns, exactly as timm's RepVGG does."""
    import timm

    from repvgg import create_model

    with torch.device("meta"):
        ours = create_model("repvgg_a0", features_only=True, out_indices=out_indices)
        theirs = timm.create_model("repvgg_a0", features_only=True, out_indices=out_indices)
        maps = ours(torch.empty(1, 3, 64, 64))
    assert ours.feature_info.channels() == theirs.feature_info.channels() == [m.shape[1] for m in maps]
    assert ours.feature_info.reduction() == theirs.feature_info.reduction() == [64 // m.shape[-1] for m in maps]
    assert ours.feature_info.channels(1) == theirs.feature_info.channels(1)  # an index names a stage of the network
    assert ours.feature_info.channels([0, 4]) == theirs.feature_info.channels([0, 4])


@pytest.mark.parametrize("name", ["pkg_repvgg_a0", "pkg_repvggplus_tiny"])
def test_registered_models_meet_timms_model_tests(name: str) -> None:
    """What timm's own tests/test_models.py checks (default_cfg, pool_size, unpooled heads, every parameter trained),
    on a small input."""
    import timm

    register_timm_models()
    assert name in timm.list_models("pkg_*", name_matches_cfg=True)  # so timm selects its backward/script tests
    model = timm.create_model(name, num_classes=5).eval()
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg and cfg["architecture"] == name and cfg["pool_size"] == (7, 7)
    assert timm.get_pretrained_cfg(name).pool_size == (7, 7)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model.forward_features(x).shape[-2:] == cfg["pool_size"]
        model.reset_classifier(0, "")
        assert model(x).shape == (1, model.num_features, 7, 7)
        unpooled = timm.create_model(name, num_classes=0, global_pool="").eval()
        assert unpooled(x).dim() == 4
    with pytest.raises(ValueError, match="num_classes=0"):
        timm.create_model(name, num_classes=3, global_pool="")
    model = timm.create_model(name, num_classes=4).train()
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    assert all(p.grad is not None for p in model.parameters())

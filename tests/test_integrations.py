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


def test_an_smp_unet_on_our_encoder_converts_exactly() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    register_timm_models()
    net = smp.Unet("tu-pkg_repvgg_tiny", encoder_weights=None, classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
        fused = reparameterize_model(net)  # the encoder's blocks fuse inside smp's model
        assert expected.shape == (2, 3, 64, 64) and relative_error(fused(x), expected) <= 1e-5

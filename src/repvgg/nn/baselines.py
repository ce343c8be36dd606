"""The models RepVGG is compared with: torchvision's ResNets and VGG-16 (the paper's baselines) and timm's RepVGG.

For a fair speed comparison the paper folds every conv-BN pair of the baselines into one biased conv,
as RepVGG's conversion does for its own blocks (Ding et al., RepVGG, CVPR 2021, Sec. 4.1).
:func:`repvgg.nn.fusion.fuse_conv_bn` does that for any module that ``torch.fx`` can trace, with the
package's float64 fusion arithmetic.

torchvision and timm are imported only inside the functions that need them.
"""

from __future__ import annotations

import logging

from torch import nn

from repvgg.nn.fusion import fuse_conv_bn

__all__ = ["TORCHVISION_BASELINES", "timm_peer", "torchvision_baseline"]

log = logging.getLogger(__name__)

#: The paper's baselines (Table 4), by torchvision builder name.
TORCHVISION_BASELINES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16")


def torchvision_baseline(name: str, *, num_classes: int = 1000, fuse: bool = True) -> nn.Module:
    """A torchvision baseline (randomly initialised, eval mode), its conv-BN pairs fused by default.

    Random weights time the same as trained ones; the benchmark needs no downloads.
    """
    if name not in TORCHVISION_BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(TORCHVISION_BASELINES)}")
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes).eval()
    return fuse_conv_bn(model) if fuse else model


def timm_peer(name: str, *, num_classes: int = 1000) -> nn.Module:
    """timm's implementation of RepVGG ``name`` (random weights), re-parameterized by timm itself, eval mode.

    Raises:
        ValueError: if timm has no model of that name.
    """
    import timm
    from timm.utils.model import reparameterize_model as timm_reparameterize

    if name not in timm.list_models(name):
        raise ValueError(f"timm has no model named {name!r} (its RepVGGs: {', '.join(timm.list_models('repvgg*'))})")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    return timm_reparameterize(model).eval()

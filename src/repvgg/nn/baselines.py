"""The models RepVGG is compared with, by name: any torchvision classifier, any timm model, and timm's RepVGG.

* ``resnet50``, ``efficientnet_b0``, ``regnet_x_3_2gf``, ``vgg16``, ...: a torchvision classification builder
  (``torchvision.models.list_models(torchvision.models)``);
* ``timm:NAME``: a timm model, where the paper's exact variant only exists there.

For a fair speed comparison the paper folds every conv-BN pair of the baselines into one biased conv, as
RepVGG's conversion does for its own blocks (Ding et al., RepVGG, CVPR 2021, Sec. 4.1).
[`repvgg.nn.fusion.fuse_conv_bn`][repvgg.nn.fusion.fuse_conv_bn] does that for any module that ``torch.fx`` can trace
(timm's norm-activation layers included), with the package's float64 fusion arithmetic. Weights are random: they time
the same as trained ones, and the benchmark needs no downloads.

torchvision and timm are imported only inside the functions that need them.
"""

from __future__ import annotations

import difflib
import logging

from torch import nn

from repvgg.nn.fusion import fuse_conv_bn

__all__ = ["TIMM_PREFIX", "TORCHVISION_BASELINES", "baseline", "check_baseline_name", "timm_peer"]

log = logging.getLogger(__name__)

#: The paper's baselines of Table 4, by torchvision builder name.
TORCHVISION_BASELINES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16")
#: How a timm model is named as a baseline.
TIMM_PREFIX = "timm:"


def _torchvision_classifiers() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def check_baseline_name(name: str) -> str:
    """``name`` if it names a torchvision classifier or (``timm:NAME``) a timm model, checked without building it.

    Raises:
        ValueError: an unknown name, with the close matches.
    """
    if name.startswith(TIMM_PREFIX):
        import timm

        known = timm.list_models()
        wanted = name[len(TIMM_PREFIX):]
        if wanted in known:
            return name
        close = [TIMM_PREFIX + m for m in difflib.get_close_matches(wanted, known, n=5, cutoff=0.6)]
        raise ValueError(f"timm has no model named {wanted!r}" + (f"; close: {', '.join(close)}" if close else ""))
    known = _torchvision_classifiers()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    raise ValueError(f"unknown baseline {name!r}: not a torchvision classifier"
                     + (f"; close: {', '.join(close)}" if close else "")
                     + f" (a timm model is named {TIMM_PREFIX}NAME)")


def baseline(name: str, *, num_classes: int = 1000, fuse: bool = True) -> nn.Module:
    """Baseline ``name`` (see the module docstring): random weights, eval mode, conv-BN pairs folded by default.

    Raises:
        ValueError: an unknown name, with the close matches.
    """
    check_baseline_name(name)
    if name.startswith(TIMM_PREFIX):
        import timm

        model = timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes).eval()
    else:
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

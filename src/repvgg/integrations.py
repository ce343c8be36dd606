"""Use this package's models where other libraries expect timm models (timm itself, segmentation_models_pytorch's
``tu-`` encoders, mmpretrain's ``TIMMBackbone``).

``register_timm_models()`` adds every registered model to timm's registry under ``pkg_<name>`` (timm has its
own ``repvgg_*``), so ``timm.create_model("pkg_repvgg_a0", features_only=True, output_stride=8)`` and
``smp.Unet("tu-pkg_repvgg_a0")`` build this package's RepVGG (training-time, convertible, with its checkpoint
formats). Needs timm (the ``train`` extra).
"""

from __future__ import annotations

from typing import Any

from repvgg.io.loading import create_model
from repvgg.nn.model import RepVGG
from repvgg.nn.registry import list_models
from repvgg.segmentation.backbones import dilated_stage_settings

__all__ = ["TIMM_PREFIX", "register_timm_models"]

TIMM_PREFIX = "pkg_"

#: Arguments timm's factory passes that describe its own pretrained-weight handling.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _builder(name: str, timm_name: str) -> Any:
    def build(pretrained: bool = False, **kwargs: Any) -> RepVGG:
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        output_stride = kwargs.pop("output_stride", None) or 32
        if output_stride != 32:
            strides, dilations = dilated_stage_settings(output_stride)
            kwargs.update(strides=strides, dilations=dilations)
        return create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = timm_name
    build.__qualname__ = timm_name
    build.__doc__ = f"This package's {name} (see repvgg.create_model)."
    return build


def register_timm_models(prefix: str = TIMM_PREFIX) -> list[str]:
    """Register every model of [`repvgg.list_models`][repvgg.nn.registry.list_models] with timm as ``prefix + name``;
    the timm names.

    Idempotent: names already registered are left as they are.
    """
    from timm.models import is_model, register_model

    names = []
    for name in list_models():
        timm_name = prefix + name
        if not is_model(timm_name):
            register_model(_builder(name, timm_name))
        names.append(timm_name)
    return names

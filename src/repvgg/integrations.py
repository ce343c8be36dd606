"""Use this package's models where other libraries expect timm models (timm itself, segmentation_models_pytorch's
``tu-`` encoders, mmpretrain's ``TIMMBackbone``).

``register_timm_models()`` adds every registered model to timm's registry under ``pkg_<name>`` (timm has its
own ``repvgg_*``), so ``timm.create_model("pkg_repvgg_a0", features_only=True, output_stride=8)`` and
``smp.Unet("tu-pkg_repvgg_a0")`` build this package's RepVGG (training-time, convertible, with its checkpoint
formats). RepVGGplus comes without its training-only auxiliary heads, since timm's training takes one output.
Needs timm (the ``train`` extra).
"""

from __future__ import annotations

from typing import Any

import torch

from repvgg.io.loading import create_model
from repvgg.nn.model import RepVGG
from repvgg.nn.registry import build_model, list_models
from repvgg.dense.backbones import dilated_stage_settings

__all__ = ["TIMM_PREFIX", "default_cfgs", "register_timm_models"]

TIMM_PREFIX = "pkg_"

#: Arguments timm's factory passes that describe its own pretrained-weight handling.
_TIMM_ONLY = ("pretrained_cfg", "cache_dir")

#: timm name -> the model's ``pretrained_cfg``. timm's ``register_model`` reads its entrypoint module's
#: ``default_cfgs``: a model registered with one answers ``timm.get_pretrained_cfg`` and
#: ``list_models(name_matches_cfg=True)`` like timm's own.
default_cfgs: dict[str, dict[str, Any]] = {}


def _builder(name: str, timm_name: str) -> Any:
    def build(pretrained: bool = False, **kwargs: Any) -> RepVGG:
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})  # timm's: fields of pretrained_cfg replaced
        output_stride = kwargs.pop("output_stride", None) or 32
        if output_stride != 32:
            strides, dilations = dilated_stage_settings(output_stride)
            kwargs.update(strides=strides, dilations=dilations)
        model = create_model(name, pretrained=pretrained, **kwargs)
        model.pretrained_cfg.update(overlay, architecture=timm_name)
        model.reparameterize()  # RepVGGplus's training-only heads: timm's training takes one output
        return model

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
            with torch.device("meta"):  # the configuration only: nothing allocated
                cfg = dict(build_model(name).pretrained_cfg, architecture=timm_name)
            default_cfgs[timm_name] = cfg
            register_model(_builder(name, timm_name))
        names.append(timm_name)
    return names

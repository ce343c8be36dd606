"""The models RepVGG is compared with: torchvision's ResNets and VGG-16 (the paper's baselines) and timm's RepVGG.

For a fair speed comparison the paper folds every conv-BN pair of the baselines into one biased conv,
as RepVGG's conversion does for its own blocks (Ding et al., RepVGG, CVPR 2021, Sec. 4.1).
:func:`fuse_conv_bn` does that for any module that ``torch.fx`` can trace, with the package's float64
fusion arithmetic (:func:`repvgg.nn.fusion.fuse_conv_bn_modules`).

torchvision and timm are imported only inside the functions that need them.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from repvgg.nn.fusion import fuse_conv_bn_modules

__all__ = ["TORCHVISION_BASELINES", "count_conv_bn_pairs", "fuse_conv_bn", "timm_peer", "torchvision_baseline"]

log = logging.getLogger(__name__)

#: The paper's baselines (Table 4), by torchvision builder name.
TORCHVISION_BASELINES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16")


def _fusable_pairs(graph_module: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(conv node, bn node) pairs where a BatchNorm2d reads the output of a Conv2d used by nothing else."""
    modules = dict(graph_module.named_modules())
    pairs = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), nn.Conv2d)
            and len(source.users) == 1
        ):
            pairs.append((source, node))
    return pairs


def count_conv_bn_pairs(model: nn.Module) -> int:
    """Number of conv -> BN pairs :func:`fuse_conv_bn` would fold (0 if ``model`` cannot be traced)."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - tracing fails in many model-specific ways
        return 0
    return len(_fusable_pairs(traced))


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every conv -> BatchNorm pair folded into one biased conv.

    Uses ``torch.fx`` to find the pairs, so it works for any traceable network whatever its module
    names (ResNet blocks, downsample shortcuts, VGG-BN, ...). A BN whose conv output is also used
    elsewhere is left alone. Models that cannot be traced are returned as an unfused copy, with a
    warning in the log.
    """
    model = copy.deepcopy(model).eval()
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001
        log.warning("conv-BN fusion skipped for %s: torch.fx cannot trace it (%s)", type(model).__name__, err)
        return model
    modules = dict(traced.named_modules())
    pairs = _fusable_pairs(traced)
    for conv_node, bn_node in pairs:
        fused = fuse_conv_bn_modules(modules[conv_node.target], modules[bn_node.target])
        parent_name, _, attr = conv_node.target.rpartition(".")
        setattr(traced.get_submodule(parent_name) if parent_name else traced, attr, fused)
        bn_node.replace_all_uses_with(conv_node)
        traced.graph.erase_node(bn_node)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    log.debug("fused %d conv-BN pairs of %s", len(pairs), type(model).__name__)
    return traced.eval()


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

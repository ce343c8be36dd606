"""Exact re-parameterization arithmetic: folding BatchNorm into convolutions and merging kernels.

All arithmetic happens in float64 on the tensors' own device and is cast back by the caller, so deep
models stay exact (Ding et al., RepVGG, CVPR 2021, Sec. 3.3):

* a BN following a conv folds into it: ``W' = W * gamma / std`` and ``b' = beta - mean * gamma / std``;
* an identity branch is a 1x1 conv whose kernel is the identity (per group);
* 1x1 kernels are zero-padded to 3x3 (the centre tap) and the kernels and biases of all branches add.
"""

from __future__ import annotations

import copy
import logging
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "is_batchnorm", "fold_norm", "fold_batchnorm", "identity_kernel", "pad_kernel_to", "fuse_conv_bn_modules",
    "fuse_conv_bn", "count_conv_bn_pairs",
]

log = logging.getLogger(__name__)

_FUSION_DTYPE = torch.float64


def is_batchnorm(module: nn.Module) -> bool:
    """True for any batch-norm layer that folds into a convolution at inference time.

    ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` (all ``torch.nn.modules.batchnorm._BatchNorm``) and
    frozen batch norms that keep the same buffers (torchvision's ``FrozenBatchNorm2d``).
    """
    if isinstance(module, _BatchNorm):
        return True
    return all(isinstance(getattr(module, name, None), Tensor) for name in ("running_mean", "running_var")) \
        and isinstance(getattr(module, "eps", None), float)


def fold_norm(kernel: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """Kernel and bias (float64) of one conv equal to ``norm(conv(x))`` with ``kernel``, at inference time.

    ``norm`` is a batch norm (`is_batchnorm`) or ``nn.Identity`` (no norm). Anything else, such
    as GroupNorm or LayerNorm, depends on the input and cannot be folded: a ValueError says which.
    """
    if isinstance(norm, nn.Identity):
        kernel = kernel.to(_FUSION_DTYPE)
        return kernel, kernel.new_zeros(kernel.shape[0])
    return fold_batchnorm(kernel, norm)


class _FoldableNorm(Protocol):
    """What folding reads from a batch norm (`is_batchnorm` checks the statistics and ``eps``)."""

    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float


def _check_batchnorm(bn: nn.Module) -> _FoldableNorm:
    if not is_batchnorm(bn):
        raise ValueError(
            f"cannot fold {type(bn).__name__} into a convolution: only batch norm (BatchNorm2d, SyncBatchNorm, "
            "frozen batch norm) has fixed statistics at inference time; use batch norm in the branches"
        )
    # is_batchnorm checked the attributes by type; nn.Module's __getattr__ types every one as Tensor | Module
    return cast(_FoldableNorm, bn)


def _running_stats(bn: _FoldableNorm) -> tuple[Tensor, Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{bn} has no running statistics (track_running_stats=False), so it cannot be folded into a "
            "convolution; build the model with track_running_stats=True."
        )
    return bn.running_mean, bn.running_var


def fold_batchnorm(kernel: Tensor | None, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Fold an inference-time BatchNorm into the preceding convolution kernel.

    ``kernel`` is the conv weight (``None`` means the BN stands alone, as in the identity branch,
    and only the per-channel scale is returned in place of a kernel: shape ``(C,)``).
    Returns ``(kernel * gamma / std, beta - mean * gamma / std)`` in float64. Differentiable with
    respect to the conv weight and the BN affine parameters; always uses the running statistics.
    Any batch norm (`is_batchnorm`) folds; another norm is a ValueError naming its type.
    """
    norm = _check_batchnorm(bn)
    mean, var = _running_stats(norm)
    mean = mean.to(_FUSION_DTYPE)
    std = (var.to(_FUSION_DTYPE) + norm.eps).sqrt()
    gamma = norm.weight.to(_FUSION_DTYPE) if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.to(_FUSION_DTYPE) if norm.bias is not None else torch.zeros_like(mean)
    scale = gamma / std
    bias = beta - mean * scale
    if kernel is None:
        return scale, bias
    return kernel.to(_FUSION_DTYPE) * scale.reshape(-1, 1, 1, 1), bias


def identity_kernel(
    channels: int,
    groups: int,
    kernel_size: int = 3,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = _FUSION_DTYPE,
) -> Tensor:
    """The ``kernel_size`` x ``kernel_size`` grouped-conv kernel that computes the identity.

    Output channel ``c`` sees only the inputs of its own group, so its single non-zero tap sits at
    input index ``c % (channels // groups)``, in the centre of the kernel.
    """
    if channels % groups:
        raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, device=device, dtype=dtype)
    centre = kernel_size // 2
    out_index = torch.arange(channels, device=device)
    kernel[out_index, out_index % per_group, centre, centre] = 1
    return kernel


def pad_kernel_to(kernel: Tensor, kernel_size: int) -> Tensor:
    """Zero-pad a square kernel symmetrically to ``kernel_size`` (e.g. 1x1 to 3x3, tap in the centre)."""
    pad = (kernel_size - kernel.shape[-1]) // 2
    if pad < 0 or kernel.shape[-1] + 2 * pad != kernel_size:
        raise ValueError(f"cannot centre a {kernel.shape[-1]}x{kernel.shape[-1]} kernel in {kernel_size}x{kernel_size}")
    return F.pad(kernel, [pad, pad, pad, pad]) if pad else kernel


@torch.no_grad()
def fuse_conv_bn_modules(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """Return a new biased ``nn.Conv2d`` equal to ``bn(conv(x))`` at inference time.

    Used for fair baselines (the paper fuses the conv-BN pairs of ResNets and VGG too).
    The conv's own bias, if any, is folded in as well.
    """
    kernel, bias = fold_batchnorm(conv.weight, bn)
    if conv.bias is not None:
        scale, _ = fold_batchnorm(None, bn)
        bias = bias + conv.bias.to(_FUSION_DTYPE) * scale
    fused = torch.nn.utils.skip_init(  # no random initialisation of weights that are overwritten next
        nn.Conv2d,
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    fused.weight.copy_(kernel.to(conv.weight.dtype))
    fused.bias.copy_(bias.to(conv.weight.dtype))
    return fused


#: Batch norms whose forward is the norm and then only these submodules, in this order (timm's ``BatchNormAct2d``:
#: norm, dropout, activation): they fold into the conv and leave the submodules behind.
_NORM_THEN = ("drop", "act")


def _foldable(module: nn.Module) -> bool:
    """A batch norm that is nothing but the norm (torch's and frozen ones), or the norm followed by
    `_NORM_THEN` (timm's norm-activation layers); anything else is left alone."""
    if not is_batchnorm(module):
        return False
    children = [name for name, _ in module.named_children()]
    if not children:
        return type(module).__module__.startswith("torch") or not isinstance(module, _BatchNorm) \
            or type(module).forward is _BatchNorm.forward
    return type(module).__name__ == "BatchNormAct2d" and children == [c for c in _NORM_THEN if c in children]


class _NormLeafTracer(torch.fx.Tracer):
    """``torch.fx`` tracing that keeps every batch norm (timm's norm-activation layers too) as one module call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.GraphModule(model, _NormLeafTracer().trace(model))


def _fusable_pairs(graph_module: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(conv node, bn node) pairs where a foldable batch norm reads the output of a Conv2d used by nothing else."""
    modules = dict(graph_module.named_modules())
    pairs = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not _foldable(modules.get(node.target, nn.Identity())):
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
    """Number of conv -> BN pairs [`fuse_conv_bn`][repvgg.nn.fusion.fuse_conv_bn] would fold (0 if ``model`` cannot be
    traced)."""
    try:
        traced = _trace(model)
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
        traced = _trace(model)
    except Exception as err:  # noqa: BLE001
        log.warning("conv-BN fusion skipped for %s: torch.fx cannot trace it (%s)", type(model).__name__, err)
        return model
    modules = dict(traced.named_modules())
    pairs = _fusable_pairs(traced)
    for conv_node, bn_node in pairs:
        conv_name, bn_name = conv_node.target, bn_node.target
        assert isinstance(conv_name, str) and isinstance(bn_name, str)  # call_module nodes name their module
        bn = modules[bn_name]
        fused = fuse_conv_bn_modules(modules[conv_name], bn)
        parent_name, _, attr = conv_name.rpartition(".")
        setattr(traced.get_submodule(parent_name) if parent_name else traced, attr, fused)
        after = [child for _, child in bn.named_children()]
        if after:  # what the norm layer did after normalising (dropout, activation) stays, in its place
            parent_name, _, attr = bn_name.rpartition(".")
            setattr(traced.get_submodule(parent_name) if parent_name else traced, attr, nn.Sequential(*after))
            bn_node.args = (conv_node,)
            continue
        bn_node.replace_all_uses_with(conv_node)
        traced.graph.erase_node(bn_node)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    log.debug("fused %d conv-BN pairs of %s", len(pairs), type(model).__name__)
    return traced.eval()

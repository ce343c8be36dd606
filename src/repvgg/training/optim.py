"""The training recipe's optimizer pieces: parameter groups, the learning-rate schedule, custom L2.

Following the paper and the official release (github.com/DingXiaoH/RepVGG): SGD with momentum 0.9,
weight decay 1e-4 on conv and FC kernels and on the identity-branch BN scale, none on biases, on the BN
scales of the 3x3 and 1x1 branches (and a post-addition BN) or on the classifier bias; learning rate 0.1
per 256 images, linear warm-up, cosine decay to 0. (The official README recommends decaying
``rbr_identity.weight``; its ``train/optimizer.py`` ``set_weight_decay`` does so. The Caffe-style
doubled learning rate for biases of the early ``train.py`` is not followed; its comment says it made
no difference.)

Optional "custom L2" (``RepVGGBlock.get_custom_L2`` in the official ``repvgg.py``, the same term in
``repvggplus_custom_L2.py``; enabled by ``--custwd`` in the official ``train.py`` of June 2021, commit
a3b0320). Per training-time block, with the 3x3 kernel ``K3``, the 1x1 kernel ``K1`` and the branches'
BN scales ``t3 = gamma3 / sqrt(var3 + eps)``, ``t1 = gamma1 / sqrt(var1 + eps)`` (per output channel,
treated as constants)::

    l2 = sum(K3**2) - sum(K3[..., 1, 1]**2) + sum((K3[..., 1, 1] * t3 + K1 * t1)**2 / (t3**2 + t1**2))

The eight outer taps get plain L2; the centre tap is decayed through the centre of the equivalent fused
kernel, normalised so the coefficient is comparable to plain L2. The identity branch is not part of it.
The loss adds ``0.5 * weight_decay * l2`` summed over blocks, and the optimizer then does not decay the
3x3 and 1x1 kernels (``'rbr_dense' in key or 'rbr_1x1' in key`` gets weight decay 0 in the official
``sgd_optimizer``); everything else is grouped as without custom L2, so the identity BN scale is still
decayed by the optimizer (the official name test does not exclude it), once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from repvgg.nn.block import ConvBN, RepVGGBlock
from repvgg.nn.fusion import fold_batchnorm, is_batchnorm

__all__ = ["OPTIMIZERS", "parameter_groups", "build_optimizer", "learning_rate", "custom_l2", "block_kernels"]


def _identity_scales(model: nn.Module) -> set[int]:
    """``id`` of the identity-branch BN scales (decayed in the official recipe, unlike other BN scales)."""
    scales: set[int] = set()
    for module in model.modules():
        if isinstance(module, RepVGGBlock) and module.rbr_identity is not None and is_batchnorm(module.rbr_identity):
            weight = module.rbr_identity.weight
            if isinstance(weight, Tensor):  # None for a BN without affine parameters
                scales.add(id(weight))
    return scales


def block_kernels(model: nn.Module) -> set[int]:
    """``id`` of the 3x3 and 1x1 kernels of every training-time RepVGG block (custom L2 replaces their decay)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, RepVGGBlock) and module.rbr_dense is not None:  # a training-time block
            ids.add(id(module.rbr_dense.conv.weight))
            if module.rbr_1x1 is not None:
                ids.add(id(module.rbr_1x1.conv.weight))
    return ids


def parameter_groups(model: nn.Module, weight_decay: float, *, custom_l2: bool = False) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group (official recipe).

    With ``custom_l2`` the 3x3 and 1x1 kernels of training-time blocks (`block_kernels`) move to
    the non-decayed group, because `custom_l2` regularises them; the identity BN scale stays
    decayed, and fused blocks keep optimizer decay on their single kernel (custom L2 skips them).
    """
    skip = block_kernels(model) if custom_l2 else set()
    identity_scales = _identity_scales(model)
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # Kernels (conv, FC) have more than one dimension; biases and BN parameters have one.
        decays = param.ndim > 1 or id(param) in identity_scales
        if decays and id(param) not in skip:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


#: The optimizers a run may use.
OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                    *, custom_l2: bool = False, optimizer: str = "sgd") -> torch.optim.Optimizer:
    """SGD with momentum, or AdamW (``momentum`` its first beta; its weight decay decoupled), over
    `parameter_groups`."""
    groups = parameter_groups(model, weight_decay, custom_l2=custom_l2)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    if optimizer != "sgd":
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr``, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def _branch_scale(branch: ConvBN, dtype: torch.dtype) -> Tensor:
    """Per-output-channel ``gamma / sqrt(running_var + eps)`` of a branch's BN, detached, shaped (C, 1, 1, 1).

    A branch without its own BN (the post-addition-BN variant) has scale 1: the shared BN after the sum
    scales both branches alike, and a common scale cancels in the normalised centre term.
    """
    conv: nn.Conv2d = branch.conv
    if not is_batchnorm(branch.bn):
        return torch.ones(conv.out_channels, 1, 1, 1, device=conv.weight.device, dtype=dtype)
    scale, _ = fold_batchnorm(None, branch.bn)
    return scale.detach().to(dtype).reshape(-1, 1, 1, 1)


def _block_custom_l2(block: RepVGGBlock) -> Tensor:
    """The official per-block custom L2 term (see the module docstring)."""
    assert block.rbr_dense is not None
    dense = block.rbr_dense.conv.weight
    dtype = torch.promote_types(dense.dtype, torch.float32)
    k3 = dense.to(dtype)
    if block.rbr_1x1 is None:
        # No 1x1 branch: the centre term reduces to K3_centre**2 (the formula at t1 = 0), i.e. plain L2.
        return k3.square().sum()
    k1 = block.rbr_1x1.conv.weight.to(dtype)
    t3 = _branch_scale(block.rbr_dense, dtype)
    t1 = _branch_scale(block.rbr_1x1, dtype)
    centre = k3[:, :, 1:2, 1:2]  # the tap the 1x1 kernel is added to at fusion (also when dilated)
    outer = k3.square().sum() - centre.square().sum()
    # The floor only matters when both BN scales of a channel are exactly 0 (the official term is 0/0
    # there): that channel's centre then contributes 0 instead of NaN.
    norm = (t3.square() + t1.square()).clamp_min(torch.finfo(dtype).tiny)
    return outer + ((centre * t3 + k1 * t1).square() / norm).sum()


def custom_l2(model: nn.Module) -> Tensor:
    """The official release's "custom L2" summed over all training-time RepVGG blocks of ``model``.

    Per block: plain L2 on the eight outer taps of the 3x3 kernel, and on the centre tap the squared
    centre of the equivalent fused kernel, ``(K3_c * t3 + K1 * t1)**2 / (t3**2 + t1**2)``, with the BN
    scales ``t3``, ``t1`` detached, so gradients reach the 3x3 and 1x1 kernels only. The identity branch
    is left out. A block without a 1x1 branch gets plain L2 on its 3x3 kernel; grouped kernels need no
    special case (the term is per weight); fused (deploy) blocks are skipped. Add
    ``0.5 * weight_decay * custom_l2(model)`` to the loss and build the optimizer with
    ``parameter_groups(..., custom_l2=True)``. Returns a 0-dim tensor (0 when there is no such block).
    """
    total: Tensor | None = None
    for module in model.modules():
        if isinstance(module, RepVGGBlock) and not module.deploy:
            term = _block_custom_l2(module)
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros(()) if param is None else param.new_zeros(())
    return total

"""The training recipe's optimizer pieces: parameter groups, the learning-rate schedule, custom L2.

Following the paper and the official release: SGD with momentum 0.9, weight decay 1e-4 on conv and
FC kernels and on the identity-branch BN scale, none on biases, on the BN scales of the 3x3 and 1x1
branches (and a post-addition BN) or on the classifier bias; learning rate 0.1 per 256 images,
linear warm-up, cosine decay to 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from repvgg.nn.block import RepVGGBlock

__all__ = ["parameter_groups", "build_optimizer", "learning_rate", "custom_l2", "block_kernels"]


def _decays(name: str, param: Tensor) -> bool:
    if name.endswith("bias"):
        return False
    if param.ndim > 1:  # conv and FC kernels
        return True
    return name.endswith("rbr_identity.weight")  # the identity BN scale is decayed in the official recipe


def block_kernels(model: nn.Module) -> set[int]:
    """``id`` of the branch conv kernels of every RepVGG block (custom L2 replaces their decay)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, RepVGGBlock) and not module.deploy:
            ids.add(id(module.rbr_dense.conv.weight))
            if module.rbr_1x1 is not None:
                ids.add(id(module.rbr_1x1.conv.weight))
    return ids


def parameter_groups(model: nn.Module, weight_decay: float, *, custom_l2: bool = False) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group (official recipe).

    With ``custom_l2`` the branch kernels are not decayed by the optimizer; :func:`custom_l2`
    decays their fused equivalent instead.
    """
    skip = block_kernels(model) if custom_l2 else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _decays(name, param) and id(param) not in skip:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                    *, custom_l2: bool = False) -> torch.optim.SGD:
    """SGD with momentum over :func:`parameter_groups`."""
    return torch.optim.SGD(
        parameter_groups(model, weight_decay, custom_l2=custom_l2), lr=lr, momentum=momentum,
    )


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr``, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def custom_l2(model: nn.Module) -> Tensor:
    """Sum of squared *equivalent* 3x3 kernels of all training-time blocks.

    The official release's "custom L2": decaying the kernel the block will become after fusion,
    rather than each branch on its own. Built on the differentiable
    :meth:`~repvgg.nn.block.RepVGGBlock.equivalent_kernel_bias`. Add ``0.5 * weight_decay * custom_l2``
    to the loss (and use ``parameter_groups(..., custom_l2=True)``).
    """
    total: Tensor | None = None
    for module in model.modules():
        if isinstance(module, RepVGGBlock) and not module.deploy:
            kernel, _ = module.equivalent_kernel_bias()
            term = kernel.float().square().sum()
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters())
        return param.new_zeros(())
    return total

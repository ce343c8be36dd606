"""Parameter and multiply-add counts, computed from the modules themselves (nothing typed in).

Multiply-adds come from `torch.utils.flop_counter.FlopCounterMode` (convolutions and matmuls;
BN, ReLU and additions are not counted, as in the paper's "Theo FLOPs"). Registered models are built on
the ``meta`` device, so counting even RepVGG-D2se allocates no weight memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from repvgg.limits import check_img_size
from repvgg.nn.convert import reparameterize_model

__all__ = ["count_parameters", "count_macs", "ModelComplexity", "model_complexity"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """Multiply-adds of one forward pass of ``model`` on an input of ``input_shape``.

    The input lives on the model's device (use the ``meta`` device for free counting). The model is
    run in eval mode and its mode is restored afterwards.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(torch.zeros(input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class ModelComplexity:
    """Size and cost of one model at one input size, training-time and fused."""

    name: str
    img_size: int
    params_train: int
    params_deploy: int
    macs_train: int
    macs_deploy: int

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def model_complexity(name: str, img_size: int = 224, num_classes: int = 1000) -> ModelComplexity:
    """Count parameters and multiply-adds of registered model ``name`` before and after fusion."""
    from repvgg.nn.registry import build_model

    check_img_size(img_size, "img_size", low=1)
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes)
    shape = (1, model.in_chans, img_size, img_size)
    params_train, macs_train = count_parameters(model), count_macs(model, shape)
    fused = reparameterize_model(model, inplace=True)
    return ModelComplexity(
        name=name,
        img_size=img_size,
        params_train=params_train,
        params_deploy=count_parameters(fused),
        macs_train=macs_train,
        macs_deploy=count_macs(fused, shape),
    )

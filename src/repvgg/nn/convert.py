"""Model-level conversion: fuse every RepVGG block of any ``nn.Module`` into plain 3x3 convs."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

__all__ = ["reparameterize_model", "is_reparameterizable"]

M = TypeVar("M", bound=nn.Module)


def is_reparameterizable(module: nn.Module) -> bool:
    """True for modules that know how to fuse themselves (they define ``reparameterize()``)."""
    return callable(getattr(module, "reparameterize", None))


@torch.no_grad()
def reparameterize_model(model: M, inplace: bool = False) -> M:
    """Fuse every block of ``model`` that has a ``reparameterize()`` method and return the model in eval mode.

    Works for a RepVGG and for any network that uses RepVGG blocks as parts (a backbone inside a
    segmenter, say): every submodule with ``reparameterize()`` is fused (e.g. all
    :class:`~repvgg.nn.block.RepVGGBlock`), the rest is left alone. Conversion always uses the BN running
    statistics, so the result is the same whether or not the caller called ``.eval()`` first.

    Args:
        model: the training-time model.
        inplace: modify ``model`` itself instead of a deep copy (saves memory for big models).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparameterize_model expects an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    for name, module in list(target.named_modules()):
        if is_reparameterizable(module):
            try:
                module.reparameterize()
            except ValueError as err:
                raise ValueError(f"cannot convert {name or type(module).__name__}: {err}") from err
    return target.eval()

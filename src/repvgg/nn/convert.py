"""Model-level conversion: fuse every RepVGG block of any ``nn.Module`` into plain 3x3 convs."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["reparameterize_model", "is_reparameterizable", "convert_checkpoint"]

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
    for module in list(target.modules()):
        if is_reparameterizable(module):
            module.reparameterize()
    return target.eval()


@torch.no_grad()
def convert_checkpoint(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    arch: str | None = None,
    img_size: int = 224,
    batch_size: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Convert a training-time weights file (official, timm or own) into a deploy ``.safetensors`` file.

    The equivalence of the two models is checked on a random batch before anything is written;
    the report gives the largest absolute and the relative output difference.
    """
    from repvgg.io.weights import load_model, save_weights

    destination = Path(destination)
    if destination.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {destination}")
    model = load_model(source, arch=arch).eval()
    if model.deploy:
        raise ValueError(f"{source} is already fused (deploy weights); there is nothing to convert")
    plain = reparameterize_model(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, model.in_chans, img_size, img_size, generator=gen)
    expected, actual = model(x).double(), plain(x).double()
    max_abs = float((actual - expected).abs().max())
    relative = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    if not relative <= 1e-4:
        raise RuntimeError(f"converted model deviates from the original (relative error {relative:.3g}); not saved")
    save_weights(plain, destination, extra={"converted_from": Path(source).name})
    return {
        "input": str(source),
        "output": str(destination),
        "model": model.name,
        "params_train": sum(p.numel() for p in model.parameters()),
        "params_deploy": sum(p.numel() for p in plain.parameters()),
        "check_input": [batch_size, model.in_chans, img_size, img_size],
        "max_abs_diff": max_abs,
        "relative_error": relative,
    }

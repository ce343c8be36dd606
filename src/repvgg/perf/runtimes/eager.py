"""PyTorch as it is, and with NHWC (channels-last) weights and activations, which oneDNN and cuDNN prefer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from repvgg.perf.runtimes.base import BuildContext, Runner, Unsupported

__all__ = ["build_channels_last", "build_eager"]


def build_eager(ctx: BuildContext) -> Runner:
    return ctx.model()


def build_channels_last(ctx: BuildContext) -> Runner:
    if ctx.example.dim() != 4:
        raise Unsupported("channels_last needs 4-D (N, C, H, W) inputs")
    model = ctx.model().to(memory_format=torch.channels_last)

    def run(x: Tensor) -> Any:
        return model(x.contiguous(memory_format=torch.channels_last))

    return run

"""PyTorch as it is, and with NHWC (channels-last) weights and activations, which oneDNN and cuDNN prefer; in
float32, or in float16 / bfloat16 with the model's weights in that precision."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from repvgg.perf.runtimes.base import BuildContext, Runner, Unsupported, float32_outputs

__all__ = ["build_channels_last", "build_eager"]


def build_eager(ctx: BuildContext) -> Runner:
    model, dtype = ctx.model(), ctx.dtype
    if dtype == torch.float32:
        return model
    return lambda x: float32_outputs(model(x.to(dtype)))


def build_channels_last(ctx: BuildContext) -> Runner:
    if ctx.example.dim() != 4:
        raise Unsupported("channels_last needs 4-D (N, C, H, W) inputs")
    model, dtype = ctx.model().to(memory_format=torch.channels_last), ctx.dtype

    def run(x: Tensor) -> Any:
        return float32_outputs(model(x.to(dtype).contiguous(memory_format=torch.channels_last)))

    return run

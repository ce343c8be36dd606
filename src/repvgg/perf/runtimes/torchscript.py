"""A traced, frozen and ``torch.jit.optimize_for_inference``-d graph."""

from __future__ import annotations

import warnings

import torch

from repvgg.perf.runtimes.base import BuildContext, Runner, float32_outputs

__all__ = ["build_torchscript"]


def build_torchscript(ctx: BuildContext) -> Runner:
    model, dtype = ctx.model(), ctx.dtype
    with warnings.catch_warnings():  # TorchScript is in maintenance mode and says so on every call
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, ctx.example.to(dtype), check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    if dtype == torch.float32:
        return frozen
    return lambda x: float32_outputs(frozen(x.to(dtype)))

"""A traced, frozen and ``torch.jit.optimize_for_inference``-d graph."""

from __future__ import annotations

import warnings

import torch

from repvgg.perf.runtimes.base import BuildContext, Runner

__all__ = ["build_torchscript"]


def build_torchscript(ctx: BuildContext) -> Runner:
    with warnings.catch_warnings():  # TorchScript is in maintenance mode and says so on every call
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ctx.model(), ctx.example, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))

"""``torch.compile``: Inductor with frozen weights on the CPU, and with CUDA graphs (``reduce-overhead``) on CUDA."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from repvgg.perf.runtimes.base import BuildContext, Runner, Unsupported, float32_outputs

__all__ = ["build_compile", "build_compile_cuda_graph"]


def build_compile(ctx: BuildContext) -> Runner:
    model, dtype = ctx.model(), ctx.dtype
    if ctx.example.device.type == "cpu":
        # Freezing turns weights into constants so Inductor can pre-pack them for oneDNN.
        compiled = torch.compile(model, dynamic=False, options={"freezing": True})
    else:
        model = model.to(memory_format=torch.channels_last)
        compiled = torch.compile(model, dynamic=False)  # max-autotune would take minutes per model

    def run(x: Tensor) -> Any:
        x = x.to(dtype)
        return float32_outputs(compiled(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x))

    return run


def build_compile_cuda_graph(ctx: BuildContext) -> Runner:
    if ctx.example.device.type != "cuda":
        raise Unsupported("compile_cuda_graph needs a CUDA device")
    model, dtype = ctx.model().to(memory_format=torch.channels_last), ctx.dtype
    compiled = torch.compile(model, dynamic=False, mode="reduce-overhead")

    def run(x: Tensor) -> Any:
        # Outputs of a CUDA-graph replay are overwritten by the next replay: hand out copies.
        return float32_outputs(tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t,
                                        compiled(x.to(dtype).contiguous(memory_format=torch.channels_last))))

    return run

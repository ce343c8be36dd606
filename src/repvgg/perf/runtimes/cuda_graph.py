"""The channels-last eager model captured once per input shape as a CUDA graph and replayed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from repvgg.perf.runtimes.base import BuildContext, Runner, Unsupported, float32_outputs

__all__ = ["build_cuda_graph"]


def build_cuda_graph(ctx: BuildContext) -> Runner:
    """Capture the channels_last eager model once per input shape; each call copies in and replays.

    Follows the capture recipe of the CUDA-graphs documentation: warm up on a side stream (cuDNN
    picks its algorithms and the allocator settles), capture, then replay on static buffers.
    """
    if ctx.example.device.type != "cuda":
        raise Unsupported("cuda_graph needs a CUDA device")
    model, dtype = ctx.model().to(memory_format=torch.channels_last), ctx.dtype
    graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, Tensor, Any]] = {}

    def capture(x: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Any]:
        static_in = torch.empty_like(x, dtype=dtype, memory_format=torch.channels_last)
        static_in.copy_(x)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                model(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Capture on the warm-up stream: library handles and workspaces (cuBLAS for the classifier)
        # were created for that stream during warm-up, not in the middle of the capture.
        with torch.cuda.graph(graph, stream=side):
            static_out = model(static_in)
        return graph, static_in, static_out

    def run(x: Tensor) -> Any:
        key = (tuple(x.shape), x.device)
        if key not in graphs:
            graphs[key] = capture(x)
        graph, static_in, static_out = graphs[key]
        static_in.copy_(x)
        graph.replay()
        return float32_outputs(tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, static_out))

    return run

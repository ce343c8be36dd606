"""The ONNX graph compiled by OpenVINO for the CPU (float32), when ``openvino`` is installed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from repvgg.perf.runtimes.base import BuildContext, Runner, Unsupported

__all__ = ["build_openvino"]


def build_openvino(ctx: BuildContext) -> Runner:
    if ctx.example.device.type != "cpu" or ctx.example.dtype != torch.float32:
        raise Unsupported("the openvino candidate runs float32 on the CPU")
    import openvino

    core = openvino.Core()
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",  # CPUs with bf16 units would otherwise run in bf16
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
    }
    compiled = core.compile_model(core.read_model(str(ctx.onnx_path())), "CPU", config)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(x: Tensor) -> Any:
        result = request.infer({0: x.detach().contiguous().numpy()})
        tensors = [torch.from_numpy(result[o].copy()) for o in outputs]
        return tensors[0] if len(tensors) == 1 else tensors

    return run

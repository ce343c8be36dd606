"""OpenVINO, Intel's inference runtime, on the CPU: the float32 ONNX graph compiled for float32 or (where the
CPU computes it natively) bfloat16, or the same QDQ INT8 file ONNX Runtime runs; one thread per PyTorch
thread. Used when ``openvino`` is installed (the ``deploy`` extra)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from repvgg.perf.environment import cpu_features
from repvgg.perf.runtimes.base import BuildContext, Runner, Unsupported

__all__ = ["build_openvino"]

#: OpenVINO's ``INFERENCE_PRECISION_HINT`` for each precision (INT8 comes from the QDQ graph itself).
_HINTS = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}


def build_openvino(ctx: BuildContext) -> Runner:
    if ctx.example.device.type != "cpu" or ctx.precision not in _HINTS:
        raise Unsupported("the openvino candidate runs float32, bfloat16 and INT8 on the CPU")
    if ctx.precision == "bfloat16" and not cpu_features().native_bf16:
        raise Unsupported("this CPU has no native BF16 (AVX512-BF16 or AMX)")
    import openvino

    core = openvino.Core()
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": _HINTS[ctx.precision],  # without it, CPUs with bf16 units run float32 in bf16
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
    }
    graph = ctx.int8_onnx_path() if ctx.precision == "int8" else ctx.onnx_path()
    compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(x: Tensor) -> Any:
        result = request.infer({0: x.detach().float().contiguous().numpy()})
        tensors = [torch.from_numpy(result[o].copy()).float() for o in outputs]
        return tensors[0] if len(tensors) == 1 else tensors

    return run

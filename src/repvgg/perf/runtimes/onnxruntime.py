"""The model exported to ONNX and run by ONNX Runtime on the CPU: the float32 graph, or its QDQ INT8 version
(per-channel INT8 weights, UINT8 activations calibrated on images; ONNX Runtime fuses each QDQ pair around a
convolution into an INT8 convolution, VNNI or AMX where the CPU has them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from repvgg.perf.runtimes.base import BuildContext, Runner, Unsupported

__all__ = ["build_onnxruntime"]


def build_onnxruntime(ctx: BuildContext) -> Runner:
    if ctx.example.device.type != "cpu" or ctx.precision not in ("float32", "int8"):
        raise Unsupported("the onnxruntime candidate runs float32 and INT8 on the CPU")
    from repvgg.io.export import onnxruntime_session

    session = onnxruntime_session(ctx.int8_onnx_path() if ctx.precision == "int8" else ctx.onnx_path())
    input_name = session.get_inputs()[0].name

    def run(x: Tensor) -> Any:
        outputs = session.run(None, {input_name: x.detach().float().contiguous().numpy()})
        tensors = [torch.from_numpy(o) for o in outputs]
        return tensors[0] if len(tensors) == 1 else tensors

    return run

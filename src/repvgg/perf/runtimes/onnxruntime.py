"""The model exported to ONNX and run by ONNX Runtime on the CPU (float32)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from repvgg.perf.runtimes.base import BuildContext, Runner, Unsupported

__all__ = ["build_onnxruntime"]


def build_onnxruntime(ctx: BuildContext) -> Runner:
    if ctx.example.device.type != "cpu" or ctx.example.dtype != torch.float32:
        raise Unsupported("the onnxruntime candidate runs float32 on the CPU")
    from repvgg.io.export import onnxruntime_session

    session = onnxruntime_session(ctx.onnx_path())
    input_name = session.get_inputs()[0].name

    def run(x: Tensor) -> Any:
        outputs = session.run(None, {input_name: x.detach().contiguous().numpy()})
        tensors = [torch.from_numpy(o) for o in outputs]
        return tensors[0] if len(tensors) == 1 else tensors

    return run

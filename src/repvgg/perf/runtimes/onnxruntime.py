"""The model exported to ONNX and run by ONNX Runtime on the CPU: the float32 graph, or its QDQ INT8 version
(per-channel INT8 weights, UINT8 activations calibrated on images; ONNX Runtime fuses each QDQ pair around a
convolution into an INT8 convolution, VNNI or AMX where the CPU has them)."""

from __future__ import annotations

from repvgg.io.onnx_run import onnx_runner
from repvgg.perf.runtimes.base import BuildContext, Runner, Unsupported

__all__ = ["build_onnxruntime"]


def build_onnxruntime(ctx: BuildContext) -> Runner:
    if ctx.example.device.type != "cpu" or ctx.precision not in ("float32", "int8"):
        raise Unsupported("the onnxruntime candidate runs float32 and INT8 on the CPU")
    return onnx_runner(ctx.int8_onnx_path() if ctx.precision == "int8" else ctx.onnx_path(), "onnxruntime")

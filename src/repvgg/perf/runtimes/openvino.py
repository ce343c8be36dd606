"""OpenVINO, Intel's inference runtime, on the CPU: the float32 ONNX graph compiled for float32 or (where the
CPU computes it natively) bfloat16, or the same QDQ INT8 file ONNX Runtime runs; one thread per PyTorch
thread. Used when ``openvino`` is installed (the ``deploy`` extra)."""

from __future__ import annotations

from repvgg.io.onnx_run import onnx_runner
from repvgg.measure.environment import cpu_features
from repvgg.perf.runtimes.base import BuildContext, Runner, Unsupported

__all__ = ["build_openvino"]

#: OpenVINO's ``INFERENCE_PRECISION_HINT`` for each precision (INT8 comes from the QDQ graph itself); without
#: it, CPUs with BF16 units would run a float32 graph in bfloat16.
_HINTS = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}


def build_openvino(ctx: BuildContext) -> Runner:
    if ctx.example.device.type != "cpu" or ctx.precision not in _HINTS:
        raise Unsupported("the openvino candidate runs float32, bfloat16 and INT8 on the CPU")
    if ctx.precision == "bfloat16" and not cpu_features().native_bf16:
        raise Unsupported("this CPU has no native BF16 (AVX512-BF16 or AMX)")
    import openvino  # noqa: F401 - unavailable (not failed) when it is not installed

    graph = ctx.int8_onnx_path() if ctx.precision == "int8" else ctx.onnx_path()
    return onnx_runner(graph, "openvino", precision_hint=_HINTS[ctx.precision])

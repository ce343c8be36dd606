"""The runtimes the fast path weighs, one module each, behind one table (`CANDIDATES`).

======================  =====  ====================================================================
``eager``               both   PyTorch as it is (`.eager`)
``channels_last``       both   PyTorch with NHWC weights and activations (oneDNN / cuDNN prefer it)
``torchscript``         both   traced, frozen and ``torch.jit.optimize_for_inference``-d graph
``onnxruntime``         cpu    the model exported to ONNX and run by ONNX Runtime (float32, or QDQ INT8)
``openvino``            cpu    the same ONNX graphs compiled by OpenVINO (float32, native bfloat16, INT8)
``compile``             both   ``torch.compile`` (with weight freezing on the CPU; slow to build)
``cuda_graph``          cuda   channels_last eager captured once per input shape and replayed
``compile_cuda_graph``  cuda   ``torch.compile(mode="reduce-overhead")`` (Inductor + CUDA graphs)
======================  =====  ====================================================================

Adding a runtime is one module with a ``build_*(ctx) -> runner`` function (raising
`Unsupported` where it does not apply) and one row here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from repvgg.perf.runtimes.base import PRECISIONS, TORCH_DTYPES, BuildContext, Builder, Runner, Unsupported
from repvgg.perf.runtimes.compiled import build_compile, build_compile_cuda_graph
from repvgg.perf.runtimes.cuda_graph import build_cuda_graph
from repvgg.perf.runtimes.eager import build_channels_last, build_eager
from repvgg.perf.runtimes.onnxruntime import build_onnxruntime
from repvgg.perf.runtimes.openvino import build_openvino
from repvgg.perf.runtimes.torchscript import build_torchscript

__all__ = ["CANDIDATES", "PRECISIONS", "TORCH_DTYPES", "BuildContext", "Candidate", "Runner", "Unsupported",
           "default_candidates"]


#: The floating precisions a PyTorch model computes in.
_TORCH = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Candidate:
    """One way to run a model: its builder, the devices it runs on, those it is tried on by default, and the
    precisions it computes in."""

    build: Builder
    devices: tuple[str, ...]
    default_on: tuple[str, ...]
    precisions: tuple[str, ...] = _TORCH


#: Every candidate runtime, in order of preference when timings tie or are not measured. The CPU tries
#: eager, channels_last, torchscript, onnxruntime and openvino by default (compilation takes tens of
#: seconds on a small CPU, so ``compile`` only when asked for); CUDA tries eager, channels_last,
#: cuda_graph and the two compiled forms.
CANDIDATES: dict[str, Candidate] = {
    "onnxruntime": Candidate(build_onnxruntime, ("cpu",), ("cpu",), ("float32", "int8")),
    "openvino": Candidate(build_openvino, ("cpu",), ("cpu",), ("float32", "bfloat16", "int8")),
    "cuda_graph": Candidate(build_cuda_graph, ("cuda",), ("cuda",)),
    "compile_cuda_graph": Candidate(build_compile_cuda_graph, ("cuda",), ("cuda",)),
    "compile": Candidate(build_compile, ("cpu", "cuda"), ("cuda",)),
    "torchscript": Candidate(build_torchscript, ("cpu", "cuda"), ("cpu",)),
    "channels_last": Candidate(build_channels_last, ("cpu", "cuda"), ("cpu", "cuda")),
    "eager": Candidate(build_eager, ("cpu", "cuda"), ("cpu", "cuda")),
}


def default_candidates(device: torch.device | str) -> list[str]:
    """Candidate names tried on ``device`` when none are given."""
    kind = torch.device(device).type
    return [name for name, c in CANDIDATES.items() if kind in c.default_on]

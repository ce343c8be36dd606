"""What every runtime of the fast path is built from: a build context in, a runner out.

A runner takes float32 batches and returns float32 outputs whatever precision it computes in, so runners of
every precision are interchangeable: compared with each other, timed side by side, and swapped by the caller.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["BuildContext", "Builder", "PRECISIONS", "Runner", "TORCH_DTYPES", "Unsupported", "float32_outputs"]

#: A built runtime: an input batch in, the model's output out.
Runner = Callable[[Tensor], Any]

#: The precisions a runtime can compute in, and the torch dtype of the floating ones.
PRECISIONS = ("float32", "float16", "bfloat16", "int8")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Unsupported(ValueError):
    """A candidate does not apply to this device, precision or input (reported as unavailable, not failed)."""


def float32_outputs(output: Any) -> Any:
    """``output`` with every floating tensor in float32 (a reduced-precision runner's outputs, made comparable)."""
    return tree_map(lambda t: t.float() if isinstance(t, Tensor) and t.is_floating_point() else t, output)


class BuildContext:
    """What a candidate builder gets: the precision to compute in, a fresh copy of the prepared float32 model
    (or of it in that precision), the float32 example input, and ONNX files made once and shared by the
    ONNX-based runtimes: the float32 graph, and its QDQ INT8 version calibrated on ``calibration``."""

    def __init__(self, prepared: nn.Module, example: Tensor, workdir: Path, *, precision: str = "float32",
                 calibration: Any = None, files: dict[str, Path] | None = None) -> None:
        self._prepared = prepared
        self.example = example
        self.precision = precision
        self.calibration = calibration
        self._workdir = workdir
        self._files = {} if files is None else files  # shared by the contexts of one model: each file made once

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of a floating precision (runtimes that run PyTorch models cannot compute INT8)."""
        if self.precision not in TORCH_DTYPES:
            raise Unsupported(f"{self.precision} runs through ONNX Runtime or OpenVINO, not a PyTorch model")
        return TORCH_DTYPES[self.precision]

    def model(self) -> nn.Module:
        """A copy of the prepared model in `dtype`."""
        return copy.deepcopy(self._prepared).to(self.dtype)

    def onnx_path(self) -> Path:
        """The float32 ONNX graph of the prepared model (dynamic batch)."""
        if "onnx" not in self._files:
            from repvgg.io.export import export_onnx_file

            self._files["onnx"] = export_onnx_file(self._prepared, self.example, self._workdir / "model.onnx")
        return self._files["onnx"]

    def int8_onnx_path(self) -> Path:
        """The QDQ INT8 graph (per-channel INT8 weights, UINT8 activations) calibrated on `calibration`."""
        if self.calibration is None:
            raise Unsupported("INT8 needs calibration images (calibration=...)")
        if "int8" not in self._files:
            from repvgg.quant.qdq import quantize_onnx

            int8 = self._workdir / "model.int8.onnx"
            quantize_onnx(self.onnx_path(), int8, self.calibration)
            self._files["int8"] = int8
        return self._files["int8"]


#: A runtime's builder: a build context in, a runner out (or `Unsupported`).
Builder = Callable[[BuildContext], Runner]

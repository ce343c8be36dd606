"""What every runtime of the fast path is built from: a build context in, a runner out."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = ["BuildContext", "Builder", "Runner", "Unsupported"]

#: A built runtime: an input batch in, the model's output out.
Runner = Callable[[Tensor], Any]


class Unsupported(ValueError):
    """A candidate does not apply to this device, dtype or input (reported as unavailable, not failed)."""


class BuildContext:
    """What a candidate builder gets: a fresh copy of the prepared model, the example input, and an
    ONNX file exported once and shared by the ONNX-based runtimes."""

    def __init__(self, prepared: nn.Module, example: Tensor, workdir: Path) -> None:
        self._prepared = prepared
        self.example = example
        self._workdir = workdir
        self._onnx: Path | None = None

    def model(self) -> nn.Module:
        return copy.deepcopy(self._prepared)

    def onnx_path(self) -> Path:
        if self._onnx is None:
            from repvgg.io.export import export_onnx_file

            self._onnx = export_onnx_file(self._prepared, self.example, self._workdir / "model.onnx")
        return self._onnx


#: A runtime's builder: a build context in, a runner out (or :class:`Unsupported`).
Builder = Callable[[BuildContext], Runner]

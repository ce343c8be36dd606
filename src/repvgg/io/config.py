"""What ``repvgg export`` writes, as typed data (its flags are made from it; no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

from repvgg.limits import MAX_IMG_SIZE, MIN_OPSET
from repvgg.options import RunConfig, option

__all__ = ["ExportConfig"]


@dataclass(frozen=True)
class ExportConfig(RunConfig):
    """Options of [`repvgg.export_onnx`][repvgg.io.export.export_onnx] (``repvgg export``)."""

    img_size: int | None = option(None, "input resolution", default_help="the size the checkpoint was trained at, "
                                  "else 224", low=8, high=MAX_IMG_SIZE)
    opset: int | None = option(None, f"ONNX opset, {MIN_OPSET} up to the newest the installed onnx knows (the file is "
                                     "checked to have it)", default_help="the exporter's")
    num_classes: int | None = option(None, "classes of a model built by name", default_help="1000", low=1)
    dynamic_hw: bool = option(False, "dynamic height and width too (checked against PyTorch at two input sizes)")
    fp16: bool = option(False, "half-precision weights and input (checked against the float32 model within 1e-2)")
    check_batch_size: int = option(3, "batch size of the ONNX Runtime parity check", low=1, cli=False)
    overwrite: bool = option(False, "replace an existing output file (a file the command reads is never replaced)")
    format: str = option("onnx", "onnx: the file OUT; triton or ovms: a model repository in the folder OUT "
                                 "(OUT/NAME/1/model.onnx, for Triton also config.pbtxt and labels.txt); MODEL may "
                                 "then be an ONNX file too (e.g. quantize's INT8), taken as it is",
                         choices=("onnx", "triton", "ovms"))
    name: str | None = option(None, "model repositories: the model's folder and name",
                              default_help="the architecture's name, or the ONNX file's stem")
    max_batch: int = option(8, "Triton: max_batch_size", low=1, high=1024)
    max_wait_ms: float = option(5.0, "Triton: the dynamic batcher's longest queue delay", low=0, high=10_000)
    backend: str = option("onnxruntime", "Triton: the backend that runs model.onnx",
                          choices=("onnxruntime", "openvino"))

    def __post_init__(self) -> None:
        self._check_types()

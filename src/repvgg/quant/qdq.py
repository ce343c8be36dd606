"""The QDQ INT8 format every INT8 path of this package writes, and what reads it.

An INT8 model here is an ONNX graph in which each quantized tensor passes through a QuantizeLinear /
DequantizeLinear pair (QDQ): per-channel symmetric INT8 weights, per-tensor asymmetric UINT8 activations.
ONNX Runtime fuses the pairs around a convolution into an INT8 convolution; TensorRT and OpenVINO read the
same file. Post-training quantization (`repvgg.quant.ptq`) writes it with ONNX Runtime's static
quantizer calibrated on images (`quantize_onnx`); quantization-aware training (`repvgg.quant.qat`)
trains with fake quantizers of the same scheme (`qat_qconfig_mapping`) and exports them as QDQ pairs
(`export_fake_quant_onnx`). Both are inspected (`quantized_conv_count`) and scored
(`evaluate_onnx`) the same way.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from repvgg.errors import RunFailed
from repvgg.io.card import write_onnx_metadata
from repvgg.io.onnx_run import onnx_runner, onnxruntime_session
from repvgg.quant.config import CALIBRATION_METHODS
from repvgg.serialization import atomic_write
from repvgg.training.data import collate_readable
from repvgg.training.evaluate import compare_models
from repvgg.training.distributed import dataset_size

__all__ = ["CALIBRATION_METHODS", "Calibration", "batches", "calibration_batches", "calibration_subset",
           "evaluate_onnx", "export_fake_quant_onnx", "qat_qconfig_mapping", "quantize_onnx", "quantize_static_qdq",
           "quantized_conv_count"]



def batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``dataset`` in order, in batches of ``batch_size``."""
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_readable)


#: Calibration images: a dataset of ``(image, label)`` samples, or an iterable (a list, a DataLoader) of image
#: batches or of ``(images, labels)`` batches.
Calibration = Dataset | Iterable[Any]


def calibration_batches(calibration: Calibration, batch_size: int = 32) -> list[np.ndarray]:
    """The calibration images as float32 arrays ``(N, C, H, W)``; a ValueError if there are none."""
    if isinstance(calibration, Dataset):
        arrays = [images.numpy() for images, _ in batches(calibration, batch_size)]
    else:
        arrays = []
        for item in calibration:
            images = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                raise ValueError("calibration must yield image batches (N, C, H, W) or (images, labels) batches, got "
                                 f"{type(images).__name__}")
            arrays.append(images.detach().float().cpu().contiguous().numpy())
    if not arrays or not sum(len(a) for a in arrays):
        raise ValueError("the calibration data holds no images")
    return arrays


class _CalibrationReader:
    """ONNX Runtime's calibration data reader over a fixed set of image batches."""

    def __init__(self, arrays: list[np.ndarray], input_name: str) -> None:
        self.batches = arrays
        self.input_name = input_name
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {self.input_name: self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0


def calibration_subset(dataset: Dataset, count: int, *, seed: int = 0) -> Subset:
    """``count`` images of ``dataset`` in a fixed random order (all of them if there are fewer)."""
    if count < 1:
        raise ValueError(f"the calibration set must hold at least one image, got calib_images={count}")
    size = dataset_size(dataset)
    if size == 0:
        raise ValueError("the calibration data is empty: the training split holds no images")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return Subset(dataset, order)


def quantize_onnx(fp32_path: Path, int8_path: Path, calibration: Calibration, *, method: str = "minmax",
                  batch_size: int = 32) -> None:
    """Static INT8 quantization of an ONNX file (QDQ, per-channel INT8 weights, UINT8 activations) whose
    activation ranges come from ``calibration`` (`Calibration`)."""
    _check_method(method)
    session = onnxruntime_session(fp32_path)
    expected = session.get_inputs()[0].shape
    arrays = calibration_batches(calibration, batch_size)
    if list(arrays[0].shape[1:]) != [d for d in expected[1:]]:
        raise ValueError(f"calibration images have shape {tuple(arrays[0].shape[1:])} but the model takes "
                         f"{tuple(expected[1:])}; calibrate on the data the model was trained for")
    quantize_static_qdq(fp32_path, int8_path, arrays, session.get_inputs()[0].name, method=method)


def _check_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(CALIBRATION_METHODS)}")


def quantize_static_qdq(fp32_path: Path, int8_path: Path, inputs: list[np.ndarray], input_name: str, *,
                        method: str = "minmax", nodes: list[str] | None = None) -> None:
    """ONNX Runtime's static quantizer in this package's QDQ scheme, its activation ranges from running ``inputs``
    (each a whole input of the graph); ``nodes`` restricts it to those nodes (the rest stays in float)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    _check_method(method)
    reader = _CalibrationReader(inputs, input_name)
    # ONNX Runtime's recommended preparation: shape inference and graph optimisation before quantizing.
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8_path.with_name(int8_path.stem + ".prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared), str(int8_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]), nodes_to_quantize=nodes,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    prepared.unlink()


def qat_qconfig_mapping() -> Any:
    """Fake quantizers matching ONNX Runtime's QDQ INT8 (and exportable as QuantizeLinear/DequantizeLinear)."""
    from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver, QConfig, QConfigMapping)

    activation = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                        dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def export_fake_quant_onnx(model: nn.Module, example: torch.Tensor, path: Path, *,
                           metadata: Mapping[str, str] | None = None) -> Path:
    """The fake-quantized network as a QDQ ONNX file (dynamic batch, height and width), observers frozen, with
    ``metadata`` (e.g. a [`ModelCard`][repvgg.io.card.ModelCard]'s) in its ``metadata_props``."""
    model = copy.deepcopy(model).cpu().eval()
    model.apply(torch.ao.quantization.disable_observer)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), \
            atomic_write(path) as tmp:
        warnings.simplefilter("ignore")
        # Fake quantizers export as QuantizeLinear/DequantizeLinear with the TorchScript-based exporter.
        torch.onnx.export(model, (example.cpu(),), str(tmp), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}})
        if metadata:
            write_onnx_metadata(tmp, metadata)
    return path


def quantized_conv_count(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(convolutions whose weight and input come through DequantizeLinear or are QLinearConv, all convs)``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type in ("Conv", "QLinearConv")]

    def dequantized(name: str) -> bool:
        node = producers.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    quantized = sum(1 for n in convs if n.op_type == "QLinearConv" or all(dequantized(i) for i in n.input[:2]))
    return quantized, len(convs)


def evaluate_onnx(paths: list[Path], dataset: Dataset, *, batch_size: int = 64) -> dict[str, Any]:
    """Top-1 of each ONNX file on ``dataset`` and how often each predicts what the first does
    ([`compare_models`][repvgg.training.evaluate.compare_models] over ONNX Runtime sessions).

    Raises:
        ValueError: the dataset is empty.
        RunFailed: an output was NaN or infinite, so the accuracy could not be measured.
    """
    correct = torch.zeros(len(paths), dtype=torch.float64)

    def score(i: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
        correct[i] += float((logits.argmax(1) == labels).sum())

    comparison = compare_models([onnx_runner(p) for p in paths], batches(dataset, batch_size), score=score)
    if comparison.images == 0:
        raise ValueError("the validation set is empty; INT8 accuracy cannot be measured")
    for path, finite in zip(paths, comparison.finite):
        if not finite:
            raise RunFailed(f"{path.name} produced NaN or infinite outputs; its accuracy cannot be measured, "
                            "so it is not written")
    return {"images": comparison.images, "top1": [100.0 * float(c) / comparison.images for c in correct],
            "agreement": [1.0, *comparison.agreement]}

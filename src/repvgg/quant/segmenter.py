"""INT8 segmenters (``repvgg quantize`` of a ``seg-train`` file): the exported segmenter (normalisation, network and
argmax in one graph) with every convolution but the last (the class logits) quantized by ONNX Runtime (QDQ,
per-channel INT8 weights, UINT8 activations, calibrated on training crops). The INT8 file is written only if its mean
IoU on the validation set is within the guard's limit of the float32 file's
([`require_miou`][repvgg.quant.guard.require_miou]), in ONNX Runtime and, where it is installed, in OpenVINO."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from repvgg.io.card import read_onnx_metadata, write_onnx_metadata
from repvgg.io.onnx_run import installed_runtimes
from repvgg.limits import check_batch_memory, check_int
from repvgg.quant.guard import DEFAULT_MAX_MIOU_DROP, require_miou
from repvgg.quant.qdq import calibration_subset, quantize_static_qdq, quantized_conv_count
from repvgg.segmentation.evaluate import validation_data
from repvgg.segmentation.export import export_segmenter, onnx_segmenter, unnormalized
from repvgg.segmentation.metrics import ConfusionMatrix
from repvgg.dense.weights import trained_data_folder
from repvgg.segmentation.weights import load_segmenter
from repvgg.serialization import check_output_path, commit_staged, scratch_folder, staging_folder

__all__ = ["SEGMENTER_CALIB_IMAGES", "SegmenterQuantizeReport", "quantize_segmenter"]

#: Calibration crops of a segmenter by default.
SEGMENTER_CALIB_IMAGES = 64


@dataclass(frozen=True)
class SegmenterQuantizeReport:
    """What [`quantize_segmenter`][repvgg.quant.segmenter.quantize_segmenter] wrote and measured (mIoU in percent)."""

    path: str
    calibration_images: int
    val_images: int
    miou_fp32: float
    miou_int8: float
    miou_drop: float
    max_miou_drop: float
    quantized_convs: int
    convs: int
    miou_int8_by_runtime: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def mean_iou(run: Callable[[torch.Tensor], torch.Tensor], dataset: Any, num_classes: int) -> float:
    """The mean IoU (percent) of ``run`` (an image in [0, 1] in, its mask out) over ``dataset``'s labelled images."""
    matrix = ConfusionMatrix(num_classes)
    for index in range(len(dataset)):
        image, target = dataset[index]
        matrix.update(run(unnormalized(image)).long()[None], target[None])
    return 100 * matrix.compute().mean_iou


def quantize_segmenter(weights: str | os.PathLike[str], output: str | os.PathLike[str], *,
                       data: str | os.PathLike[str] | None = None, calib_images: int | None = None,
                       calibration: str = "minmax", max_miou_drop: float = DEFAULT_MAX_MIOU_DROP,
                       overwrite: bool = False) -> SegmenterQuantizeReport:
    """Quantize the segmenter in ``weights`` to an INT8 ONNX file at ``output``, calibrated on ``calib_images``
    training crops (default `SEGMENTER_CALIB_IMAGES`) of ``data`` (default: the data the file records), and scored
    against its float32 export by mean IoU on the validation images.

    Raises:
        LimitExceeded: the calibration images, held at once, would not fit in memory.
        PrecisionRejected: INT8 loses more than ``max_miou_drop`` mIoU points in a runtime; nothing is written.
    """
    calib_images = check_int(SEGMENTER_CALIB_IMAGES if calib_images is None else calib_images, "calib_images",
                             low=1, high=100_000)
    data = None if data is None else os.fspath(data)
    model, meta = load_segmenter(weights)
    output = check_output_path(output, reads=[weights, data, trained_data_folder(meta)], overwrite=overwrite,
                               suffixes=(".onnx",))
    bundle = validation_data(meta, model.config, data, None)
    crop = bundle.crop_size
    check_batch_memory(min(calib_images, len(bundle.train)), (3, crop, crop), "--calib-images", held=True,
                       input_size=False)
    calibration_set = calibration_subset(bundle.train, calib_images)
    inputs = [unnormalized(calibration_set[i][0]).numpy() for i in range(len(calibration_set))]
    classes = model.config.num_classes
    with staging_folder(output) as staging:
        fp32 = scratch_folder(staging) / "fp32.onnx"
        export_segmenter(weights, fp32, data=data)
        staged = Path(staging) / output.name
        quantize_static_qdq(fp32, staged, inputs, "image", method=calibration, nodes=_quantizable_convs(fp32))
        write_onnx_metadata(staged, read_onnx_metadata(fp32) | {"precision": "int8", "quantized": json.dumps(
            ["every conv but the last"])})
        fp32_miou = mean_iou(onnx_segmenter(fp32), bundle.val, classes)
        judged = {runtime: mean_iou(onnx_segmenter(staged, runtime), bundle.val, classes)
                  for runtime in installed_runtimes()}
        for runtime, miou in judged.items():
            require_miou(fp32_miou, miou, max_miou_drop, f"the INT8 segmenter for {weights} run by {runtime}")
        quantized, total = quantized_conv_count(staged)
        fp32.unlink()
        commit_staged(staged, output)
    return SegmenterQuantizeReport(str(output), len(inputs), len(bundle.val), fp32_miou, judged["onnxruntime"],
                                   fp32_miou - judged["onnxruntime"], max_miou_drop, quantized, total, judged)


def _quantizable_convs(path: Path) -> list[str]:
    """Every Conv node of the graph but the last, which computes the class logits."""
    import onnx

    convs = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    return convs[:-1]

"""INT8 detectors (``repvgg quantize`` of a ``det-train`` file): the exported detector with its backbone and feature
pyramid quantized by ONNX Runtime (QDQ, calibrated on training images) and its head's last layers left in float, as
detectors are deployed where a head's outputs need the range (ultralytics keeps RT-DETR's head in float; the yolo
kind's head quantizes all but its 1x1 predictions). The INT8 file is written
only if its COCO AP on the validation set is within the guard's limit of the float32 file's
([`require_ap`][repvgg.quant.guard.require_ap]), in ONNX Runtime and, where it is installed, in OpenVINO (which
compiles the quantized graph its own way)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from repvgg.dense.weights import trained_data_folder
from repvgg.detection.evaluate import check_categories, validation_data
from repvgg.detection.export import export_detector, onnx_detector
from repvgg.detection.metrics import coco_scores, detect
from repvgg.detection.weights import load_detector
from repvgg.io.card import read_onnx_metadata, write_onnx_metadata
from repvgg.io.onnx_run import installed_runtimes
from repvgg.limits import check_batch_memory, check_int
from repvgg.quant.guard import DEFAULT_MAX_AP_DROP, require_ap
from repvgg.quant.qdq import calibration_subset, quantize_static_qdq, quantized_conv_count
from repvgg.serialization import check_output_path, commit_staged, scratch_folder, staging_folder

__all__ = ["DETECTOR_CALIB_IMAGES", "DetectorQuantizeReport", "QUANTIZED_PARTS", "quantize_detector"]

#: The parts of the exported graph that are quantized (node name prefixes), per detector kind: FCOS's and
#: RetinaNet's heads (GroupNorm) stay in float; the yolo head's convs are quantized but for its last 1x1 predictions.
QUANTIZED_PARTS = {"fcos": ("/backbone/",), "retinanet": ("/backbone/",),
                   "yolo": ("/backbone/", "/head/stems", "/head/cls_convs", "/head/reg_convs")}
#: Calibration images of a detector by default: what docs/detection.md measured the AP guard with (the default run
#: loses less than the guard's default 1 AP point with 128, and more with 256).
DETECTOR_CALIB_IMAGES = 128


@dataclass(frozen=True)
class DetectorQuantizeReport:
    """What [`quantize_detector`][repvgg.quant.detector.quantize_detector] wrote and measured."""

    path: str
    calibration_images: int
    val_images: int
    ap_fp32: float
    ap50_fp32: float
    ap_int8: float
    ap50_int8: float
    ap_drop: float  # points of 100
    max_ap_drop: float
    quantized_convs: int
    convs: int
    ap_int8_by_runtime: dict[str, float]  # each runtime the file was judged in

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _onnx_detector(path: Path, runtime: str = "onnxruntime") -> Any:
    run = onnx_detector(path, runtime)
    return lambda images: [run(image) for image in images]


def quantize_detector(weights: str | os.PathLike[str], output: str | os.PathLike[str], *,
                      data: str | os.PathLike[str] | None = None, calib_images: int | None = None,
                      calibration: str = "minmax", max_ap_drop: float = DEFAULT_MAX_AP_DROP,
                      overwrite: bool = False) -> DetectorQuantizeReport:
    """Quantize the detector in ``weights`` to an INT8 ONNX file at ``output``, calibrated on ``calib_images``
    training images (default ``DETECTOR_CALIB_IMAGES``, 128) of ``data`` (a COCO folder; default: the data the file
    records), and scored against its float32 export on the validation images.

    Raises:
        LimitExceeded: the calibration images, held at once, would not fit in memory.
        PrecisionRejected: INT8 loses more than ``max_ap_drop`` AP points; nothing is written.
    """
    calib_images = check_int(DETECTOR_CALIB_IMAGES if calib_images is None else calib_images, "calib_images", low=1,
                             high=100_000)
    data = None if data is None else os.fspath(data)
    output = check_output_path(output, reads=[weights, data], overwrite=overwrite, suffixes=(".onnx",))
    model, meta = load_detector(weights)
    check_output_path(output, reads=[trained_data_folder(meta)], overwrite=True)  # nor into the data it records
    size = model.config.image_size
    bundle = validation_data(meta, size, data)
    check_categories(weights, model.config.num_classes, meta.get("classes"), list(bundle.val.coco.classes))
    check_batch_memory(min(calib_images, len(bundle.train)), (3, size, size), "--calib-images", held=True,
                       input_size=False)
    calibration_set = calibration_subset(bundle.train, calib_images)
    inputs = [(calibration_set[i][0].float() / 255).numpy() for i in range(len(calibration_set))]
    loader = DataLoader(bundle.val, batch_size=8)
    with staging_folder(output) as staging:
        fp32 = scratch_folder(staging) / "fp32.onnx"
        export_detector(weights, fp32, data=data)
        staged = Path(staging) / output.name
        parts = QUANTIZED_PARTS[model.config.kind]
        nodes = _quantizable_convs(fp32, parts)
        quantize_static_qdq(fp32, staged, inputs, "image", method=calibration, nodes=nodes)
        write_onnx_metadata(staged, read_onnx_metadata(fp32) | {"precision": "int8",
                                                               "quantized": json.dumps(list(parts))})
        fp32_scores = coco_scores(bundle.val.coco, detect(_onnx_detector(fp32), loader))
        judged = {runtime: coco_scores(bundle.val.coco, detect(_onnx_detector(staged, runtime), loader))
                  for runtime in installed_runtimes()}
        for runtime, scores in judged.items():
            require_ap(fp32_scores["ap"], scores["ap"], max_ap_drop,
                       f"the INT8 detector for {weights} run by {runtime}")
        int8_scores = judged["onnxruntime"]
        quantized, total = quantized_conv_count(staged)
        fp32.unlink()
        commit_staged(staged, output)
    return DetectorQuantizeReport(str(output), len(inputs), len(bundle.val), fp32_scores["ap"], fp32_scores["ap50"],
                                  int8_scores["ap"], int8_scores["ap50"],
                                  100 * (fp32_scores["ap"] - int8_scores["ap"]), max_ap_drop, quantized, total,
                                  {runtime: scores["ap"] for runtime, scores in judged.items()})


def _quantizable_convs(path: Path, parts: tuple[str, ...]) -> list[str]:
    import onnx

    graph = onnx.load(str(path)).graph
    return [n.name for n in graph.node if n.op_type == "Conv" and n.name.startswith(parts)]



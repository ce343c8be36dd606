"""``repvgg quantize WEIGHTS OUT.onnx``: INT8 through ONNX Runtime, calibrated and measured on real data."""

from __future__ import annotations

import argparse
from typing import Any

from repvgg.cli.flags import config_command, config_flag_values, refuse_flags
from repvgg.cli.output import emit
from repvgg.quant.config import QuantizeConfig

#: ``quantize`` options that apply to classifiers only (a detector's are ``--data``, ``--calib-images``,
#: ``--calibration``, ``--max-ap-drop`` and ``--overwrite``; a segmenter's the same with ``--max-miou-drop``).
CLASSIFIER_ONLY = ("img_size", "speed_batch", "speed_rounds", "speed_img_size", "qat_epochs", "qat_lr", "device",
                   "runtime", "min_agreement", "max_top1_drop")


def add_parser(sub: argparse._SubParsersAction) -> None:
    config_command(
        sub, "quantize", QuantizeConfig, run,
        help="INT8-quantize a model through ONNX Runtime (QDQ, per-channel) and measure FP32 vs INT8",
        description="Loads WEIGHTS (a run's best.pt, a deploy file, official/timm files), converts and checks it, "
                    "exports FP32 ONNX (checked), quantizes it statically with ONNX Runtime (QDQ, per-channel INT8 "
                    "weights, UINT8 activations calibrated on training images), evaluates FP32 and INT8 on the "
                    "validation set, times both, writes OUT.onnx and prints JSON (top1_fp32, top1_int8, "
                    "agreement, int8_speedup, ...).",
        positionals=(("weights", "WEIGHTS"), ("output", "OUT.onnx")))


def run(args: argparse.Namespace) -> int:
    from repvgg.dense.weights import dense_kind
    from repvgg.quant.ptq import quantize_model

    given = config_flag_values(args, QuantizeConfig)
    config = QuantizeConfig.from_dict(given)
    kind = dense_kind(args.weights)
    if kind == "detector":
        refuse_flags((("--max-miou-drop", given.get("max_miou_drop")),), "to segmenters; a detector is held to "
                     "--max-ap-drop")
        return _quantize_detector(args, config, given)
    if kind == "segmenter":
        refuse_flags((("--max-ap-drop", given.get("max_ap_drop")),), "to detectors; a segmenter is held to "
                     "--max-miou-drop")
        return _quantize_segmenter(args, config, given)
    refuse_flags((("--max-ap-drop", given.get("max_ap_drop")), ("--max-miou-drop", given.get("max_miou_drop"))),
                 "to detectors and segmenters; a classifier is held to --min-agreement and --max-top1-drop")
    report = quantize_model(args.weights, args.output, config)
    emit(args, report.as_dict())
    return 0


def _quantize_detector(args: argparse.Namespace, config: QuantizeConfig, given: dict[str, Any]) -> int:
    """A det-train file: backbone and pyramid in INT8, the head in float, judged by COCO AP."""
    from repvgg.quant.detector import quantize_detector

    _refuse_classifier_flags(given, "a detector is quantized by calibration at the image size it was trained at, "
                                    "judged by COCO AP (--max-ap-drop)")
    report = quantize_detector(args.weights, args.output, data=config.data, calib_images=given.get("calib_images"),
                               calibration=config.calibration, max_ap_drop=config.max_ap_drop,
                               overwrite=config.overwrite)
    emit(args, report.as_dict())
    return 0


def _quantize_segmenter(args: argparse.Namespace, config: QuantizeConfig, given: dict[str, Any]) -> int:
    """A seg-train file: every conv but the class logits in INT8, judged by mean IoU."""
    from repvgg.quant.segmenter import quantize_segmenter

    _refuse_classifier_flags(given, "a segmenter is quantized by calibration on training crops, judged by mean IoU "
                                    "(--max-miou-drop)")
    report = quantize_segmenter(args.weights, args.output, data=config.data, calib_images=given.get("calib_images"),
                                calibration=config.calibration, max_miou_drop=config.max_miou_drop,
                                overwrite=config.overwrite)
    emit(args, report.as_dict())
    return 0


def _refuse_classifier_flags(given: dict[str, Any], how: str) -> None:
    """Refuse the classifier's flags for a dense model, saying ``how`` it is quantized instead."""
    refuse_flags(((f"--{name.replace('_', '-')}", given.get(name)) for name in CLASSIFIER_ONLY),
                 f"to classifiers; {how} and not timed (train a qarepvgg_* backbone for an INT8-friendly model)")

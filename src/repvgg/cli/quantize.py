"""``repvgg quantize WEIGHTS OUT.onnx``: INT8 through ONNX Runtime, calibrated and measured on real data."""

from __future__ import annotations

import argparse

from repvgg.cli.flags import config_command, config_flag_values
from repvgg.cli.output import emit
from repvgg.quant.config import QuantizeConfig


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

    config = QuantizeConfig.from_dict(config_flag_values(args, QuantizeConfig))
    if dense_kind(args.weights) == "detector":
        return _quantize_detector(args, config)
    report = quantize_model(args.weights, args.output, config)
    emit(args, report.as_dict())
    return 0


def _quantize_detector(args: argparse.Namespace, config: QuantizeConfig) -> int:
    """A det-train file: backbone and pyramid in INT8, the head in float, judged by COCO AP."""
    from repvgg.quant.detector import quantize_detector

    if config.qat_epochs:
        raise ValueError("--qat-epochs fine-tunes classifiers; a detector is quantized by calibration (train a "
                         "qarepvgg_* backbone for an INT8-friendly detector)")
    report = quantize_detector(args.weights, args.output, calib_images=config.calib_images,
                               calibration=config.calibration, max_ap_drop=config.max_ap_drop,
                               overwrite=config.overwrite)
    emit(args, report.as_dict())
    return 0

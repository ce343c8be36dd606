"""``repvgg quantize WEIGHTS OUT.onnx``: INT8 through ONNX Runtime, calibrated and measured on real data."""

from __future__ import annotations

import argparse

from repvgg.cli.flags import add_overwrite_flag, bounded_int, image_size
from repvgg.cli.output import emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="INT8-quantize a model through ONNX Runtime (QDQ, per-channel) and measure FP32 vs INT8",
        description="Loads WEIGHTS (a run's best.pt, a deploy file, official/timm files), converts and checks it, "
                    "exports FP32 ONNX (checked), quantizes it statically with ONNX Runtime (QDQ, per-channel INT8 "
                    "weights, UINT8 activations calibrated on training images), evaluates FP32 and INT8 on the "
                    "validation set, times both, writes OUT.onnx and prints JSON (top1_fp32, top1_int8, "
                    "agreement, int8_speedup, ...).",
    )
    p.add_argument("weights", metavar="WEIGHTS")
    p.add_argument("output", metavar="OUT.onnx")
    p.add_argument("--data", default=None,
                   help="ImageFolder root the model was trained on (default: the embedded digits data)")
    p.add_argument("--img-size", type=image_size, default=None,
                   help="input resolution (default: 32 digits / 224 folders)")
    p.add_argument("--calib-images", type=bounded_int(1, why="the calibration set needs at least one image"),
                   default=256,
                   help="training images that calibrate the activations")
    p.add_argument("--calibration", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="calibration method")
    p.add_argument("--speed-batch", type=bounded_int(1), default=8, help="batch of the FP32/INT8 timing")
    p.add_argument("--speed-img-size", type=image_size, default=None,
                   help="input size of the FP32/INT8 timing (default: --img-size)")
    p.add_argument("--qat-epochs", type=bounded_int(0), default=0,
                   help="quantization-aware training instead of calibration: fine-tune the converted model this "
                        "many epochs with fake INT8 (run folder OUT-qat beside OUT)")
    p.add_argument("--qat-lr", type=float, default=None, help="QAT learning rate (default: 1/10 of training's)")
    p.add_argument("--device", default="auto", help="device of the QAT fine-tune: auto, cpu, cuda or cuda:N")
    add_overwrite_flag(p, "an existing output file (and QAT run folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from repvgg.quant.ptq import quantize_model

    report = quantize_model(args.weights, args.output, data=args.data, img_size=args.img_size,
                            calib_images=args.calib_images, method=args.calibration, speed_batch=args.speed_batch,
                            speed_img_size=args.speed_img_size, overwrite=args.overwrite,
                            qat_epochs=args.qat_epochs, qat_lr=args.qat_lr, device=args.device)
    emit(args, report.as_dict())
    return 0

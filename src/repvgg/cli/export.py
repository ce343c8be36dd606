"""``repvgg export``: the converted model as ONNX, checked and compared with ONNX Runtime."""

from __future__ import annotations

import argparse

from repvgg.cli.flags import add_overwrite_flag, bounded_int, image_size
from repvgg.cli.output import emit
from repvgg.limits import MIN_OPSET


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export the converted model to ONNX (dynamic batch) and check it with ONNX Runtime",
        description=(
            "MODEL is a checkpoint file (official, timm or this package's format, training-time or deploy) "
            "or a registered model name (random weights). A training-time model is converted first."
        ),
    )
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT")
    p.add_argument("output", metavar="OUT.onnx")
    p.add_argument("--img-size", type=image_size, default=224, help="input resolution")
    p.add_argument("--opset", type=bounded_int(MIN_OPSET), default=None,
                   help=f"ONNX opset, {MIN_OPSET} up to the newest the installed onnx knows (default: the exporter's)")
    p.add_argument("--num-classes", type=bounded_int(1), default=None,
                   help="classes of a model built by name (default 1000)")
    p.add_argument("--dynamic-hw", action="store_true",
                   help="dynamic height and width too (checked against PyTorch at two input sizes)")
    p.add_argument("--fp16", action="store_true",
                   help="half-precision weights and input (checked against the float32 model within 1e-2)")
    add_overwrite_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from repvgg.io.export import export_onnx

    report = export_onnx(args.model, args.output, img_size=args.img_size, opset=args.opset,
                         num_classes=args.num_classes, overwrite=args.overwrite, dynamic_hw=args.dynamic_hw,
                         fp16=args.fp16)
    text = "converted the training-time model to its plain form before export\n" if report.converted else ""
    text += f"wrote {report.path}: input {tuple(report.input_shape)}, opset {report.opset}, onnx checker passed\n"
    text += (f"ONNX Runtime ({report.dtype}) vs PyTorch (float32) on random batches of {report.check_batch_size} at "
             f"{', '.join(f'{s}x{s}' for s in report.check_sizes)}: "
             f"max |diff| {report.max_abs_diff:.3g} ({report.max_rel_diff:.2g} of the largest |output|), "
             f"relative deviation {report.relative_error:.2g}")
    emit(args, report.as_dict(), text)
    return 0

"""``repvgg export``: the converted model as ONNX, checked and compared with ONNX Runtime."""

from __future__ import annotations

import argparse

from repvgg.cli.flags import config_command, config_flag_values
from repvgg.cli.output import emit
from repvgg.io.config import ExportConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    config_command(
        sub, "export", ExportConfig, run,
        help="export the converted model to ONNX (dynamic batch) and check it with ONNX Runtime",
        description=(
            "MODEL is a checkpoint file (official, timm or this package's format, training-time or deploy) "
            "or a registered model name (random weights). A training-time model is converted first."
        ),
        positionals=(("model", "MODEL_OR_CHECKPOINT"), ("output", "OUT.onnx")))


def run(args: argparse.Namespace) -> int:
    from repvgg.io.export import export_onnx

    config = ExportConfig.from_dict(config_flag_values(args, ExportConfig))
    report = export_onnx(args.model, args.output, config)
    text = "converted the training-time model to its plain form before export\n" if report.converted else ""
    text += f"wrote {report.path}: input {tuple(report.input_shape)}, opset {report.opset}, onnx checker passed\n"
    text += (f"it records its {' and '.join(report.metadata)}\n" if report.metadata else
             "it records no class names or preprocessing (its source had none)\n")
    text += (f"ONNX Runtime ({report.dtype}) vs PyTorch (float32) on random batches of {report.check_batch_size} at "
             f"{', '.join(f'{s}x{s}' for s in report.check_sizes)}: "
             f"max |diff| {report.max_abs_diff:.3g} ({report.max_rel_diff:.2g} of the largest |output|), "
             f"relative deviation {report.relative_error:.2g}")
    emit(args, report.as_dict(), text)
    return 0

"""``repvgg export``: the converted model as ONNX, checked and compared with ONNX Runtime."""

from __future__ import annotations

import argparse

from repvgg.cli.flags import config_command, config_flag_values, refuse_flags
from repvgg.cli.output import emit
from repvgg.io.config import ExportConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    config_command(
        sub, "export", ExportConfig, run,
        help="export the converted model to ONNX (dynamic batch) and check it with ONNX Runtime, or write a model "
             "repository for Triton or OpenVINO Model Server",
        description=(
            "MODEL is a checkpoint file (official, timm or this package's format, training-time or deploy) "
            "or a registered model name (random weights). A training-time model is converted first. With --format "
            "triton or ovms, OUT is a model repository folder."
        ),
        positionals=(("model", "MODEL_OR_CHECKPOINT"), ("output", "OUT.onnx")))


def run(args: argparse.Namespace) -> int:
    from repvgg.dense.weights import dense_kind
    from repvgg.io.export import export_onnx

    if args.format not in (None, "onnx"):
        return _export_repository(args)
    refuse_flags((("--name", args.name), ("--max-batch", args.max_batch), ("--max-wait-ms", args.max_wait_ms),
                  ("--backend", args.backend)), "to a model repository (--format triton or ovms)")
    kind = dense_kind(args.model)
    if kind == "detector":
        return _export_detector(args)
    if kind == "segmenter":
        return _export_segmenter(args)
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


def _dense_config(args: argparse.Namespace, why: str) -> ExportConfig:
    """The export options of a detector or segmenter, refusing the classifier's (``why`` says what the graph takes)."""
    cfg = ExportConfig.from_dict(config_flag_values(args, ExportConfig))
    refuse_flags((("--fp16", cfg.fp16), ("--dynamic-hw", cfg.dynamic_hw), ("--img-size", cfg.img_size),
                  ("--num-classes", cfg.num_classes)), f"to classifiers; {why}")
    return cfg


def _export_detector(args: argparse.Namespace) -> int:
    """A det-train file: the whole detector (resize, normalisation, decoding, NMS) in one graph."""
    from repvgg.detection.export import export_detector

    cfg = _dense_config(args, "a detector's graph takes one float32 image of any size and resizes it as the detector "
                              "was trained (its image_size)")
    report = export_detector(args.model, args.output, opset=cfg.opset or 18, overwrite=cfg.overwrite)
    text = "converted the training-time detector to its plain form before export\n" if report.converted else ""
    text += (f"wrote {report.path}: one image (3, height, width) in [0, 1] -> boxes, scores, labels (NMS in the "
             f"graph), opset {report.opset}; it records its classes and detector configuration\n"
             f"ONNX Runtime and OpenVINO vs PyTorch on {report.images_checked} validation images: the same labels, "
             f"largest box deviation {report.max_box_deviation_px:.3g} px over {report.detections_checked} "
             "detections")
    emit(args, report.as_dict(), text)
    return 0


def _export_segmenter(args: argparse.Namespace) -> int:
    """A seg-train file: normalisation, network and per-pixel argmax in one graph of any height and width."""
    from repvgg.segmentation.export import export_segmenter

    cfg = _dense_config(args, "a segmenter's graph takes one float32 image of any height and width")
    report = export_segmenter(args.model, args.output, opset=cfg.opset or 18, overwrite=cfg.overwrite)
    text = "converted the training-time segmenter to its plain form before export\n" if report.converted else ""
    text += (f"wrote {report.path}: one image (3, height, width) in [0, 1] -> mask (height, width) of class indices, "
             f"opset {report.opset}; it records its classes and segmenter configuration\n"
             f"ONNX Runtime and OpenVINO vs PyTorch on {report.images_checked} validation images: the same mask on "
             f"{report.pixels_checked} pixels, {report.pixels_at_ties} of them at ties of two classes")
    emit(args, report.as_dict(), text)
    return 0


def _export_repository(args: argparse.Namespace) -> int:
    """A model repository: OUT/NAME/1/model.onnx, and Triton's config.pbtxt and labels.txt."""
    from repvgg.serve.repository import REPOSITORY_KINDS, write_model_repository

    cfg = ExportConfig.from_dict(config_flag_values(args, ExportConfig))
    refuse_flags((("--fp16", cfg.fp16), ("--dynamic-hw", cfg.dynamic_hw), ("--opset", cfg.opset),
                  ("--num-classes", cfg.num_classes)),
                 "to --format onnx; for a repository, export or quantize the ONNX file first and give it as MODEL (it "
                 "is taken as it is)")
    report = write_model_repository(args.model, args.output, kind=cfg.format, name=cfg.name,
                                    max_batch=cfg.max_batch if args.max_batch is not None else None,  # as given
                                    max_wait_ms=cfg.max_wait_ms if args.max_wait_ms is not None else None,
                                    backend=cfg.backend, img_size=cfg.img_size, overwrite=cfg.overwrite)
    text = (f"wrote {report.folder} for {REPOSITORY_KINDS[report.kind]}: {', '.join(report.files)} "
            f"({report.precision}, input {report.input['name']} {report.input['dims']}, output {report.output['name']} "
            f"{report.output['dims']}, {report.classes} classes); ONNX Runtime ran it by those names")
    emit(args, report.to_dict(), text)
    return 0

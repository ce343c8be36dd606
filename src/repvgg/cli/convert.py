"""``repvgg convert IN OUT``: training-time checkpoint -> fused deploy safetensors, with an equivalence check."""

from __future__ import annotations

import argparse

from repvgg.cli.flags import add_overwrite_flag, image_size
from repvgg.cli.output import emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert",
                       help="convert a training-time checkpoint (official, timm or own) to deploy safetensors")
    p.add_argument("input", help="training-time weights file")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--model", default=None, help="model name for files without metadata (else inferred)")
    p.add_argument("--img-size", type=image_size, default=224, help="input size of the equivalence check")
    add_overwrite_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from repvgg.io.loading import convert_checkpoint

    result = convert_checkpoint(args.input, args.output, arch=args.model, img_size=args.img_size,
                                overwrite=args.overwrite)
    emit(args, result)
    return 0

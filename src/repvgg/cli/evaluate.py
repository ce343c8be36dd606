"""``repvgg eval``: evaluate a saved training-time or deploy checkpoint."""

from __future__ import annotations

import argparse

from repvgg.cli.flags import bounded_float, bounded_int, image_size
from repvgg.limits import MAX_WORKERS
from repvgg.cli.output import add_json_out_flag, check_json_out, emit, write_json_out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a saved checkpoint (training-time or deploy) on validation data")
    p.add_argument("--weights", required=True, help="checkpoint: run folder file (best.pt, last.pt, "
                   "deploy.safetensors) or an official/timm file")
    p.add_argument("--model", default=None, help="model name, for files without architecture metadata "
                   "(inferred from parameter shapes when omitted)")
    p.add_argument("--data", default=None, help="ImageFolder root with train/ and val/, whose val/ images are "
                   "evaluated (default: the digits data)")
    p.add_argument("--img-size", type=image_size, default=None,
                   help="input resolution (default 32 digits / 224 folders)")
    p.add_argument("--batch-size", type=bounded_int(1), default=64, help="evaluation batch size")
    p.add_argument("--workers", type=bounded_int(0, MAX_WORKERS), default=0, help="data-loading workers")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--val-fraction", type=bounded_float(0.001, 0.999), default=None,
                   help="the digits' validation fraction (default: the one the run beside --weights trained with, "
                        "else 0.2)")
    add_json_out_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from repvgg.training.evaluate import evaluate_checkpoint

    check_json_out(args, reads=[args.weights, args.data])
    result = evaluate_checkpoint(args.weights, data=args.data, arch=args.model, img_size=args.img_size,
                                 batch_size=args.batch_size, workers=args.workers, device=args.device,
                                 val_fraction=args.val_fraction)
    emit(args, result)
    write_json_out(args, result, reads=[args.weights, args.data])
    return 0

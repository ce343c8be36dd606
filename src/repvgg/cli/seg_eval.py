"""``repvgg seg-eval``: score a saved segmenter (deploy.safetensors, best.pt, last.pt) and time it."""

from __future__ import annotations

import argparse

from repvgg.cli.flags import bounded_int, image_size
from repvgg.limits import MAX_WORKERS
from repvgg.cli.output import add_json_out_flag, check_json_out, emit, write_json_out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seg-eval", help="evaluate a saved segmenter: mIoU, per-class IoU, pixel accuracy, speed")
    p.add_argument("--weights", required=True, help="a seg-train file: deploy.safetensors, best.pt or last.pt")
    p.add_argument("--data", default=None, help="folder with images/val and labels/val, or 'synthetic' for the "
                   "generated scenes (./synthetic for a folder of that name; default: the data the model was trained "
                   "on, as stored in the file)")
    p.add_argument("--val-size", type=image_size, default=None, help="resize validation images to this square size "
                   "(default: as stored in the file, else as they are)")
    p.add_argument("--batch-size", type=bounded_int(1), default=16, help="evaluation batch size, as seg-train")
    p.add_argument("--workers", type=bounded_int(0, MAX_WORKERS), default=0, help="data-loading worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--baseline", default=None, choices=["resnet50", "resnet101", "none"],
                   help="ResNet PSPNet timed next to the model at the same input size (default: resnet50)")
    p.add_argument("--speed", default=True, action=argparse.BooleanOptionalAction,
                   help="measure images/s (--no-speed skips it)")
    add_json_out_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from repvgg.dense.weights import trained_data_folder
    from repvgg.segmentation.evaluate import evaluate_segmenter_file, iou_table, speed_table
    from repvgg.segmentation.weights import load_segmenter

    if not args.speed and args.baseline not in (None, "none"):
        raise ValueError(f"--baseline {args.baseline} is timed next to the model: it goes with the speed measurement "
                         "(drop --no-speed, or --baseline)")
    data = args.data if args.data or not args.json_out else trained_data_folder(load_segmenter(args.weights)[1])
    check_json_out(args, reads=[args.weights, data])  # never into the data folder it reads
    result = evaluate_segmenter_file(args.weights, data=args.data, val_size=args.val_size,
                                     batch_size=args.batch_size, workers=args.workers, device=args.device,
                                     baseline=args.baseline or "resnet50", speed=args.speed)
    text = f"## {result['model']} ({result['form']}) on {result['dataset']}, {result['val_images']} images\n\n"
    text += iou_table(result) + "\n"
    if "max_abs_diff" in result:
        text += (f"\nconverted vs training-time: max |logit difference| {result['max_abs_diff']:.3g}, "
                 f"predicted classes agree on {100 * result['pixel_agreement']:.4f}% of pixels\n")
    if "speed" in result:
        text += "\n" + speed_table(result["speed"], result["speed_input"])
    emit(args, result, text)
    write_json_out(args, result, reads=[args.weights, data])
    return 0

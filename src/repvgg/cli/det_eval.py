"""``repvgg det-eval``: score a saved detector (deploy.safetensors, best.pt, last.pt) with COCO's metrics."""

from __future__ import annotations

import argparse

from repvgg.cli.flags import bounded_int
from repvgg.cli.output import add_json_out_flag, check_json_out, emit, write_json_out
from repvgg.limits import MAX_WORKERS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("det-eval", help="evaluate a saved detector: COCO AP (pycocotools), both forms compared")
    p.add_argument("--weights", required=True, help="a det-train file: deploy.safetensors, best.pt or last.pt")
    p.add_argument("--data", default=None, help="COCO folder with annotations/instances_val.json "
                   "(default: the data the detector was trained on, as stored in the file)")
    p.add_argument("--batch-size", type=bounded_int(1, 4096), default=16, help="evaluation batch size")
    p.add_argument("--workers", type=bounded_int(0, MAX_WORKERS), default=0, help="data-loading worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    add_json_out_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from repvgg.dense.weights import trained_data_folder
    from repvgg.detection.evaluate import ap_table, evaluate_detector_file
    from repvgg.detection.weights import load_detector

    data = args.data if args.data or not args.json_out else trained_data_folder(load_detector(args.weights)[1])
    check_json_out(args, reads=[args.weights, data])  # never into the data folder it reads
    result = evaluate_detector_file(args.weights, data=args.data, batch_size=args.batch_size, workers=args.workers,
                                    device=args.device)
    text = f"## {result['model']} ({result['form']}) on {result['dataset']}, {result['val_images']} images\n\n"
    text += ap_table(result) + "\n"
    if "max_box_deviation_px" in result:
        text += (f"\nconverted vs training-time: AP difference {100 * result['ap_difference']:.4f} points, labels "
                 f"agree: {result['labels_agree']}, largest box deviation before NMS "
                 f"{result['max_box_deviation_px']:.3g} px\n")
    emit(args, result, text)
    write_json_out(args, result, reads=[args.weights, data])
    return 0

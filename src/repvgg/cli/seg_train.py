"""``repvgg seg-train``: train a PSPNet on a RepVGG backbone, convert it, verify it, and time it."""

from __future__ import annotations

import argparse
import json
from typing import Any

_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--backbone", dict(help="registered RepVGG name (see `repvgg info`) or resnet50/resnet101 "
                             "(default repvgg_tiny)")),
    ("--fast", dict(action=argparse.BooleanOptionalAction,
                    help="the paper's fast variant: dilate only the last 5 layers")),
    ("--dilated-layers", dict(type=int, help="dilate only the last N backbone layers "
                                            "(default: every layer of the last two stages)")),
    ("--head-channels", dict(type=int, help="width of the classifier's 3x3 conv (default 64; PSPNet 512)")),
    ("--aux-channels", dict(type=int, help="width of the auxiliary head's 3x3 conv, 0 = none "
                                          "(default 32; PSPNet 256)")),
    ("--aux-weight", dict(type=float, help="weight of the auxiliary loss (default 0.4)")),
    ("--dropout", dict(type=float, help="Dropout2d before the classifiers' last conv (default 0.1)")),
    ("--backbone-weights", dict(help="ImageNet weights file for the backbone "
                                     "(RepVGG formats or a torchvision ResNet)")),
    ("--data", dict(help="folder with images/{train,val} and labels/{train,val} (default: the generated shapes)")),
    ("--num-classes", dict(type=int, help="number of classes of a folder without classes.txt")),
    ("--crop-size", dict(type=int, help="training crop (default: the generated image size, 512 for folders)")),
    ("--val-size", dict(type=int, help="resize validation images to this square size (default: as they are)")),
    ("--synthetic-train", dict(type=int, help="generated training scenes (default 800)")),
    ("--synthetic-val", dict(type=int, help="generated validation scenes (default 100)")),
    ("--synthetic-size", dict(type=int, help="generated scene size in pixels (default 96)")),
    ("--epochs", dict(type=int, help="training epochs (default 30)")),
    ("--batch-size", dict(type=int, help="global batch size over all processes, >= 2 per process (default 16)")),
    ("--lr", dict(type=float, help="base learning rate of the poly schedule (default 0.05 generated data, "
                                   "0.01 x batch/16 folders)")),
    ("--poly-power", dict(type=float, help="power of the poly learning-rate decay (default 0.9)")),
    ("--momentum", dict(type=float, help="SGD momentum (default 0.9)")),
    ("--weight-decay", dict(type=float, help="weight decay on kernels (default 1e-4)")),
    ("--amp", dict(action=argparse.BooleanOptionalAction, help="mixed precision (CUDA only)")),
    ("--sync-bn", dict(action=argparse.BooleanOptionalAction, help="SyncBatchNorm across processes")),
    ("--workers", dict(type=int, help="data-loading worker processes (default 0)")),
    ("--seed", dict(type=int, help="random seed of the training run (default 0)")),
    ("--device", dict(help="auto, cpu, cuda or cuda:N (default auto)")),
    ("--output", dict(help="run folder (default runs/seg-<backbone>-<data>-<time>)")),
    ("--resume", dict(help="continue exactly from a run folder or its last.pt")),
    ("--baseline", dict(choices=["resnet50", "resnet101", "none"],
                        help="ResNet PSPNet timed next to the model at the same input size (default resnet50)")),
    ("--stop-after-steps", dict(type=int, help="save a resumable last.pt and exit after N steps of this invocation")),
    ("--log-interval", dict(type=int, help="steps between log lines when stderr is not a terminal (default 20)")),
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "seg-train",
        help="train a PSPNet segmenter on a RepVGG backbone, convert it, and compare speed with ResNet-50",
        description="Train a PSPNet (poly lr, auxiliary loss 0.4) on the generated shapes or a folder, convert it "
                    "with reparameterize_model, score both forms on the validation set (mIoU, per-class IoU, "
                    "pixel accuracy), time them next to a ResNet PSPNet, and write summary.json, metrics.jsonl, "
                    "last.pt, best.pt, deploy.safetensors, config.yaml, curves.png and predictions.png into the "
                    "run folder. Precedence: defaults < the resumed run's config < --config file < flags.",
    )
    p.add_argument("--config", help="YAML or JSON file of options (keys as the flags, - or _)")
    for flag, kwargs in _FLAGS:
        p.add_argument(flag, default=None, **kwargs)
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):
    """Merge defaults, a resumed run's config, a config file and the flags into a ``SegTrainConfig``."""
    from repvgg.cli.train import flag_values
    from repvgg.training.config import resolve_run_config
    from repvgg.segmentation.config import SegTrainConfig

    return resolve_run_config(SegTrainConfig, resume=args.resume, config_file=args.config,
                              flags=flag_values(args, _FLAGS))


def run(args: argparse.Namespace) -> int:
    from repvgg.segmentation.evaluate import iou_table, speed_table
    from repvgg.segmentation.train import train_segmenter

    summary = train_segmenter(resolve_config(args))
    if summary.get("interrupted"):
        return 130
    if "speed" not in summary:  # not the main process of a distributed run
        return 0
    print(f"## {summary['model']} on {summary['dataset']}, {summary['epochs']} epochs\n")
    print(iou_table(summary))
    print(f"\nconverted vs training-time: max |logit difference| {summary['max_abs_diff']:.3g}, "
          f"predicted classes agree on {100 * summary['pixel_agreement']:.4f}% of pixels\n")
    print(speed_table(summary["speed"], summary["speed_input"]))
    print(json.dumps({k: summary[k] for k in ("val_miou", "val_miou_deploy", "pixel_accuracy", "max_abs_diff",
                                              "train_time_s", "output")}, indent=2))
    return 0

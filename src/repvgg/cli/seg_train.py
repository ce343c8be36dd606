"""``repvgg seg-train``: train a PSPNet on a RepVGG backbone, convert it, verify it, and time it."""

from __future__ import annotations

import argparse
import json

from typing import Any

from repvgg.cli.flags import config_command
from repvgg.cli.train import add_common_arguments, run_training
from repvgg.segmentation.config import SegTrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = config_command(
        sub, "seg-train", SegTrainConfig, run,
        help="train a PSPNet segmenter on a RepVGG backbone, convert it, and compare speed with ResNet-50",
        description="Train a PSPNet (poly lr, auxiliary loss 0.4) on the generated shapes or a folder, convert it "
                    "with reparameterize_model, score both forms on the validation set (mIoU, per-class IoU, "
                    "pixel accuracy), time them next to a ResNet PSPNet, and write summary.json, metrics.jsonl, "
                    "last.pt, best.pt, deploy.safetensors, config.yaml, curves.png and predictions.png into the "
                    "run folder. Precedence: defaults < the resumed run's config < --config file < flags.")
    add_common_arguments(p, spec=False)


def run(args: argparse.Namespace) -> int:
    from repvgg.segmentation.train import train_segmenter

    return run_training(args, train_segmenter, _report)


def _report(summary: dict[str, Any]) -> str | None:
    from repvgg.segmentation.evaluate import iou_table, speed_table

    if "speed" not in summary:  # not the main process of a distributed run
        return None
    return (f"## {summary['model']} on {summary['dataset']}, {summary['epochs']} epochs\n\n{iou_table(summary)}\n"
            f"\nconverted vs training-time: max |logit difference| {summary['max_abs_diff']:.3g}, "
            f"predicted classes agree on {100 * summary['pixel_agreement']:.4f}% of pixels\n\n"
            f"{speed_table(summary['speed'], summary['speed_input'])}\n"
            + json.dumps({k: summary[k] for k in ("val_miou", "val_miou_deploy", "pixel_accuracy", "max_abs_diff",
                                                  "train_time_s", "output")}, indent=2))

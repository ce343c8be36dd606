"""``repvgg det-train``: train an FCOS / RetinaNet on a RepVGG backbone, convert it, and verify it."""

from __future__ import annotations

import argparse
import json

from typing import Any

from repvgg.cli.flags import config_command
from repvgg.cli.train import add_common_arguments, run_training
from repvgg.detection.config import DetTrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = config_command(
        sub, "det-train", DetTrainConfig, run,
        help="train an FCOS or RetinaNet detector on a RepVGG backbone, convert it, and verify it",
        description="Train torchvision's FCOS (or RetinaNet) on a feature pyramid over a RepVGG backbone, on the "
                    "generated scenes or a COCO folder; record each loss term and COCO's AP per epoch; convert the "
                    "detector and check it on the whole validation set (same labels, boxes within 1e-3 px, same AP); "
                    "write summary.json, metrics.jsonl, last.pt, best.pt, deploy.safetensors, config.yaml, "
                    "curves.png and predictions.png into the run folder. Precedence: defaults < the resumed run's "
                    "config < --config file < flags.")
    add_common_arguments(p, spec=False)


def run(args: argparse.Namespace) -> int:
    from repvgg.detection.train import train_detector

    return run_training(args, train_detector, _report)


def _report(summary: dict[str, Any]) -> str:
    from repvgg.detection.evaluate import ap_table

    return (f"## {summary['model']} on {summary['dataset']}, {summary['epochs']} epochs\n\n"
            f"{ap_table(summary | {'form': 'training-time'})}\n\n"
            f"converted vs training-time: labels agree on all {summary['val_images']} images: "
            f"{summary['labels_agree']}, largest box deviation before NMS {summary['max_box_deviation_px']:.3g} px\n"
            + json.dumps({k: summary[k] for k in ("val_ap", "val_ap50", "val_ap_deploy", "val_ap50_deploy",
                                                  "train_time_s", "output")}, indent=2))

"""Regenerate the paper-size PSPNet speed table of docs/segmentation.md (speed only, random weights).

    .venv/bin/python benchmarks/seg_backbone_speed.py [--img-size 96] [--batch-size 16]

PSPNet heads at their full widths (512 / 256), 19 classes; RepVGG backbones converted, ResNet backbones
with every conv-BN pair fused; interleaved rounds after warm-up, median (repvgg.training.evaluate.measure_throughput).
"""

from __future__ import annotations

import argparse
import platform

import torch

from repvgg.nn.convert import reparameterize_model
from repvgg.report import markdown_table
from repvgg.segmentation.evaluate import segmenter_speed
from repvgg.segmentation.pspnet import create_segmenter

MODELS = [
    ("ResNet-50 PSPNet (BN fused)", "resnet50", {}),
    ("ResNet-101 PSPNet (BN fused)", "resnet101", {}),
    ("RepVGG-A2 PSPNet (converted)", "repvgg_a2", {}),
    ("RepVGG-B1g2 PSPNet (converted)", "repvgg_b1g2", {}),
    ("RepVGG-B1g2-fast PSPNet (converted)", "repvgg_b1g2", {"fast": True}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = []
    for label, backbone, options in MODELS:
        net = create_segmenter(backbone, 19, head_channels=512, aux_channels=256, **options)
        models.append((label, reparameterize_model(net, inplace=True)))
    batch = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    rows = segmenter_speed(models, batch, rounds=args.rounds)
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"batch {args.batch_size} of {args.img_size}x{args.img_size}, median of {args.rounds} interleaved rounds\n")
    print(markdown_table(
        ["model", "params (M)", f"images/s @ {args.img_size}x{args.img_size}, batch {args.batch_size}",
         "vs ResNet-50 PSPNet"],
        [[r["model"], f"{r['params'] / 1e6:.2f}", f"{r['images_per_s']:.1f}", f"{r['relative']:.2f}x"]
         for r in rows],
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

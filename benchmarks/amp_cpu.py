"""Training speed of `--amp` on the CPU: one SGD step of the training-time RepVGG-A0 at 224x224, float32 against
bfloat16 autocast (what `repvgg train --amp` uses on a CPU with native BF16), interleaved, medians.

    .venv/bin/python benchmarks/amp_cpu.py            # about two minutes on 2 cores

`repvgg train --amp` trains in bfloat16 only on CPUs with native BF16 (AVX512-BF16 or AMX); this script measures
the step on any CPU, so the table says what bfloat16 costs or gives here, next to the CPU's features.
Writes benchmarks/results/amp_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from repvgg.nn.registry import build_model
from repvgg.measure.environment import cpu_features, environment
from repvgg.measure.timing import time_interleaved
from repvgg.report import markdown_table
from repvgg.serialization import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
             dtype: torch.dtype | None) -> None:
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="repvgg_a0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 1000, (args.batch_size,))
    steps = {}
    for name, dtype in (("float32", None), ("bfloat16 autocast", torch.bfloat16)):
        model = build_model(args.model).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps[name] = (lambda m=model, o=optimizer, d=dtype: sgd_step(m, o, images, labels, d))
    results = time_interleaved(steps, warmup=1, rounds=args.rounds, pause_s=0.05)
    fp32 = results["float32"].throughput(args.batch_size)
    rows = [[name, f"{r.throughput(args.batch_size):.1f}", f"{r.throughput(args.batch_size) / fp32:.2f}x"]
            for name, r in results.items()]
    features = cpu_features()
    header = (f"One SGD step of the training-time {args.model}, batch {args.batch_size}, {args.img_size}x"
              f"{args.img_size}, median of {args.rounds} interleaved rounds; CPU {environment('cpu')['cpu']} "
              f"({features.describe()}); native BF16: {'yes' if features.native_bf16 else 'no'}, so `repvgg train "
              f"--amp` {'trains in bfloat16' if features.native_bf16 else 'trains in float32'} here.")
    table = markdown_table(["precision", "training images/s", "vs float32"], rows)
    write_text(args.out / "amp_cpu.md", f"{header}\n\n{table}\n")
    write_json(args.out / "amp_cpu.json", {"header": header, "cpu_features": features.as_dict(),
                                           "images_per_s": {k: r.throughput(args.batch_size)
                                                            for k, r in results.items()}})
    print(f"{header}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

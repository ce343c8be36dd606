"""The paper's speed comparison on one CUDA GPU (Ding et al., RepVGG, CVPR 2021, Table 4 and Sec. 4.1).

    python benchmarks/gpu_paper_speed.py                   # about 3 minutes on one recent GPU

As in the paper: batch 128, float32 (TensorFloat-32 off unless --tf32), 50 warm-up batches then 50
timed ones, conv-BN pairs of the ResNets/VGG fused. Every model runs in one process in interleaved
rounds (CUDA events, never a host clock). The paper's ratios, measured on a 1080Ti, are A0 1.33x
ResNet-18, A1 1.64x ResNet-34, A2 1.83x ResNet-50 and B1g2 2.66x ResNet-152; the ratios measured here
are printed next to them. Writes benchmarks/results/gpu.{md,json,png}; then every claim of the paper through
the same code as on the CPU (benchmarks/paper_claims.py --device cuda): paper_claims_gpu.{md,json} and its
figures.

To stay well under 5 minutes the fast path weighs eager, channels_last and CUDA graphs only
(torch.compile takes minutes for ten models; add it with --candidates ...,compile if time allows).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from repvgg.perf.bench import BenchConfig, run_benchmark
from repvgg.report import write_bench_report

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="repvgg_a0,repvgg_a1,repvgg_a2,repvgg_b1g2")
    parser.add_argument("--baselines", default="resnet18,resnet34,resnet50,resnet101,resnet152,vgg16")
    parser.add_argument("--dtypes", default="float32", help="e.g. float32,float16 (doubles the run time)")
    parser.add_argument("--candidates", default="eager,channels_last,cuda_graph")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--tf32", action="store_true", help="allow TensorFloat-32 (the paper's 1080Ti had none)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not torch.cuda.is_available():
        print("no CUDA device: this script reproduces the paper's GPU comparison (use `repvgg bench` on a CPU)",
              file=sys.stderr)
        return 1

    start = time.perf_counter()
    config = BenchConfig(
        models=tuple(args.models.split(",")), baselines=tuple(args.baselines.split(",")), device="cuda",
        batch_size=args.batch_size, dtypes=tuple(args.dtypes.split(",")), warmup=args.warmup, rounds=args.rounds,
        candidates=tuple(args.candidates.split(",")), tf32=args.tf32,
    )
    result = run_benchmark(config)
    files = write_bench_report(result, args.out, "gpu", note=f"{time.perf_counter() - start:.0f} s in all")
    print(files["markdown"].read_text())
    from paper_claims import run_report  # the claims, through the same harness as on the CPU

    print(run_report(device="cuda", runtime="cuda_graph", batch_size=args.batch_size, rounds=10,
                     operator_runtimes=["eager", "channels_last", "cuda_graph"], out=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Regenerate the README's CPU results: table (markdown), numbers (JSON) and plot (PNG).

    .venv/bin/python benchmarks/cpu_readme_table.py            # about two minutes on 2 cores

Writes docs/results/cpu.{md,json,png}. Run it on a quiet machine: other processes on a small
CPU move every number (the interleaved rounds protect the ratios more than the absolute speeds).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from repvgg.perf.bench import BenchConfig, check_targets, run_benchmark
from repvgg.report import write_bench_report
from targets import CPU_TARGETS

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="repvgg_a0,repvgg_a1")
    parser.add_argument("--baselines", default="resnet18,resnet34")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default docs/results)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    config = BenchConfig(models=tuple(args.models.split(",")), baselines=tuple(args.baselines.split(",")),
                         device="cpu", batch_size=8, img_size=224, rounds=args.rounds)
    result = run_benchmark(config)
    result.targets = check_targets(result, CPU_TARGETS)
    files = write_bench_report(result, args.out, "cpu")
    print(files["markdown"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

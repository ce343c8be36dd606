"""``repvgg bench``: throughput, latency, peak memory and FLOP rate of RepVGG next to its baselines."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from repvgg.cli.flags import add_overwrite_flag, config_command, config_flag_values
from repvgg.cli.output import emit
from repvgg.perf.config import BenchConfig

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = config_command(
        sub, "bench", BenchConfig, run,
        help="time RepVGG (training-time, converted, fast path) against ResNets and timm's RepVGG",
        description=(
            "Times every model in one process, in interleaved rounds after warm-up, and reports medians: "
            "throughput at --batch-size, latency at batch 1, peak forward memory, parameters, multiply-adds "
            "and achieved GFLOP/s relative to one large 3x3 conv. The defaults (repvgg_a0 vs resnet18 and "
            "timm's repvgg_a0, batch 8, float32) finish in about a minute on a 2-core CPU."
        ))
    p.add_argument("--json-out", default=None, metavar="PATH", help="also write every number to this JSON file")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="throughput-vs-parameters PNG (default: next to --json-out, with a .png suffix)")
    add_overwrite_flag(p, "existing --json-out and --plot files")


def run(args: argparse.Namespace) -> int:
    from repvgg.perf.bench import run_benchmark
    from repvgg.plots import plot_throughput
    from repvgg.report import bench_table
    from repvgg.serialization import check_output_path, write_json

    plot = args.plot or (str(Path(args.json_out).with_suffix(".png")) if args.json_out else None)
    if args.json_out:
        check_output_path(args.json_out, overwrite=args.overwrite, option="--json-out")
    if plot:  # never the JSON file just written
        check_output_path(plot, reads=[args.json_out], overwrite=args.overwrite, option="--plot")

    config = BenchConfig.from_dict(config_flag_values(args, BenchConfig))
    if not config.models and not config.baselines:
        raise ValueError("nothing to benchmark: give --models and/or --baselines")
    result = run_benchmark(config)
    emit(args, result.as_dict(), bench_table(result))
    if args.json_out:
        log.info("wrote %s", write_json(args.json_out, result.as_dict()))
    if plot:
        log.info("wrote %s", plot_throughput(result, plot))
    return 0

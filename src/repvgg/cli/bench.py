"""``repvgg bench``: throughput, latency, peak memory and FLOP rate of RepVGG next to its baselines."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from repvgg.cli.flags import add_overwrite_flag, bounded_int, parse_list
from repvgg.cli.output import emit
from repvgg.limits import MAX_IMG_SIZE

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time RepVGG (training-time, converted, fast path) against ResNets and timm's RepVGG",
        description=(
            "Times every model in one process, in interleaved rounds after warm-up, and reports medians: "
            "throughput at --batch-size, latency at batch 1, peak forward memory, parameters, multiply-adds "
            "and achieved GFLOP/s relative to one large 3x3 conv. The defaults (repvgg_a0 vs resnet18 and "
            "timm's repvgg_a0, batch 8, float32) finish in about a minute on a 2-core CPU."
        ),
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--models", default="repvgg_a0", help="comma-separated RepVGG names")
    p.add_argument("--baselines", default="resnet18",
                   help="comma-separated torchvision baselines among resnet18/34/50/101/152 and vgg16, "
                        "or 'none'")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip timm's RepVGG")
    p.add_argument("--no-fast", dest="fast", action="store_false", help="skip the fast inference path")
    p.add_argument("--candidates", default=None,
                   help="fast-path candidates to weigh, comma-separated (default: all available on the device)")
    p.add_argument("--batch-size", type=bounded_int(1), default=None,
                   help="throughput batch size (default 8 on CPU, 128 on CUDA)")
    p.add_argument("--img-size", type=bounded_int(32, MAX_IMG_SIZE), default=224, help="input resolution")
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated among float32, float16, bfloat16 (unsupported ones are skipped)")
    p.add_argument("--warmup", type=bounded_int(0), default=None,
                   help="warm-up calls per model (default 2 CPU / 50 CUDA)")
    p.add_argument("--rounds", type=bounded_int(1), default=None, help="timed rounds (default 10 CPU / 50 CUDA)")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip the batch-1 latency pass")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    p.add_argument("--tf32", action="store_true", help="allow TensorFloat-32 for float32 on CUDA (off: true fp32)")
    p.add_argument("--json-out", default=None, metavar="PATH", help="also write every number to this JSON file")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="throughput-vs-parameters PNG (default: next to --json-out, with a .png suffix)")
    add_overwrite_flag(p, "existing --json-out and --plot files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from repvgg.perf.bench import BenchConfig, run_benchmark
    from repvgg.plots import plot_throughput
    from repvgg.report import bench_table
    from repvgg.serialization import check_output_path, write_json

    plot = args.plot or (str(Path(args.json_out).with_suffix(".png")) if args.json_out else None)
    if args.json_out:
        check_output_path(args.json_out, overwrite=args.overwrite, option="--json-out")
    if plot:  # never the JSON file just written
        check_output_path(plot, reads=[args.json_out], overwrite=args.overwrite, option="--plot")

    config = BenchConfig(
        models=parse_list(args.models),
        baselines=parse_list(args.baselines),
        peer=args.peer,
        device=args.device,
        batch_size=args.batch_size,
        img_size=args.img_size,
        dtypes=parse_list(args.dtypes),
        warmup=args.warmup,
        rounds=args.rounds,
        latency=args.latency,
        memory=args.memory,
        fast=args.fast,
        candidates=parse_list(args.candidates) or None,
        tf32=args.tf32,
    )
    if not config.models and not config.baselines:
        raise ValueError("nothing to benchmark: give --models and/or --baselines")
    result = run_benchmark(config)
    emit(args, result.as_dict(), bench_table(result))
    if args.json_out:
        log.info("wrote %s", write_json(args.json_out, result.as_dict()))
    if plot:
        log.info("wrote %s", plot_throughput(result, plot))
    return 0

"""Every quantitative speed, FLOPs and parameter claim of the paper, measured side by side on this machine.

    .venv/bin/python benchmarks/paper_claims.py                  # the CPU: about 4 minutes on 2 cores
    .venv/bin/python benchmarks/paper_claims.py --device cuda    # a GPU (gpu_paper_speed.py runs this too)

One row per claim (repvgg.perf.claims.CLAIMS): the paper's ratio (1080Ti, batch 128), the ratio measured here
and its status, computed from the measurement. Every classifier a claim names is built once (RepVGG converted,
the baselines' conv-BN pairs folded, random weights), counted (parameters, multiply-adds at its input size:
224, EfficientNet-B3 300) and timed through one runtime of the fast path in interleaved rounds (medians);
the operators of the density claim are timed on every runtime listed; the segmentation claims time PSPNet on
each backbone. Writes benchmarks/results/paper_claims[_gpu].{md,json}, throughput_vs_flops[_gpu].png and
top1_vs_throughput[_gpu].png (published ImageNet top-1, each labelled with its source).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from repvgg.perf.claims import (CLAIMS, ModelMeasurement, density_ratio, evaluate_claims, measure_models, models_of,
                                operator_density, published_top1, segmentation_speeds)
from repvgg.measure.environment import cpu_features, environment
from repvgg.plots import plot_points
from repvgg.report import markdown_table
from repvgg.serialization import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
SEGMENTATION = ("repvgg_a2", "resnet50", "repvgg_b1g2", "repvgg_b1g2_fast", "resnet101")


def run_report(*, device: str, runtime: str, batch_size: int, rounds: int, operator_runtimes: list[str],
               out: Path) -> str:
    """Measure, judge, and write the report and figures; the markdown."""
    started = time.perf_counter()
    suffix = "" if device == "cpu" else "_gpu"
    density_rows = operator_density(runtimes=operator_runtimes, device=device, batch_size=batch_size)
    models = measure_models(models_of(CLAIMS), device=device, runtime=runtime, batch_size=batch_size,
                            rounds=rounds)
    seg = segmentation_speeds(SEGMENTATION, rounds=rounds) if device == "cpu" else {}
    results = evaluate_claims(CLAIMS, models, density_ratio(density_rows, runtime), seg)
    where = (environment(device).get("gpu") if device != "cpu" else
             f"{environment('cpu')['cpu']} ({cpu_features().describe()}), {torch.get_num_threads()} threads")
    header = (f"Measured on {where}, torch {torch.__version__}; classifiers through `{runtime}` at batch "
              f"{batch_size} (median of {rounds} interleaved rounds), float32; the paper: 1080Ti, batch 128. "
              f"{time.perf_counter() - started:.0f} s in all.")
    claims_table = markdown_table(
        ["claim", "compares", "paper", "here", "status"],
        [[r.claim.text, f"{r.claim.quantity}: {r.claim.subject} / {r.claim.reference}", f"{r.claim.paper:g}x"
          if r.claim.judged != "fewer" else "< 1x", "-" if r.measured is None else f"{r.measured:.2f}x", r.status]
         for r in results])
    model_table = markdown_table(
        ["model", "input", "params (M)", "GMACs", "images/s", "runtime", "ImageNet top-1", "top-1 source"],
        [[m.name, m.img_size, f"{m.params / 1e6:.2f}", f"{m.macs / 1e9:.2f}", f"{m.throughput:.1f}", m.runtime,
          *(lambda t: (f"{t[0]:.2f}" if t[0] else "-", t[1]))(published_top1(m.name))] for m in models.values()])
    dense = {r["runtime"]: r["gflops"] for r in density_rows if r["operator"] == "dense 3x3"}
    density_table = markdown_table(
        ["operator", "runtime", "GFLOP/s", "dense 3x3 / this, same runtime"],
        [[r["operator"], r["runtime"], f"{r['gflops']:.1f}",
          f"{dense.get(r['runtime'], float('nan')) / r['gflops']:.2f}"] for r in density_rows])
    seg_table = markdown_table(["PSPNet backbone", "images/s (128x128, batch 2)"],
                               [[k, f"{v:.2f}"] for k, v in seg.items()]) if seg else ""
    text = (f"{header}\n\n{claims_table}\n\nThe classifiers:\n\n{model_table}\n\nOperator density (batch "
            f"{density_rows[0]['shape'][0]}, {density_rows[0]['shape'][1]} channels, "
            f"{density_rows[0]['shape'][2]}x{density_rows[0]['shape'][3]}):\n\n{density_table}\n"
            + (f"\nSegmentation:\n\n{seg_table}\n" if seg else ""))
    write_text(out / f"paper_claims{suffix}.md", text)
    write_json(out / f"paper_claims{suffix}.json", {
        "header": header, "claims": [r.as_dict() for r in results], "models": {k: vars(m) for k, m in models.items()},
        "operators": density_rows, "segmentation": seg})
    _figures(models, out, suffix, where)
    return text


def _figures(models: dict, out: Path, suffix: str, where: str) -> None:
    def group(name: str) -> str:
        return "RepVGG (converted)" if name.startswith("repvgg") else "baselines (conv-BN folded)"

    plot_points([(m.name, m.macs / 1e9, m.throughput, group(m.name)) for m in models.values()],
                out / f"throughput_vs_flops{suffix}.png", xlabel="GMACs per image (log)", ylabel="images/s (log)",
                title=f"Throughput against multiply-adds: {where}", logx=True, logy=True)
    points = []
    for m in models.values():
        top1, source = published_top1(m.name)
        if top1 is not None:
            source = "the paper" if m.name.startswith("repvgg") else "torchvision V1 weights"
            points.append((m.name, m.throughput, top1, f"{group(m.name)}; top-1: {source}"))
    plot_points(points, out / f"top1_vs_throughput{suffix}.png", xlabel="images/s (measured here, log)",
                ylabel="ImageNet top-1 (%, published)", title=f"Accuracy vs measured speed (the paper's Fig. 1): "
                f"{where}", logx=True, legend="upper right")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runtime", default=None, help="runtime of the classifiers (default channels_last on the "
                        "CPU, cuda_graph on CUDA)")
    parser.add_argument("--operator-runtimes", default=None,
                        help="comma-separated (default eager,channels_last,onnxruntime[,openvino] on the CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 on the CPU, 128 on CUDA")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", action="store_true", help="redraw the figures from the JSON already written")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.replot:
        suffix = "_gpu" if args.device.startswith("cuda") else ""
        saved = json.loads((args.out / f"paper_claims{suffix}.json").read_text())
        models = {k: ModelMeasurement(**v) for k, v in saved["models"].items()}
        _figures(models, args.out, suffix, saved["header"].split("Measured on ")[1].split(", torch")[0])
        return 0
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 1
    runtimes = args.operator_runtimes.split(",") if args.operator_runtimes else (
        ["eager", "channels_last", "cuda_graph"] if cuda else ["eager", "channels_last", "onnxruntime"]
        + (["openvino"] if _has_openvino() else []))
    print(run_report(device=args.device, runtime=args.runtime or ("cuda_graph" if cuda else "channels_last"),
                     batch_size=args.batch_size or (128 if cuda else 8), rounds=args.rounds,
                     operator_runtimes=runtimes, out=args.out))
    return 0


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())

"""Regenerate the docs' CPU results: table (markdown), numbers (JSON) and plot (PNG), every precision included.

    .venv/bin/python benchmarks/cpu_readme_table.py            # about ten minutes on 2 cores

Times RepVGG-A0/A1 and ResNet-18/34 at batch 8, 224x224, in float32, bfloat16 (where the CPU computes it
natively) and INT8 (QDQ, calibrated on generated images), each runtime of the fast path side by side. The
timed models have random weights, so their agreement with float32 on random images says nothing about
accuracy; the accuracy guard of each reduced precision is measured here on trained models of the same
architectures instead: RepVGG-A0 and its quantization-friendly twin QARepVGG-A0 (the same plain network, the
same speed) trained on the digits with `repvgg train`'s default recipe, calibrated on 256 training images and
judged on the 360 validation images (top-1 agreement with float32 >= 99.5%, top-1 within 0.5 points).

Writes benchmarks/results/cpu.{md,json,png}. Run it on a quiet machine: other processes on a small
CPU move every number (the interleaved rounds protect the ratios more than the absolute speeds).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from repvgg.cli import main as repvgg_main
from repvgg.io.loading import load_model
from repvgg.perf.bench import BenchConfig, check_targets, run_benchmark
from repvgg.measure.environment import cpu_features
from repvgg.perf.fast import optimize_for_inference
from repvgg.report import write_bench_report
from repvgg.training.data import build_datasets
from targets import cpu_targets

RESULTS = Path(__file__).resolve().parent / "results"

log = logging.getLogger("cpu_readme_table")


def accuracy_guards(model: str, runs: Path) -> dict[str, dict[str, Any]]:
    """The accuracy guard of every reduced precision of ``model``'s architecture, per runtime, on the digits:
    ``{"model/precision/runtime": {...}}``. The model is trained with the default recipe once (reused after)."""
    run = runs / model
    if not (run / "summary.json").is_file():
        log.info("training %s on the digits for its accuracy guard", model)
        if repvgg_main(["train", "--model", model, "--output", str(run), "--no-inference-speed"]) != 0:
            raise SystemExit(f"training {model} failed")
    trained = load_model(run / "deploy.safetensors")
    bundle = build_datasets(None, augment=False)
    calibration = [images for images, _ in DataLoader(bundle.train, batch_size=64)][:4]
    validation = list(DataLoader(bundle.val, batch_size=120))
    runner = optimize_for_inference(trained, validation[0][0][:8], dtype="auto", calibration=calibration,
                                    validation=validation, candidates=["onnxruntime", "openvino"], measure=False)
    guards = {}
    for report in runner.reports:
        if report.precision != "float32" and report.agreement is not None:
            guards[f"{model}/{report.precision}/{report.name}"] = {
                "passed": report.status == "ok", "agreement": report.agreement, "top1": report.top1,
                "top1_reference": report.top1_reference,
                "detail": f"{model} trained on the digits: {report.detail}"}
    return guards


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="repvgg_a0,repvgg_a1")
    parser.add_argument("--baselines", default="resnet18,resnet34")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=Path, default=Path("runs/guards"),
                        help="where the digits runs behind the accuracy guards go (reused when present)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    guards: dict[str, dict[str, Any]] = {}
    for trained in ("repvgg_a0", "qarepvgg_a0"):
        guards |= accuracy_guards(trained, args.runs)
    config = BenchConfig(models=tuple(args.models.split(",")), baselines=tuple(args.baselines.split(",")),
                         dtypes=tuple(args.dtypes.split(",")), device="cpu", batch_size=8, img_size=224,
                         rounds=args.rounds)
    result = run_benchmark(config)
    # QARepVGG-A0 fuses to exactly RepVGG-A0's plain network: its guard is the deployable A0's
    result.guards = {key.removeprefix("qa"): guard for key, guard in guards.items() if key.startswith("qarepvgg_a0")}
    result.guards |= {f"plain-trained {key}": guard for key, guard in guards.items() if key.startswith("repvgg_a0")}
    result.targets = check_targets(result, cpu_targets(cpu_features()))
    files = write_bench_report(result, args.out, "cpu", note="reduced-precision rows are accepted where QARepVGG-A0 "
                               "(the same plain network) passed the accuracy guard on the digits")
    print(files["markdown"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""RepVGG vs the quantization-friendly block in INT8: FP32, post-training INT8 and QAT INT8 top-1 over seeds.

    .venv/bin/python benchmarks/int8_compare.py          # about 10 minutes on 2 CPU cores

For each model (repvgg_a0, qarepvgg_a0) and seed: `repvgg train` with the default recipe on the embedded
digits, then `repvgg quantize` of its best.pt twice: post-training (ONNX Runtime static quantization,
MinMax calibration on 256 training images) and QAT (`--qat-epochs`, default 2). Every INT8 model is
evaluated on the whole validation set with ONNX Runtime, with the accuracy guard lifted (this comparison measures
what INT8 loses, where `repvgg quantize` would refuse it); the INT8 / FP32 throughput ratio is measured at
batch 8, 224x224 (interleaved medians). Run folders go to runs/int8-compare/ (a finished run is reused,
so an interrupted comparison continues); results to benchmarks/results/int8.{md,json,png}.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from repvgg.quant.ptq import quantize_model
from repvgg.plots import pyplot
from repvgg.report import markdown_table
from repvgg.serialization import write_json
from repvgg.training.classification import train
from repvgg.training.config import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"


def _mean_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="repvgg_a0,qarepvgg_a0")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=Path("runs/int8-compare"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log = logging.getLogger("int8_compare")
    log.setLevel(logging.INFO)

    rows = []
    for model in args.models.split(","):
        for seed in range(args.seeds):
            run = args.runs / f"{model}-seed{seed}"
            if not (run / "summary.json").is_file():
                log.info("training %s seed %d", model, seed)
                summary = train(TrainConfig(model=model, seed=seed, output=str(run), overwrite=True))
                train_images_per_s = summary["train_images_per_s"]
            else:
                import json

                train_images_per_s = json.loads((run / "summary.json").read_text())["train_images_per_s"]
            results = {}
            for kind, extra in (("ptq", {}), ("qat", {"qat_epochs": args.qat_epochs})):
                log.info("%s seed %d: %s", model, seed, kind)
                # the guard lifted: this comparison measures what INT8 loses, including what the guard refuses
                report = quantize_model(run / "best.pt", run / f"{kind}.onnx", speed_batch=8, speed_img_size=224,
                                        overwrite=True, device="cpu", min_agreement=0.0, max_top1_drop=100.0,
                                        **extra)
                results[kind] = report.as_dict()
            rows.append({"model": model, "seed": seed, "fp32": results["ptq"]["top1_fp32"],
                         "ptq": results["ptq"]["top1_int8"], "qat": results["qat"]["top1_int8"],
                         "ptq_agreement": results["ptq"]["agreement"], "qat_agreement": results["qat"]["agreement"],
                         "ptq_speedup": results["ptq"]["int8_speedup"], "qat_speedup": results["qat"]["int8_speedup"],
                         "train_images_per_s": train_images_per_s, "reports": results})

    table_rows = []
    for model in args.models.split(","):
        mine = [r for r in rows if r["model"] == model]
        fp32, ptq, qat = ([r[k] for r in mine] for k in ("fp32", "ptq", "qat"))
        table_rows.append([
            model, _mean_spread(fp32), _mean_spread(ptq), _mean_spread([p - f for p, f in zip(ptq, fp32)]),
            _mean_spread(qat), _mean_spread([q - f for q, f in zip(qat, fp32)]),
            f"{statistics.median(r['ptq_speedup'] for r in mine):.2f}x",
            f"{statistics.median(r['qat_speedup'] for r in mine):.2f}x",
        ])
    header = ["model", "FP32 top-1", "PTQ INT8 top-1", "PTQ - FP32", "QAT INT8 top-1", "QAT - FP32",
              "PTQ speed-up", "QAT speed-up"]
    table = markdown_table(header, table_rows)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "CPU")
    note = (f"{cpu}, {torch.get_num_threads()} PyTorch threads; digits (1,437 train / 360 val, 32x32), default "
            f"`repvgg train` recipe, {args.seeds} seeds (mean ± standard deviation, top-1 in %); PTQ: ONNX Runtime "
            f"static QDQ, MinMax, 256 calibration images; QAT: {args.qat_epochs} epochs; speed-up: INT8 / FP32 "
            f"ONNX Runtime throughput at batch 8, 224x224, median over seeds "
            f"({datetime.now(timezone.utc):%Y-%m-%d}).")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8.md").write_text(note + "\n\n" + table + "\n")
    write_json(args.out / "int8.json", {"note": note, "rows": rows})

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    kinds = [("fp32", "FP32"), ("ptq", "PTQ INT8"), ("qat", "QAT INT8")]
    for i, model in enumerate(args.models.split(",")):
        mine = [r for r in rows if r["model"] == model]
        for j, (key, label) in enumerate(kinds):
            values = [r[key] for r in mine]
            x = i + (j - 1) * 0.22
            ax.errorbar([x], [statistics.mean(values)], yerr=[statistics.stdev(values) if len(values) > 1 else 0],
                        fmt="o", capsize=4, color=f"C{j}", label=label if i == 0 else None)
            ax.scatter([x] * len(values), values, s=10, color=f"C{j}", alpha=0.4)
    ax.set_xticks(range(len(args.models.split(","))), args.models.split(","))
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("INT8 accuracy: RepVGG vs QARepVGG block (digits)")
    ax.legend(loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "int8.png", dpi=120)
    print(note + "\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

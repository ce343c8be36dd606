"""Deployed RepVGGplus-L2pse against RepVGG-B3 and ResNet-152 at 224x224 and 320x320 (L2pse is evaluated at 320).

    .venv/bin/python benchmarks/plus_speed.py        # about 2 minutes on 2 cores

Each model converted (RepVGG) or conv-BN folded (ResNet), random weights, timed through the fast path's
`channels_last` runtime in interleaved rounds (medians) by repvgg.perf.claims.measure_models, the harness of the
paper-claims report. Writes benchmarks/results/plus_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from repvgg.perf.claims import measure_models
from repvgg.measure.environment import cpu_features, environment
from repvgg.report import markdown_table
from repvgg.serialization import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("repvggplus_l2pse", "repvgg_b3", "resnet152")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runtime", default="channels_last")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    rows, records = [], {}
    for size in (224, 320):
        measured = measure_models(MODELS, device=args.device, runtime=args.runtime, batch_size=args.batch_size,
                                  rounds=args.rounds, img_size=size)
        reference = measured["resnet152"].throughput
        for name, m in measured.items():
            rows.append([name, size, f"{m.params / 1e6:.2f}", f"{m.macs / 1e9:.2f}", f"{m.throughput:.2f}",
                         f"{m.throughput / reference:.2f}x"])
            records[f"{name}@{size}"] = vars(m)
    where = (f"{environment('cpu')['cpu']} ({cpu_features().describe()}), {torch.get_num_threads()} threads"
             if args.device == "cpu" else environment(args.device).get("gpu"))
    header = (f"Deployed models, float32, `{args.runtime}`, batch {args.batch_size}, median of {args.rounds} "
              f"interleaved rounds; {where}, torch {torch.__version__}.")
    table = markdown_table(["model (deployed)", "input", "params (M)", "GMACs", "images/s", "vs ResNet-152"], rows)
    write_text(args.out / "plus_speed.md", f"{header}\n\n{table}\n")
    write_json(args.out / "plus_speed.json", {"header": header, "models": records})
    print(f"{header}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

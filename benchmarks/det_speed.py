"""Detectors on converted RepVGG backbones against the same detector on ResNet-18 and ResNet-50 (BN folded), and the
real-time kind (``det-train --kind yolo``) beside them; each eager and on the fastest verified path.

    .venv/bin/python benchmarks/det_speed.py        # about 6 minutes on 2 cores

Every FCOS has the same feature pyramid (128 channels, P3-P7) and head (2 convs per tower) over backbone stages 2-4;
the yolo rows are the real-time detector with its defaults (`efficientrep_t` and `_n`). All have random weights for
80 classes, are converted (RepVGG) or conv-BN folded (ResNet), in float32 with channels-last weights, and are timed
whole (resize and normalisation, backbone, neck, head, decoding and NMS) at one input size, batch 1 and 8, in
interleaved rounds (medians). The backbone alone is timed in the same rounds, so its share of the detector's time is
measured, not estimated.

The last column is what ``repvgg predict`` runs a detector file on when it weighs the runtimes
(`repvgg.detection.runtime.detector_runner`): PyTorch eager, or the exported graph in ONNX Runtime or OpenVINO, each
checked against PyTorch on generated scenes and the fastest kept; it is then timed at batch 1, a stream of 8 images
per round, in interleaved rounds. Writes benchmarks/results/det_speed.{md,json,png}.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from repvgg.detection import create_detector
from repvgg.measure.environment import cpu_features, environment
from repvgg.measure.timing import time_interleaved
from repvgg.nn.complexity import count_parameters
from repvgg.nn.convert import reparameterize_model
from repvgg.plots import pyplot, save_figure
from repvgg.report import markdown_table
from repvgg.serialization import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONES = ("repvgg_a0", "repvgg_a1", "repvgg_b1g2", "resnet18", "resnet50")
OPTIONS = dict(kind="fcos", fpn_channels=128, head_convs=2, score_threshold=0.05)


YOLO = ("efficientrep_t", "efficientrep_n")
#: Images per timed round of the fastest verified path (batch 1: this many calls back to back).
STREAM = 8


def _detector(backbone: str, size: int) -> torch.nn.Module:
    options = dict(kind="yolo") if backbone in YOLO else OPTIONS
    model = reparameterize_model(create_detector(backbone, 80, image_size=size, **options))
    return model.eval().to(memory_format=torch.channels_last)


def _name(backbone: str) -> str:
    return f"yolo {backbone}" if backbone in YOLO else backbone


def _fastest_paths(models: dict[str, torch.nn.Module], size: int, rounds: int) -> dict[str, dict]:
    """Each detector's runner as ``predict`` weighs it, then all of them timed at batch 1 in interleaved rounds."""
    from repvgg.dense.scenes import SyntheticConfig, scene
    from repvgg.detection.runtime import detector_runner

    samples = [torch.from_numpy(scene(SyntheticConfig(image_size=size), "val", i).image).permute(2, 0, 1)
               for i in range(4)]
    runners = {name: detector_runner(model, samples) for name, model in models.items()}
    stream = [torch.rand(3, size, size) for _ in range(STREAM)]
    calls = {name: (lambda r=runner: [r(image) for image in stream]) for name, runner in runners.items()}
    with torch.inference_mode():
        timed = time_interleaved(calls, warmup=2, rounds=rounds, pause_s=0.1)
    return {name: {"runtime": runner.backend, "images_per_s": STREAM / timed[name].median,
                   "weighed": runner.images_per_s} for name, runner in runners.items()}


def _eager_speeds(models: dict[str, torch.nn.Module], size: int, batch: int, rounds: int) -> dict[str, dict]:
    """Every detector whole and its backbone alone, eager, in the same interleaved rounds of `STREAM` images."""
    images = [torch.rand(3, size, size) for _ in range(batch)]
    normalised = next(iter(models.values())).transform.normalize(torch.stack(images)).contiguous(
        memory_format=torch.channels_last)
    repeat = max(1, STREAM // batch)
    calls = {}
    for name, model in models.items():
        calls[name] = (lambda m=model: [m(images) for _ in range(repeat)])
        calls[f"{name} backbone"] = (lambda m=model: [m.backbone.body(normalised) for _ in range(repeat)])
    with torch.inference_mode():
        timed = time_interleaved(calls, warmup=2, rounds=rounds, pause_s=0.05)
    records = {}
    for name in models:
        whole, body = timed[name].median / repeat, timed[f"{name} backbone"].median / repeat
        records[name] = {"images_per_s": batch / whole, "ms_per_batch": 1000 * whole, "backbone_share": body / whole}
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=320, help="input side (images are square)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.manual_seed(0)
    models = {_name(name): _detector(name, args.size) for name in (*BACKBONES, *YOLO)}
    records: dict[str, dict] = {name: {"params_m": count_parameters(m) / 1e6,
                                       "backbone_params_m": count_parameters(m.backbone.body) / 1e6}
                                for name, m in models.items()}
    for batch in args.batches:
        for name, record in _eager_speeds(models, args.size, batch, args.rounds).items():
            records[name][f"batch{batch}"] = record
    for name, record in _fastest_paths(models, args.size, args.rounds).items():
        records[name]["fastest"] = record
    reference = "resnet50"
    rows = [[name, f"{r['params_m']:.1f}", *[v for b in args.batches for v in (
             f"{r[f'batch{b}']['images_per_s']:.1f}",
             f"{r[f'batch{b}']['images_per_s'] / records[reference][f'batch{b}']['images_per_s']:.2f}x",
             f"{100 * r[f'batch{b}']['backbone_share']:.0f}%")]] for name, r in records.items()]
    for row, record in zip(rows, records.values()):
        row.append(f"{record['fastest']['runtime']} {record['fastest']['images_per_s']:.1f}")
    header = [f"{h} (batch {b})" for b in args.batches for h in ("images/s", "vs ResNet-50", "backbone share")]
    header.append("fastest verified path, images/s (batch 1)")
    where = f"{environment('cpu')['cpu']} ({cpu_features().describe()}), {torch.get_num_threads()} threads"
    title = (f"FCOS ({OPTIONS['fpn_channels']}-channel pyramid, {OPTIONS['head_convs']} head convs) and the yolo kind "
             f"at {args.size}x{args.size}, float32, channels-last, whole detector incl. NMS, median of {args.rounds} "
             f"interleaved rounds of {STREAM} images; {where}, torch {torch.__version__}.")
    table = markdown_table(["detector (converted / BN folded)", "params (M)", *header], rows)
    write_text(args.out / "det_speed.md", f"{title}\n\n{table}\n")
    write_json(args.out / "det_speed.json", {"title": title, "options": OPTIONS, "size": args.size,
                                              "detectors": records})
    _plot(records, args.batches, args.out / "det_speed.png", title.split(";")[0])
    print(f"{title}\n\n{table}")
    return 0


def _plot(records: dict[str, dict], batches: list[int], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.6))
    for ax, batch in zip(list(axes) if len(batches) > 1 else [axes], batches):
        names = list(records)
        whole = [records[n][f"batch{batch}"]["images_per_s"] for n in names]
        share = [records[n][f"batch{batch}"]["backbone_share"] for n in names]
        colours = ["tab:blue" if n.startswith("repvgg") else "tab:red" if n.startswith("yolo") else "tab:grey"
                   for n in names]
        ax.barh(names, whole, color=colours)
        ax.barh(names, [w * s for w, s in zip(whole, share)], color="none", edgecolor="black", hatch="//",
                label="backbone's share of the time")
        ax.set_xlabel(f"images/s, batch {batch}")
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.14, right=0.98, bottom=0.15, top=0.85, wspace=0.45)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())

"""The real-time RepVGG detector (``det-train --kind yolo``) against ultralytics YOLO11 and YOLOv8, side by side.

    .venv/bin/python benchmarks/det_vs_yolo.py                  # speed, then training; about 25 minutes on 2 cores
    .venv/bin/python benchmarks/det_vs_yolo.py --skip-training  # speed only

ultralytics is AGPL-3.0: it is installed on first use into ``benchmarks/.ultralytics/`` (with NNCF, which its
OpenVINO INT8 export calibrates with) and imported by this script alone; the package never imports it.

**Speed.** Every network is built with random weights for the generated scenes' 4 classes: ours converted (every
block a 3x3 conv), ultralytics' from its own yaml files and fused (``DetectionModel(...).fuse()``). Each is timed in
three deployments, each deployment's networks in interleaved rounds (medians), at each size and batch:

- eager: PyTorch float32, channels-last;
- OpenVINO FP32: ours `repvgg export`'s ONNX file (resize, normalisation, decoding and NMS in the graph), theirs
  ultralytics' own OpenVINO export;
- INT8: ours `repvgg quantize`'s file (QDQ, judged by AP in ONNX Runtime and OpenVINO), run by OpenVINO; theirs
  ultralytics' own OpenVINO INT8 export (NNCF, calibrated on the scenes).

Ours is timed whole (NMS included); theirs as its raw network (no NMS), which favours them. The exported files
take one image, so batch 8 in OpenVINO is 8 calls. Each timed round is 8 different images back to back (batch 1:
8 calls), after a pause of 0.1 s that lets the previous network's thread pool go idle. The timing runs in a fresh
process per size, after every file is exported (an exporter's runtimes left in the process slowed OpenVINO by half,
both theirs and ours). Multiply-adds are counted by ``torch.utils.flop_counter`` for every network at the smallest
size.

**Training.** On the same generated scenes (800 training, 100 validation images at 128 px): `repvgg det-train
--kind yolo` with its defaults, then ultralytics' own recipe for YOLO11n from its yaml (``YOLO("yolo11n.yaml")
.train(...)``, its defaults, batch 16 at 128 px, on the CPU, with as many threads as ours: left to itself it
trains on one less than the CPUs) for the same wall-clock time. Both are scored by
pycocotools on the same validation images (ultralytics predicting at its validation threshold, 0.001).

Writes benchmarks/results/det_vs_yolo.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from repvgg.dense.scenes import SyntheticConfig, scene
from repvgg.detection import create_detector, save_detector
from repvgg.measure.environment import cpu_features, environment
from repvgg.measure.timing import time_interleaved
from repvgg.nn.complexity import count_parameters
from repvgg.nn.convert import reparameterize_model

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PACKAGES = HERE / ".ultralytics"
ULTRALYTICS = ["ultralytics==8.4.190"]
THEIR_DEPENDENCIES = ["ultralytics-thop", "opencv-python-headless", "polars", "requests", "psutil", "scipy", "nncf"]
OURS = ("efficientrep_t", "efficientrep_n", "efficientrep_s")
THEIRS = ("yolo11n", "yolo11s", "yolov8n", "yolov8s")
CLASSES = ["circle", "square", "triangle", "cross"]
#: Images per timed round: batch 1 is timed as this many calls back to back.
STREAM = 8
log = logging.getLogger("det_vs_yolo")


def ensure_ultralytics() -> None:
    """ultralytics and what its exports need, in a folder of this benchmark's own, put last on ``sys.path`` (the
    environment's torch, numpy and openvino win)."""
    if not (PACKAGES / "ultralytics").is_dir():
        log.info("installing %s into %s (AGPL-3.0, for this benchmark only)", ULTRALYTICS[0], PACKAGES)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(PACKAGES)]
        subprocess.run([*pip, "--no-deps", *ULTRALYTICS], check=True)
        subprocess.run([*pip, *THEIR_DEPENDENCIES], check=True)
    sys.path.append(str(PACKAGES))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    threads = torch.get_num_threads()
    import ultralytics  # noqa: F401  (it sets OMP_NUM_THREADS to 1 where unset, which PyTorch may read: set them back)

    torch.set_num_threads(threads)


def write_yolo_dataset(root: Path, size: int, train: int, val: int) -> Path:
    """The generated scenes as an ultralytics dataset (PNGs, one label file per image, a yaml); the yaml's path."""
    config = SyntheticConfig(image_size=size, num_train=train, num_val=val)
    from PIL import Image

    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            drawn = scene(config, split, index)
            Image.fromarray(np.rint(drawn.image * 255).astype(np.uint8)).save(root / "images" / split / f"{index}.png")
            rows = [f"{c - 1} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} "
                    f"{(y2 - y1) / size:.6f}" for (x1, y1, x2, y2), c in zip(drawn.boxes.tolist(),
                                                                            drawn.classes.tolist())]
            (root / "labels" / split / f"{index}.txt").write_text("\n".join(rows) + "\n")
    yaml = root / "scenes.yaml"
    yaml.write_text(json.dumps({"path": str(root), "train": "images/train", "val": "images/val",
                                "names": dict(enumerate(CLASSES))}))
    return yaml


def export_ours(backbone: str, size: int, work: Path) -> None:
    """Our detector at ``size``: its file, `repvgg export`'s ONNX and `repvgg quantize`'s INT8 (random weights, so
    the AP guard compares two zero APs: the files are for timing)."""
    from repvgg.detection.export import export_detector
    from repvgg.quant.detector import quantize_detector

    folder = work / f"{backbone}-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "deploy.safetensors"
    model = reparameterize_model(create_detector(backbone, len(CLASSES), kind="yolo", image_size=size))
    save_detector(model, weights, classes=CLASSES,
                  data={"data": None, "synthetic": {"image_size": size, "num_train": 64, "num_val": 8}})
    export_detector(weights, folder / "fp32.onnx", images=2, overwrite=True)
    quantize_detector(weights, folder / "int8.onnx", calib_images=32, max_ap_drop=100.0, overwrite=True)


def export_theirs(name: str, size: int, data: Path, work: Path) -> None:
    """ultralytics' own OpenVINO exports of ``name`` (random weights from its yaml), FP32 and INT8 (NNCF)."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    config = dict(DetectionModel(f"{name}.yaml", verbose=False).yaml, nc=len(CLASSES))  # the yaml says 80 classes
    yaml = work / f"{name}-{size}" / f"{name}.yaml"  # named as ultralytics names its scales
    yaml.parent.mkdir(parents=True, exist_ok=True)
    yaml.write_text(json.dumps(config))
    for precision in ("fp32", "int8"):
        model = YOLO(str(yaml))
        exported = Path(model.export(format="openvino", imgsz=size, int8=precision == "int8", data=str(data),
                                     fraction=1.0, batch=1, device="cpu"))
        target = work / f"{name}-{size}" / precision  # ultralytics writes beside the model: here, the working folder
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(exported, target)


def load_models(size: int, work: Path) -> dict[str, dict[str, Any]]:
    """Every network at ``size`` from the exported files: name -> ``eager`` (a module), ``whole`` (ours take a list
    of images and return detections; theirs a batch), ``fp32`` and ``int8`` (callables on one image)."""
    from ultralytics.nn.tasks import DetectionModel

    from repvgg.detection.export import onnx_detector
    from repvgg.io.onnx_run import openvino_model

    def raw(xml: Path) -> Callable[[torch.Tensor], Any]:  # compiled as ours are: latency, float32, our threads
        compiled = openvino_model(xml)
        return lambda image: compiled(image[None].numpy())

    models: dict[str, dict[str, Any]] = {}
    for backbone in OURS:
        folder = work / f"{backbone}-{size}"
        eager = reparameterize_model(create_detector(backbone, len(CLASSES), kind="yolo", image_size=size)).eval()
        models[f"ours {backbone.split('_')[1]}"] = {
            "eager": eager.to(memory_format=torch.channels_last), "whole": True,
            **{p: onnx_detector(folder / f"{p}.onnx", "openvino") for p in ("fp32", "int8")}}
    fcos = reparameterize_model(create_detector("repvgg_a0", len(CLASSES), image_size=size)).eval()
    models["FCOS RepVGG-A0"] = {"eager": fcos.to(memory_format=torch.channels_last), "whole": True}
    for name in THEIRS:
        net = DetectionModel(f"{name}.yaml", nc=len(CLASSES), verbose=False).fuse(verbose=False).eval()
        models[name] = {"eager": net.to(memory_format=torch.channels_last), "whole": False,
                        **{p: raw(next((work / f"{name}-{size}" / p).glob("*.xml"))) for p in ("fp32", "int8")}}
    return models


def multiply_adds(models: dict[str, dict[str, Any]], size: int) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    image = torch.rand(3, size, size)
    for name, entry in models.items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            entry["eager"]([image]) if entry["whole"] else entry["eager"](image[None])
        counts[name] = counter.get_total_flops() / 2e9
    return counts


def time_models(models: dict[str, dict[str, Any]], size: int, batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """Images/s of every network in every deployment it has, at ``batch``: each deployment's networks timed in the
    same interleaved rounds, after a pause (the runtimes' thread pools are not left spinning beside another runtime's
    work). A timed round is `STREAM` different images, back to back in calls of ``batch``: a stream, as a camera sends
    them, not one call after an idle pause (whose wake-up would be timed with it), nor one image again and again
    (which would stay in the cache)."""
    frames = [torch.rand(3, size, size) for _ in range(max(batch, STREAM))]
    batches = [frames[i:i + batch] for i in range(0, len(frames), batch)]
    stacked = [torch.stack(b).contiguous(memory_format=torch.channels_last) for b in batches]
    result: dict[str, dict[str, float]] = {name: {} for name in models}
    for deployment in ("eager", "fp32", "int8"):
        calls: dict[str, Callable[[], Any]] = {}
        for name, entry in models.items():
            if deployment == "eager":
                net = entry["eager"]
                calls[name] = ((lambda n=net: [n(b) for b in batches]) if entry["whole"] else
                               (lambda n=net: [n(b) for b in stacked]))
            elif deployment in entry:
                calls[name] = lambda run=entry[deployment]: [run(image) for image in frames]
        with torch.inference_mode():
            timed = time_interleaved(calls, warmup=2, rounds=rounds, pause_s=0.1)
        for name, timing in timed.items():
            result[name][deployment] = len(frames) / timing.median
    return result


def time_size(args: argparse.Namespace) -> int:
    """The child process's work: time every network at ``--time-size`` and write the record as JSON to stdout."""
    models = load_models(args.time_size, args.work)
    record = {"batch": {str(b): time_models(models, args.time_size, b, args.rounds) for b in args.batches},
              "params_m": {n: count_parameters(e["eager"]) / 1e6 for n, e in models.items()},
              "gmacs": multiply_adds(models, args.time_size), "threads": torch.get_num_threads()}
    sys.stdout.write(json.dumps(record))
    return 0


def speed(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """Export everything, then time each size in a fresh process (nothing of the exporters' runtimes left in it)."""
    records: dict[str, Any] = {}
    for size in args.sizes:
        for backbone in OURS:
            export_ours(backbone, size, args.work)
        for name in THEIRS:
            export_theirs(name, size, data, args.work)
        child = subprocess.run([sys.executable, __file__, "--time-size", str(size), "--rounds", str(args.rounds),
                                "--work", str(args.work), "--threads", str(args.threads),
                                "--batches", *map(str, args.batches)],
                               check=True, stdout=subprocess.PIPE, text=True)
        records[str(size)] = json.loads(child.stdout)
        log.info("%s", json.dumps(records[str(size)]["batch"], indent=1))
    records["gmacs_at"] = min(args.sizes)
    records["gmacs"] = records[str(min(args.sizes))]["gmacs"]
    return records


def train_both(work: Path, data: Path, epochs: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Ours with its defaults (``epochs``: fewer, for a quick check of this script), then YOLO11n by ultralytics'
    recipe for the same wall-clock time; both AP by pycocotools on the same validation scenes."""
    from ultralytics import YOLO

    from repvgg.detection import DetTrainConfig, build_validation_set, train_detector
    from repvgg.detection.metrics import coco_scores, detect

    import ultralytics.utils.torch_utils as their_torch_utils

    # ultralytics trains on (and its exporter leaves PyTorch at) one thread less than the CPUs: both get them all
    threads = torch.get_num_threads() if threads is None else threads
    their_torch_utils.NUM_THREADS = threads
    torch.set_num_threads(threads)
    started = time.perf_counter()
    ours = train_detector(DetTrainConfig(kind="yolo", epochs=epochs, output=str(work / "ours-run"), overwrite=True))
    wall = time.perf_counter() - started
    model = YOLO("yolo11n.yaml")
    started = time.perf_counter()
    model.train(data=str(data), imgsz=128, batch=16, time=wall / 3600, device="cpu", project=str(work),
                name="yolo11n-run", exist_ok=True, plots=False, verbose=False)
    their_wall = time.perf_counter() - started
    trained = YOLO(str(work / "yolo11n-run" / "weights" / "best.pt"))

    def predict(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        results = trained.predict(torch.stack(images), imgsz=128, conf=0.001, verbose=False)
        return [{"boxes": r.boxes.xyxy.cpu(), "scores": r.boxes.conf.cpu(), "labels": r.boxes.cls.cpu().long()}
                for r in results]

    _, val = build_validation_set(None, image_size=128, synthetic=SyntheticConfig(image_size=128))
    theirs = coco_scores(val.coco, detect(predict, torch.utils.data.DataLoader(val, batch_size=16)))
    return {"ours": {"ap": ours["val_ap_deploy"], "ap50": ours["val_ap50_deploy"], "wall_s": wall,
                     "epochs": ours["epochs"]},
            "yolo11n": {"ap": theirs["ap"], "ap50": theirs["ap50"], "wall_s": their_wall}}


def report(records: dict[str, Any], training: dict[str, Any] | None, args: argparse.Namespace) -> str:
    from repvgg.report import markdown_table

    threads = records[str(args.sizes[0])]["threads"]
    where = (f"{environment('cpu')['cpu']} ({cpu_features().describe()}), {threads} PyTorch and OpenVINO threads, "
             f"torch {torch.__version__}")
    lines = [f"Images/s, medians of {args.rounds} interleaved rounds, random weights, 4 classes; {where}. Ours whole "
             f"(resize, NMS included), ultralytics' raw network. A timed round is a stream of {STREAM} different "
             f"images (batch 1: {STREAM} calls back to back). OpenVINO and INT8 files take one image: batch 8 is 8 "
             "calls.", ""]
    names = list(records[str(args.sizes[0])]["params_m"])
    header = ["network", "params (M)", f"GMACs at {records['gmacs_at']}"] + [
        f"{size} b{batch} {d}" for size in args.sizes for batch in args.batches for d in ("eager", "OV FP32", "INT8")]
    rows = []
    for name in names:
        row = [name, f"{records[str(args.sizes[0])]['params_m'][name]:.2f}", f"{records['gmacs'][name]:.2f}"]
        for size in args.sizes:
            for batch in args.batches:
                speeds = records[str(size)]["batch"][str(batch)][name]
                row += [f"{speeds[d]:.1f}" if d in speeds else "-" for d in ("eager", "fp32", "int8")]
        rows.append(row)
    lines += [markdown_table(header, rows), ""]
    first = records[str(args.sizes[0])]["batch"][str(args.batches[0])]
    best = max(first["ours t"].values())
    lines.append(f"At {args.sizes[0]}, batch {args.batches[0]}: ours t eager (NMS included) / YOLO11n raw eager = "
                 f"{first['ours t']['eager'] / first['yolo11n']['eager']:.2f}x; ours t best deployment / YOLO11n's "
                 f"OpenVINO INT8 = {best / first['yolo11n']['int8']:.2f}x.")
    if training:
        wall = training["ours"]["wall_s"]
        lines += ["", f"Training on the generated scenes for the same wall-clock time ({wall:.0f} s), AP by "
                  "pycocotools on the same 100 validation scenes:", "",
                  markdown_table(["detector", "wall-clock (s)", "AP", "AP50"], [
                      [name, f"{t['wall_s']:.0f}", f"{100 * t['ap']:.2f}", f"{100 * t['ap50']:.2f}"]
                      for name, t in (("ours t (det-train --kind yolo)", training["ours"]),
                                      ("YOLO11n (ultralytics' recipe)", training["yolo11n"]))])]
    return "\n".join(lines) + "\n"


def plot(records: dict[str, Any], training: dict[str, Any], size: int, path: Path) -> None:
    from repvgg.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    speeds = records[str(size)]["batch"]["1"]
    for name, key, colour in (("ours t", "ours", "tab:blue"), ("yolo11n", "yolo11n", "tab:red")):
        for deployment, marker in (("eager", "o"), ("fp32", "s"), ("int8", "^")):
            ax.scatter(speeds[name][deployment], 100 * training[key]["ap50"], color=colour, marker=marker,
                       label=f"{name} {deployment}")
    ax.set_xlabel(f"images/s at {size}x{size}, batch 1")
    ax.set_ylabel("AP50 on the generated scenes (%)")
    ax.set_title("speed against AP, same training wall-clock")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--train-epochs", type=int, default=None, help="our run's epochs (default: det-train's)")
    parser.add_argument("--work", type=Path, default=HERE / ".ultralytics-work", help="exports and runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--time-size", type=int, default=None, help=argparse.SUPPRESS)  # the timing child
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="PyTorch and OpenVINO threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    ensure_ultralytics()
    torch.set_num_threads(args.threads)  # a child inherits ultralytics' OMP_NUM_THREADS=1
    torch.manual_seed(0)
    if args.time_size is not None:
        return time_size(args)
    data = write_yolo_dataset(args.work / "scenes", 128, 800, 100)
    records = speed(args, data)
    training = None if args.skip_training else train_both(args.work, data, args.train_epochs, args.threads)
    from repvgg.serialization import write_json, write_text

    write_text(args.out / "det_vs_yolo.md", report(records, training, args))
    write_json(args.out / "det_vs_yolo.json", {"speed": records, "training": training, "sizes": args.sizes})
    if training:
        plot(records, training, args.sizes[0], args.out / "det_vs_yolo.png")
    print((args.out / "det_vs_yolo.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

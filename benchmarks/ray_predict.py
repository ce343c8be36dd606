"""Plain `repvgg predict` (two decoding workers) against `repvgg predict --ray local` with 1 and 2 actors, on the same
folder of 224 x 224 JPEGs and the same model (RepVGG-A0, converted, random weights).

Each command runs as a user runs it (a fresh process), on a small and a large collection. From the two sizes come
each mode's steady rate (the extra images over the extra seconds: start-up, the cluster's and each actor's, cancels
out) and its fixed cost (what the whole command took beyond its images at that rate), hence the collection size
from which Ray pays on this machine and Ray's cost per image. The driver's own work per image (listing a path,
parsing one JSON answer) is timed in this process: the ceiling of one driver on a cluster.

    python benchmarks/ray_predict.py            # about 7 minutes on 2 cores; results/ray_predict.{md,json}
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from repvgg.measure.environment import cpu_features, environment
from repvgg.report import markdown_table
from repvgg.serialization import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"


def _images(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth content: a realistic JPEG size
        buffer = io.BytesIO()
        Image.fromarray(base).resize((224, 224), Image.BILINEAR).save(buffer, "JPEG", quality=90)
        (folder / f"{i:04d}.jpg").write_bytes(buffer.getvalue())


def _artifact(folder: Path) -> Path:
    import repvgg

    model = repvgg.reparameterize_model(repvgg.create_model("repvgg_a0", num_classes=1000)).eval()
    return repvgg.save_weights(model, folder / "repvgg_a0.safetensors")


def _run(artifact: Path, folder: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "repvgg", "predict", str(artifact), str(folder), "--json", *extra]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    document = json.loads(result.stdout)
    return {"images": document["images"], "wall_s": wall, "predict_s": document["seconds"],
            "runtime": document["runtime"], "sources": [p["source"] for p in document["predictions"]],
            "top1": [p["classes"][0] for p in document["predictions"]]}


def _driver_cost_per_image(rows: int = 20000) -> float:
    """Seconds of the driver's CPU per image: a path listed into a row, one JSON answer parsed into a prediction."""
    from repvgg.predict.predictor import Prediction

    answer = json.dumps({"source": "/data/x/0001.jpg", "classes": ["tench"] * 5, "indices": [0, 1, 2, 3, 4],
                         "probabilities": [0.5, 0.2, 0.1, 0.1, 0.1], "error": None})
    started = time.process_time()
    for i in range(rows):
        item = {"path": f"/data/x/{i:07d}.jpg"}
        row = json.loads(answer)
        Prediction(row["source"], tuple(row["classes"]), tuple(row["indices"]), tuple(row["probabilities"]),
                   row["error"])
        del item
    return (time.process_time() - started) / rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--runtime", default="openvino", help="every mode's runtime (auto: each process, and each "
                        "actor, weighs its own; the weighing is then most of the fixed cost, and actors with one "
                        "thread may pick another runtime than plain predict, whose near-tied classes on random "
                        "weights then differ)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command (the median wall time)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats takes 1 or more")
    pinned = ["--runtime", args.runtime] if args.runtime != "auto" else []
    modes = {"plain predict, 2 decoding workers": ["--workers", "2", *pinned],
             "--ray local, 1 actor": ["--ray", "local", "--ray-actors", "1", *pinned],
             "--ray local, 2 actors": ["--ray", "local", "--ray-actors", "2", *pinned]}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        artifact = _artifact(root)
        for size in (args.small, args.large):
            _images(root / str(size), size)
        walls: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):  # the modes interleaved: the machine's drift favours none
            for name, extra in modes.items():
                for size in (args.small, args.large):
                    run = _run(artifact, root / str(size), extra)
                    results.setdefault(name, {}).setdefault(size, run)  # the first run's answers
                    walls.setdefault((name, size), []).append(run["wall_s"])
                    print(f"{name}: {size} images in {run['wall_s']:.1f} s", file=sys.stderr)
        for (name, size), times in walls.items():
            results[name][size]["wall_s"] = float(np.median(times))
            results[name][size]["walls_s"] = times
    plain_large = results["plain predict, 2 decoding workers"][args.large]
    rows, summary = [], {}
    for name, runs in results.items():
        small, large = runs[args.small], runs[args.large]
        steady = (args.large - args.small) / (large["wall_s"] - small["wall_s"])
        fixed = large["wall_s"] - args.large / steady
        same = large["sources"] == plain_large["sources"] and np.mean(
            [a == b for a, b in zip(large["top1"], plain_large["top1"])])
        summary[name] = {"steady_images_per_s": steady, "fixed_s": fixed, "runtime": large["runtime"],
                         "end_to_end_images_per_s": args.large / large["wall_s"], "same_as_plain": same,
                         "wall_s": {str(k): v["wall_s"] for k, v in runs.items()},
                         "walls_s": {str(k): v["walls_s"] for k, v in runs.items()}}
    base = summary["plain predict, 2 decoding workers"]
    for name, s in summary.items():
        s["of_plain_steady"] = s["steady_images_per_s"] / base["steady_images_per_s"]
        s["cost_per_image_ms"] = 1000 * (1 / s["steady_images_per_s"] - 1 / base["steady_images_per_s"])
        gain = 1 / base["steady_images_per_s"] - 1 / s["steady_images_per_s"]
        s["pays_from_images"] = (s["fixed_s"] - base["fixed_s"]) / gain if gain > 0 else None
        rows.append([name, s["runtime"], f"{s['wall_s'][str(args.small)]:.1f}", f"{s['wall_s'][str(args.large)]:.1f}",
                     f"{s['end_to_end_images_per_s']:.1f}", f"{s['steady_images_per_s']:.1f}",
                     f"{100 * s['of_plain_steady']:.0f}%", f"{s['fixed_s']:.1f}",
                     "-" if s is base else f"{s['cost_per_image_ms']:+.2f}",
                     "-" if s is base else (f"{s['pays_from_images']:,.0f}" if s["pays_from_images"] else "never"),
                     f"{100 * s['same_as_plain']:.1f}%"])
    driver = _driver_cost_per_image()
    where = f"{environment('cpu')['cpu']} ({cpu_features().describe()}), {os.cpu_count()} cores"
    title = (f"`repvgg predict` on {args.small} and {args.large} JPEGs of 224 x 224 (RepVGG-A0, converted, random "
             f"weights, --runtime {args.runtime}; each command a fresh process, its median wall time of "
             f"{args.repeats}): {where}, torch "
             f"{torch.__version__}.")
    table = markdown_table(["mode", "runtime", f"{args.small} images s", f"{args.large} images s",
                            f"end to end images/s ({args.large})", "steady images/s", "of plain (steady)",
                            "fixed cost s", "Ray's cost ms/image", "pays from images", "top-1 as plain's"], rows)
    note = (f"Each command run {args.repeats} times, the modes interleaved; its median wall time. Steady rate: "
            f"({args.large} - {args.small}) images over the difference of the two wall times; fixed "
            "cost: the large run's wall time beyond its images at that rate. The driver's own work per image "
            f"(a path listed, one JSON answer parsed): {1e6 * driver:.1f} us of its CPU, a ceiling of "
            f"{1 / driver:,.0f} images/s for one driver.")
    write_text(args.out / "ray_predict.md", f"{title}\n\n{table}\n\n{note}\n")
    write_json(args.out / "ray_predict.json", {"title": title, "modes": summary, "driver_s_per_image": driver,
                                               "small": args.small, "large": args.large})
    print(f"{title}\n\n{table}\n\n{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

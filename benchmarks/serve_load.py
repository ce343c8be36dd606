"""HTTP load on `repvgg serve`, beside the in-process Predictor on the same artifact and images.

    .venv/bin/python benchmarks/serve_load.py        # about 4 minutes on 2 cores

The artifact is RepVGG-A0 (converted, random weights, 1000 classes) at 224 x 224 unless --artifact names one. The
images are 64 generated 256 x 256 JPEG files. First the in-process `Predictor` (the same runtime choice, batch
--max-batch) predicts the files, decoding included: its images/s is the reference. Then `repvgg serve` starts on
127.0.0.1 (a free port) and an httpx asyncio client uploads the files to /predict at each concurrency, every level
bounded in requests (--requests) and seconds (--seconds), after a warm-up. Reported per level: throughput, p50, p95
and p99 latency, answers by status; and the server's RSS (VmRSS) when ready, after the warm-up (the first batches'
one-time allocations) and after the whole run. The server is stopped
with SIGTERM and must exit 0. Beside them: a lone request's p50 against the in-process `Predictor(batch_size=1)`'s
latency per file (decoding included), and, on 32 x 32 PNGs at concurrency 16, `repvgg serve` on a RepVGG-tiny at 32
px against a bare FastAPI + uvicorn endpoint that reads the upload and answers a constant, the same client in the
same run; and the real-time detector served at concurrency 8 against its in-process `DetectionPredictor`. Writes
benchmarks/results/serve_load.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from repvgg.measure.environment import cpu_features, environment
from repvgg.report import markdown_table
from repvgg.serialization import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("serve_load")


def _artifact(folder: Path) -> Path:
    import repvgg

    model = repvgg.reparameterize_model(repvgg.create_model("repvgg_a0", num_classes=1000)).eval()
    return repvgg.save_weights(model, folder / "repvgg_a0.safetensors")


def _images(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth content: a realistic JPEG size
        image = Image.fromarray(base).resize((256, 256), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        path = folder / f"{i:03d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def _in_process(artifact: Path, paths: list[Path], batch: int, runtime: str, rounds: int) -> dict:
    from repvgg.predict.predictor import Predictor

    predictor = Predictor(artifact, batch_size=batch, runtime=runtime)
    predictor.predict(paths[:batch])  # warm-up
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        predictor.predict(paths)
        rates.append(len(paths) / (time.perf_counter() - started))
    return {"images_per_s": float(np.median(rates)), "rounds": rates, "runtime": predictor.backend,
            "dtype": predictor.dtype}


def _lone_in_process(artifact: Path, paths: list[Path], runtime: str) -> dict:
    """The in-process `Predictor(batch_size=1)`'s latency per file (decoding included): what a lone request is
    measured against."""
    from repvgg.predict.predictor import Predictor

    predictor = Predictor(artifact, batch_size=1, runtime=runtime)
    predictor.predict(paths[:4])  # warm-up
    latencies = []
    for path in paths * 2:
        started = time.perf_counter()
        predictor.predict([path])
        latencies.append(time.perf_counter() - started)
    return {"p50_ms": 1000 * float(np.median(latencies)), "runtime": predictor.backend}


def _small_artifact(folder: Path) -> Path:
    """A converted RepVGG-tiny at 32 x 32 (10 classes, random weights): the digits run's size."""
    import json

    import repvgg

    model = repvgg.reparameterize_model(repvgg.create_model("repvgg_tiny", num_classes=10)).eval()
    extra = {"preprocessing": json.dumps({"img_size": 32})}
    return repvgg.save_weights(model, folder / "repvgg_tiny_32.safetensors", extra=extra)


def _small_images(count: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(1)
    payloads = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(buffer, "PNG")
        payloads.append(buffer.getvalue())
    return payloads


#: The bare endpoint the small-image row is measured against: FastAPI and uvicorn reading the upload, answering a
#: constant.
_BARE = """
import sys
import uvicorn
from fastapi import FastAPI, File, UploadFile
app = FastAPI()
@app.post("/predict")
async def predict(file: UploadFile = File(...)) -> dict:
    await file.read()
    return {"classes": ["0"], "probabilities": [1.0]}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def _bare_server(logs: Path) -> tuple[subprocess.Popen, str]:
    import socket

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", _BARE, str(port)], stdout=subprocess.DEVNULL,
                            stderr=open(logs, "w"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(url + "/docs")
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"the bare endpoint did not start:\n{logs.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _small_rows(folder: Path, args: argparse.Namespace, rounds: int = 5) -> dict:
    """`repvgg serve` on 32 x 32 PNGs against the bare endpoint, the same client (concurrency 16) in this run: both
    servers up, timed in interleaved rounds (bare, ours, ours, bare, ...: the machine's drift favours neither), the
    medians compared."""
    payloads = _small_images(64)
    names = ("bare FastAPI + uvicorn", "repvgg serve")
    servers = {names[0]: _bare_server(folder / "bare.log"),
               names[1]: _start_server(_small_artifact(folder), args, folder / "small.log")}
    runs: dict[str, list[dict]] = {name: [] for name in names}
    try:
        for _, url in servers.values():
            asyncio.run(_load(url, payloads, 16, 256, 30))  # warm-up
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                runs[name].append(asyncio.run(_load(servers[name][1], payloads, 16, args.requests * 2,
                                                    args.seconds)))
    finally:
        for proc, _ in servers.values():
            _stop(proc)
    small: dict = {}
    for name in names:
        rates = [run["images_per_s"] for run in runs[name]]
        middle = runs[name][int(np.argsort(rates)[len(rates) // 2])]
        small[name] = {**middle, "rounds": rates}
    small["ratio"] = small[names[1]]["images_per_s"] / small[names[0]]["images_per_s"]
    small["round_ratios"] = [o["images_per_s"] / b["images_per_s"] for b, o in zip(runs[names[0]], runs[names[1]])]
    return small


def _detector_row(folder: Path, paths: list[Path], args: argparse.Namespace) -> dict:
    """The real-time detector (`efficientrep_t` at 320, converted, random weights, 4 classes) served at concurrency 8
    against its in-process `DetectionPredictor` on the same files (decoding included), both on the runtime each
    weighs as the fastest that detects as PyTorch does."""
    from repvgg.detection import create_detector, save_detector
    from repvgg.detection.predict import DetectionPredictor
    from repvgg.nn.convert import reparameterize_model

    model = reparameterize_model(create_detector("efficientrep_t", 4, kind="yolo", image_size=320))
    artifact = save_detector(model, folder / "yolo_t.safetensors", classes=["a", "b", "c", "d"],
                             data={"data": None, "synthetic": {"image_size": 320, "num_train": 64, "num_val": 8}})
    predictor = DetectionPredictor(artifact)
    sources = [str(p) for p in paths]
    list(predictor.iter_predict(sources[:4]))  # warm-up
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        list(predictor.iter_predict(sources))
        rates.append(len(sources) / (time.perf_counter() - started))
    proc, url = _start_server(artifact, args, folder / "detector.log")
    try:
        payloads = [p.read_bytes() for p in paths]
        asyncio.run(_load(url, payloads, 8, 64, 60))  # warm-up
        served = asyncio.run(_load(url, payloads, 8, args.requests, args.seconds))
    finally:
        _stop(proc)
    in_process = float(np.median(rates))
    return {"in_process_images_per_s": in_process, "runtime": predictor.backend, "served": served,
            "ratio": served["images_per_s"] / in_process}


def _rss_kib(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


async def _load(url: str, payloads: list[bytes], concurrency: int, requests: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: Counter = Counter()
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient, k: int) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            data = payloads[sent % len(payloads)]
            sent += 1
            started = time.perf_counter()
            try:
                response = await client.post(url + "/predict", files={"file": (f"{k}.jpg", data, "image/jpeg")})
                statuses[str(response.status_code)] += 1
            except httpx.HTTPError as err:
                statuses[type(err).__name__] += 1
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client, k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": elapsed,
            "images_per_s": statuses.get("200", 0) / elapsed, "statuses": dict(statuses),
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def _start_server(artifact: Path, args: argparse.Namespace, logs: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    cmd = [sys.executable, "-m", "repvgg", "serve", str(artifact), "--port", "0", "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--runtime", args.runtime, "--max-queue", "256"]
    err = open(logs, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.monotonic() + 600
    url = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.findall(r"listening on (http://127\.0\.0\.1:\d+)", logs.read_text())
        if found:
            url = found[0]
            try:
                if httpx.get(url + "/v2/health/ready").status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"the server did not become ready:\n{logs.read_text()[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=None, help="a model artifact (default: RepVGG-A0, random)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=384, help="most requests per concurrency level")
    parser.add_argument("--seconds", type=float, default=30.0, help="most seconds per concurrency level")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's (its default)")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        artifact = args.artifact or _artifact(folder)
        paths = _images(folder, 64)
        payloads = [p.read_bytes() for p in paths]
        log.info("in-process Predictor on %d files", len(paths))
        reference = _in_process(artifact, paths, args.max_batch, args.runtime, rounds=3)
        lone = _lone_in_process(artifact, paths, args.runtime)
        proc, url = _start_server(artifact, args, folder / "server.log")
        try:
            rss_ready = _rss_kib(proc.pid)
            # warm-up: the first batches of each size and the threads' allocator arenas are one-time memory
            asyncio.run(_load(url, payloads, max(args.concurrency), 4 * max(args.concurrency), 60))
            rss_before = _rss_kib(proc.pid)
            levels = []
            for concurrency in args.concurrency:
                level = asyncio.run(_load(url, payloads, concurrency, args.requests, args.seconds))
                level["vs_predictor"] = level["images_per_s"] / reference["images_per_s"]
                log.info("concurrency %d: %.1f images/s (%.0f%% of in-process), p50 %.0f ms, p99 %.0f ms, %s",
                         concurrency, level["images_per_s"], 100 * level["vs_predictor"], level["p50_ms"],
                         level["p99_ms"], level["statuses"])
                levels.append(level)
            rss_after = _rss_kib(proc.pid)
        finally:
            exit_status = _stop(proc)
        small = _small_rows(folder, args)
        detector = _detector_row(folder, paths, args)
    rss_growth = (rss_after - rss_before) / rss_before
    rows = [[lv["concurrency"], lv["requests"], f"{lv['images_per_s']:.1f}", f"{100 * lv['vs_predictor']:.0f}%",
             f"{lv['p50_ms']:.0f}", f"{lv['p95_ms']:.0f}", f"{lv['p99_ms']:.0f}",
             ", ".join(f"{k}: {v}" for k, v in sorted(lv["statuses"].items()))] for lv in levels]
    where = f"{environment('cpu')['cpu']} ({cpu_features().describe()}), {os.cpu_count()} cores"
    name = artifact.name if args.artifact else "RepVGG-A0 (converted, random weights) at 224 x 224"
    title = (f"`repvgg serve` under HTTP load (/predict, one 256 x 256 JPEG per request, --max-batch {args.max_batch}, "
             f"--max-wait-ms {args.max_wait_ms:g}) on {name}: {where}, torch {torch.__version__}. In-process "
             f"Predictor on the same files (decoding included, batch {args.max_batch}, {reference['runtime']} "
             f"{reference['dtype']}): {reference['images_per_s']:.1f} images/s. Server RSS {rss_ready / 1024:.0f} MiB "
             f"when ready, {rss_before / 1024:.0f} MiB after a warm-up of {4 * max(args.concurrency)} requests, "
             f"{rss_after / 1024:.0f} MiB after the run ({100 * rss_growth:+.1f}% over the run); SIGTERM exit status "
             f"{exit_status}.")
    table = markdown_table(["concurrency", "requests", "images/s", "of in-process", "p50 ms", "p95 ms", "p99 ms",
                            "answers"], rows)
    single = next((lv for lv in levels if lv["concurrency"] == 1), None)
    extra = []
    if single is not None:
        extra.append(f"A lone request (concurrency 1): p50 {single['p50_ms']:.1f} ms against the in-process "
                     f"Predictor(batch_size=1)'s {lone['p50_ms']:.1f} ms per file ({lone['runtime']}): "
                     f"{single['p50_ms'] / lone['p50_ms']:.2f}x.")
    extra.append(markdown_table(["32 x 32 PNGs, concurrency 16", "requests", "requests/s", "p50 ms", "p99 ms"], [
        [name, small[name]["requests"], f"{small[name]['images_per_s']:.1f}", f"{small[name]['p50_ms']:.1f}",
         f"{small[name]['p99_ms']:.1f}"] for name in ("bare FastAPI + uvicorn", "repvgg serve")]))
    extra.append(f"`repvgg serve` (RepVGG-tiny at 32 x 32) delivers {small['ratio']:.2f} of the bare endpoint's "
                 "requests/s (FastAPI and uvicorn reading the upload and answering a constant), to the same client: "
                 f"medians of {len(small['round_ratios'])} interleaved rounds of {small['repvgg serve']['requests']} "
                 "requests each (each round's ratio: "
                 f"{', '.join(f'{r:.2f}' for r in small['round_ratios'])}).")
    served = detector["served"]
    extra.append(f"The real-time detector (`efficientrep_t` at 320, random weights) served at concurrency 8: "
                 f"{served['images_per_s']:.1f} images/s (p50 {served['p50_ms']:.0f} ms, answers "
                 f"{served['statuses']}) against its in-process `DetectionPredictor` on the same files "
                 f"({detector['runtime']}): {detector['in_process_images_per_s']:.1f} images/s, "
                 f"{100 * detector['ratio']:.0f}%.")
    table = table + "\n\n" + "\n\n".join(extra)
    write_text(args.out / "serve_load.md", f"{title}\n\n{table}\n")
    write_json(args.out / "serve_load.json", {"title": title, "predictor": reference, "levels": levels,
                                               "lone_in_process": lone, "small_images": small,
                                               "detector": detector,
                                               "rss_kib": {"ready": rss_ready, "before": rss_before,
                                                           "after": rss_after},
                                               "sigterm_exit_status": exit_status, "args": {
                                                   k: str(v) if isinstance(v, Path) else v
                                                   for k, v in vars(args).items()}})
    print(f"{title}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

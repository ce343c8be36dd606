"""HTTP load on `repvgg serve`, beside the in-process Predictor on the same artifact and images.

    .venv/bin/python benchmarks/serve_load.py        # about 2 minutes on 2 cores

The artifact is RepVGG-A0 (converted, random weights, 1000 classes) at 224 x 224 unless --artifact names one. The
images are 64 generated 256 x 256 JPEG files. First the in-process `Predictor` (the same runtime choice, batch
--max-batch) predicts the files, decoding included: its images/s is the reference. Then `repvgg serve` starts on
127.0.0.1 (a free port) and an httpx asyncio client uploads the files to /predict at each concurrency, every level
bounded in requests (--requests) and seconds (--seconds), after a warm-up. Reported per level: throughput, p50, p95
and p99 latency, answers by status; and the server's RSS (VmRSS) when ready, after the warm-up (the first batches'
one-time allocations) and after the whole run. The server is stopped
with SIGTERM and must exit 0. Writes benchmarks/results/serve_load.{md,json}.
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
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
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
            proc.send_signal(signal.SIGTERM)
            exit_status = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
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
    write_text(args.out / "serve_load.md", f"{title}\n\n{table}\n")
    write_json(args.out / "serve_load.json", {"title": title, "predictor": reference, "levels": levels,
                                               "rss_kib": {"ready": rss_ready, "before": rss_before,
                                                           "after": rss_after},
                                               "sigterm_exit_status": exit_status, "args": {
                                                   k: str(v) if isinstance(v, Path) else v
                                                   for k, v in vars(args).items()}})
    print(f"{title}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Hostile clients against `repvgg serve`: how long liveness and a legitimate /predict wait while they attack.

    .venv/bin/python benchmarks/serve_abuse.py        # about a minute on 2 cores

`repvgg serve` runs RepVGG-A0 (converted, random weights) at 224 x 224 on 127.0.0.1 (a free port) with
`--max-queue 8 --max-batch 8` and the default 5 s header timeout. Each attack runs for a bounded time while a probe
asks for liveness and uploads a 256 x 256 JPEG to /predict every 0.2 s; reported: the worst latency of each, and
the answers. The attacks:

- slowloris: 300 connections sending a request's headers a byte a second;
- idle: 256 connections that send nothing;
- both at once;
- decode flood: 3 concurrent infer requests of eight 8192 x 8192 PNGs each (legal: at the pixel limit);
- burst: 64 simultaneous /predict uploads;
- a lying Content-Length of 12 GB: the bytes the server takes before closing the connection.

The server is stopped with SIGTERM and must exit 0. Writes benchmarks/results/serve_abuse.{md,json}.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from repvgg.report import markdown_table
from repvgg.serialization import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("serve_abuse")


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (120, 80, 40)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _big_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8192, 8192), (30, 60, 90)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _start(artifact: Path, logs: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "repvgg", "serve", str(artifact), "--port", "0", "--max-batch", "8", "--max-queue",
           "8", "--runtime", "eager"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(logs, "w"), start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.findall(r"listening on (http://127\.0\.0\.1:\d+)", logs.read_text())
        if found:
            try:
                if httpx.get(found[0] + "/v2/health/ready").status_code == 200:
                    return proc, found[0]
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"the server did not become ready:\n{logs.read_text()[-3000:]}")


def _probe(url: str, seconds: float, image: bytes) -> dict[str, Any]:
    """Liveness and a /predict every 0.2 s for ``seconds``: the worst latency of each and the answers."""
    worst = {"live": 0.0, "predict": 0.0}
    answers: Counter = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, call in (("live", lambda: httpx.get(url + "/v2/health/live", timeout=30)),
                           ("predict", lambda: httpx.post(url + "/predict", timeout=30,
                                                          files={"file": ("x.jpg", image, "image/jpeg")}))):
            started = time.perf_counter()
            try:
                answers[f"{name} {call().status_code}"] += 1
            except httpx.HTTPError as err:
                answers[f"{name} {type(err).__name__}"] += 1
            worst[name] = max(worst[name], time.perf_counter() - started)
        time.sleep(0.2)
    return {"worst_live_s": worst["live"], "worst_predict_s": worst["predict"], "answers": dict(answers)}


def _connections(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]


def _under(url: str, port: int, slow: int, idle: int, seconds: float, image: bytes) -> dict[str, Any]:
    """``slow`` slowloris and ``idle`` idle connections for ``seconds``, probed; how many the server closed."""
    slow_socks, idle_socks = _connections(port, slow), _connections(port, idle)
    header, stop = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: a\r\n" * 100, threading.Event()

    def drip() -> None:
        for i in range(len(header)):
            for sock in slow_socks:
                try:
                    sock.send(header[i: i + 1])
                except OSError:
                    pass
            if stop.wait(1.0):
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        result = _probe(url, seconds, image)
    finally:
        stop.set()
        dripper.join()
    result["closed_by_server"] = sum(_closed(s) for s in slow_socks + idle_socks)
    for sock in slow_socks + idle_socks:
        sock.close()
    return result


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except socket.timeout:
        return False
    return True


def _concurrently(url: str, requests: list[Callable[[], httpx.Response]], image: bytes) -> dict[str, Any]:
    """``requests`` at once while the probe runs: their answers (status and Retry-After) and the probe's."""
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        sent = [pool.submit(request) for request in requests]
        result = _probe(url, 3.0, image)
        answers = Counter(f"{r.status_code} retry-after={r.headers.get('retry-after')} "
                          f"{r.headers.get('content-type', '').split(';')[0]}" for r in (f.result() for f in sent))
    return {**result, "attack_answers": dict(answers)}


def _lying_length(port: int) -> dict[str, Any]:
    """A POST declaring 12 GB, sent as fast as the server takes it for up to 5 s."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 12000000000\r\n\r\n")
    sock.settimeout(0.5)
    sent, started, chunk = 0, time.monotonic(), b"x" * 65536
    try:
        while time.monotonic() - started < 5:
            sent += sock.send(chunk)
    except (OSError, socket.timeout):
        pass
    closed_after = time.monotonic() - started
    sock.close()
    return {"bytes_taken": sent, "closed_after_s": round(closed_after, 2) if closed_after < 5 else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds each connection attack lasts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    import repvgg

    image = _jpeg()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = repvgg.reparameterize_model(repvgg.create_model("repvgg_a0", num_classes=1000)).eval()
        artifact = repvgg.save_weights(model, Path(tmp) / "repvgg_a0.safetensors")
        proc, url = _start(artifact, Path(tmp) / "server.log")
        port = int(url.rsplit(":", 1)[1])
        try:
            results["baseline"] = _probe(url, 2.0, image)
            results["slowloris 300"] = _under(url, port, 300, 0, args.seconds, image)
            results["idle 256"] = _under(url, port, 0, 256, args.seconds, image)
            results["slowloris 300 + idle 256"] = _under(url, port, 300, 256, args.seconds, image)
            flood = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [8], "data": [_big_png()] * 8}]}
            infer = url + "/v2/models/repvgg_a0/infer"
            results["decode flood 3 x 8 x 8192^2"] = _concurrently(
                url, [lambda: httpx.post(infer, json=flood, timeout=120)] * 3, image)
            results["burst 64"] = _concurrently(url, [lambda: httpx.post(
                url + "/predict", files={"file": ("b.jpg", image, "image/jpeg")}, timeout=120)] * 64, image)
            results["lying Content-Length 12 GB"] = _lying_length(port)
            proc.send_signal(signal.SIGTERM)
            results["sigterm_exit_status"] = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    def listed(counts: dict[str, int]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))

    rows = [[name, f"{r['worst_live_s'] * 1000:.0f}", f"{r['worst_predict_s'] * 1000:.0f}",
             r.get("closed_by_server", ""), listed(r.get("attack_answers", {})), listed(r["answers"])]
            for name, r in results.items() if isinstance(r, dict) and "worst_live_s" in r]
    lying = results["lying Content-Length 12 GB"]
    title = (f"`repvgg serve` (RepVGG-A0, --max-queue 8, --max-batch 8, header timeout 5 s) under hostile clients, "
             f"{os.cpu_count()} cores; each connection attack lasts {args.seconds:g} s. A lying Content-Length of "
             f"12 GB: {lying['bytes_taken']:,} bytes taken, connection closed after {lying['closed_after_s']} s. "
             f"SIGTERM exit status {results['sigterm_exit_status']}.")
    table = markdown_table(["attack", "worst liveness ms", "worst /predict ms", "attack sockets closed by server",
                            "attack's answers", "probe's answers"], rows)
    write_text(args.out / "serve_abuse.md", f"{title}\n\n{table}\n")
    write_json(args.out / "serve_abuse.json", {"title": title, "results": results})
    print(f"{title}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

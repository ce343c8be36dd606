"""Schemathesis against `repvgg serve`'s `/openapi.json`: every documented operation, every check, bounded.

    python -m venv /tmp/st && /tmp/st/bin/pip install schemathesis==4.32.5      # once, beside the project
    .venv/bin/python benchmarks/serve_schema.py --schemathesis /tmp/st/bin/schemathesis   # about 2 minutes

Schemathesis has its own dependency tree (and a pytest plugin), so it lives in a virtual environment of its own; the
project's environment only runs the server. The served model is RepVGG-tiny, fused, with random weights, 3 classes,
prepared at 8 x 8 px (so a generated FP32 batch is small). `repvgg serve` starts on 127.0.0.1 and a free port
(`--port 0`); once it is ready, `schemathesis run` tests it with `--checks all`, a fixed `--seed`, `--max-examples`
per operation and a `--max-time` bound. Generated image fields are drawn from real encoded images (a hooks file
registers them for the `byte` and `binary` formats), since no schema can say which bytes decode as an image. The
server is stopped with SIGTERM and must exit 0. Exits with schemathesis' status: 0 when no check failed. Writes
benchmarks/results/serve_schema.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repvgg.serialization import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
IMG_SIZE = 8

#: Registers real encoded images (written in by `_hooks`) for the string formats the schema gives image fields;
#: schemathesis loads it (its environment needs nothing beyond schemathesis).
HOOKS = """
import base64
import schemathesis
from hypothesis import strategies as st
from schemathesis.transport.serialization import Binary

IMAGES = [base64.b64decode(text) for text in {images!r}]
schemathesis.openapi.format("byte", st.sampled_from(IMAGES).map(lambda data: base64.b64encode(data).decode()))
schemathesis.openapi.format("binary", st.sampled_from(IMAGES).map(Binary))
"""


#: Where the schema cannot say what a server accepts: which bytes decode as an image (an upload, or a binary-extension
#: body, whose JSON length is a header beside it). Schemathesis' fuzzing draws real images (the hooks) but its coverage
#: phase writes short strings there, which are rightly refused with 400 naming the upload or the header; everything
#: else a positive case holds (JSON tensors, shapes, outputs, parameters) is still held to 2xx.
CONFIG = """
[[operations]]
include-path-regex = "^/predict$|/infer$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
"""


def _hooks() -> str:
    """The hooks file: PNG and JPEG images of several sizes and colours."""
    import base64
    import io

    from PIL import Image

    images = []
    for i, (size, kind) in enumerate([(1, "PNG"), (8, "PNG"), (37, "JPEG"), (64, "PNG"), (5, "JPEG")]):
        out = io.BytesIO()
        Image.new("RGB", (size, size), (40 * i, 255 - 30 * i, 90)).save(out, format=kind)
        images.append(base64.b64encode(out.getvalue()).decode())
    return HOOKS.format(images=images)


def _artifact(folder: Path) -> Path:
    import repvgg

    model = repvgg.reparameterize_model(repvgg.create_model("repvgg_tiny", num_classes=3)).eval()
    extra = {"preprocessing": json.dumps({"img_size": IMG_SIZE}), "classes": json.dumps(["cat", "dog", "owl"])}
    return repvgg.save_weights(model, folder / "tiny.safetensors", extra=extra)


def _start(artifact: Path, logs: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "repvgg", "serve", str(artifact), "--host", "127.0.0.1", "--port", "0",
           "--runtime", "eager", "--max-batch", "2", "--max-queue", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(logs, "w"), start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.findall(r"listening on (http://127\.0\.0\.1:\d+)", logs.read_text())
        if found and _ready(found[0]):
            return proc, found[0]
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not become ready:\n{logs.read_text()[-3000:]}")


def _ready(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemathesis", default=shutil.which("schemathesis"),
                        help="the schemathesis command (see the module docstring to install it)")
    parser.add_argument("--max-examples", type=int, default=20, help="test cases per operation and phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-time", type=int, default=120, help="seconds for the whole schemathesis run")
    args = parser.parse_args()
    if not args.schemathesis or not Path(args.schemathesis).is_file():
        raise SystemExit("schemathesis not found: python -m venv /tmp/st && /tmp/st/bin/pip install "
                         "schemathesis==4.32.5, then pass --schemathesis /tmp/st/bin/schemathesis")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "serve_schema_hooks.py").write_text(_hooks())
        (folder / "schemathesis.toml").write_text(CONFIG)
        proc, url = _start(_artifact(folder), folder / "server.log")
        try:
            cmd = [args.schemathesis, "--no-color", "--config-file", str(folder / "schemathesis.toml"), "run",
                   url + "/openapi.json", "--checks", "all", "--seed", str(args.seed), "--max-examples",
                   str(args.max_examples), "--max-time", str(args.max_time), "--workers", "1", "--request-timeout",
                   "30"]
            env = {**os.environ, "SCHEMATHESIS_HOOKS": "serve_schema_hooks", "PYTHONPATH": str(folder)}
            started = time.monotonic()
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.max_time + 120)
            seconds = time.monotonic() - started
        finally:
            proc.send_signal(signal.SIGTERM)
            server_status = proc.wait(60)
        output = run.stdout + run.stderr
        print(output)
        summary = {"schemathesis_status": run.returncode, "server_exit_status": server_status, "seconds": seconds,
                   "seed": args.seed, "max_examples": args.max_examples, "max_time": args.max_time,
                   "summary": [line for line in output.splitlines() if re.search(r"\b(passed|failed|errors?)\b",
                                                                                   line)][-5:]}
        RESULTS.mkdir(exist_ok=True)
        write_json(RESULTS / "serve_schema.json", summary)
        write_text(RESULTS / "serve_schema.md", f"# schemathesis on repvgg serve\n\n```text\n{output[-6000:]}\n```\n")
    return run.returncode or server_status


if __name__ == "__main__":
    sys.exit(main())

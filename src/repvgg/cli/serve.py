"""``repvgg serve ARTIFACT``: the model behind an HTTP server (Open Inference Protocol, /predict, /metrics, a page)."""

from __future__ import annotations

import argparse
import os

from repvgg.cli.flags import config_command, config_flag_values, refuse_flags
from repvgg.serve.config import ServeConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    config_command(
        sub, "serve", ServeConfig, run,
        help="serve a classifier, detector or segmenter over HTTP: Open Inference Protocol (KServe v2), /predict, "
             "/metrics and a page at /",
        description=(
            "ARTIFACT is anything `repvgg predict` takes (a run folder, a checkpoint or deploy file, hf-hub:ORG/REPO, "
            "an ONNX file). The server listens on --host:--port (127.0.0.1 by default: only this machine) and is "
            "ready (GET /v2/health/ready) once the model is loaded and warmed. Concurrent requests are batched up to "
            "--max-batch images or --max-wait-ms. SIGTERM or Ctrl-C stops accepting, answers the requests in flight "
            "and exits 0 (a second signal stops at once and exits 130). Needs the serve extra: "
            "pip install 'repvgg[serve]'."),
        positionals=(("artifact", "ARTIFACT"),))


def run(args: argparse.Namespace) -> int:
    # PyTorch's OpenMP threads spin for milliseconds after each parallel region unless told otherwise when torch
    # loads (here: nothing has imported it yet); a server's other threads need those cores (docs/serving.md)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from repvgg.serve.app import create_app
    from repvgg.serve.server import FORCED_STOP, serve

    config = ServeConfig.from_dict(config_flag_values(args, ServeConfig))
    _refuse_other_tasks_flags(args)
    failures: list[str] = []

    def failed(message: str) -> None:
        failures.append(message)
        app.state.stop()

    app = create_app(args.artifact, config, on_failure=failed)
    status = serve(app, config, failures=failures)
    if failures and status != FORCED_STOP:
        raise ValueError(failures[0])
    return status


def _refuse_other_tasks_flags(args: argparse.Namespace) -> None:
    """Refuse the flags of another task than the artifact's, as ``predict`` does, rather than serve without them:
    ``--score-threshold`` is a detector's, ``--topk`` a classifier's."""
    from repvgg.serve.dense import dense_task

    task = dense_task(args.artifact)
    kind = {"detection": "a detector", "segmentation": "a segmenter", None: "a classifier"}[task]
    if task != "detection":
        refuse_flags((("--score-threshold", args.score_threshold),), f"to detectors; ARTIFACT is {kind}")
    if task is not None:
        refuse_flags((("--topk", args.topk),), f"to classifiers; ARTIFACT is {kind}, whose answers have no top-k")

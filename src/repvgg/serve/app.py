"""The HTTP server's application: the Open Inference Protocol (KServe v2) endpoints, ``/predict`` for an uploaded
image, Prometheus ``/metrics`` and a page at ``/`` to try the model, on FastAPI.

The model is loaded in a worker thread once the app starts: liveness answers at once, readiness only when the
model is loaded and warmed (a batch of ``max_batch`` run through it). Images are decoded in a thread pool and run in
batches gathered from concurrent requests ([`Batcher`][repvgg.serve.batcher.Batcher]) on the runtime and precision
the [`Predictor`][repvgg.predict.predictor.Predictor] chose, so every answer is what ``repvgg predict`` says for the
same image. Bad input is a 4xx with a JSON ``error`` naming what is wrong, never a 500: a body over the limit 413, an
image over the pixel limit 413, a full queue 503 with ``Retry-After``, a malformed request 400 or 422, an unknown
model 404.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any


from repvgg.limits import LimitExceeded
from repvgg.serve.batcher import Batcher, QueueFull
from repvgg.serve.config import ServeConfig
from repvgg.serve.metrics import ServerMetrics
from repvgg.serve.protocol import BadRequest
from repvgg.serve.routes import add_routes, error_response
from repvgg.serve.state import BadImage, ModelState, NotReady, UnknownModel

__all__ = ["create_app"]

log = logging.getLogger(__name__)

def create_app(artifact: str | os.PathLike[str], config: ServeConfig | None = None, *,
               on_failure: Callable[[str], None] | None = None, **options: Any) -> Any:
    """The ASGI app serving ``artifact`` (any artifact [`Predictor`][repvgg.predict.predictor.Predictor] opens), for
    ``repvgg serve``, for embedding in another server and for tests.

    Args:
        artifact: a run folder, a weights file or ``hf-hub:`` reference, or an ONNX file.
        config: the options ([`ServeConfig`][repvgg.serve.config.ServeConfig]).
        on_failure: called with the message if the model cannot be loaded (``repvgg serve`` then stops).
        **options: fields of ``config`` to replace, e.g. ``create_app("run", max_batch=16)``.

    Raises:
        FileNotFoundError, ValueError: the artifact does not exist or is not a model file (checked before the app is
            made; the model itself is loaded when the app starts).
    """
    from fastapi import FastAPI

    from repvgg.predict.predictor import locate_artifact

    from repvgg.detection.predict import detection_artifact

    cfg = dataclasses.replace(config or ServeConfig(), **options)
    locate_artifact(artifact)
    if detection_artifact(artifact) is not None:
        raise ValueError(f"{artifact} is a detector; repvgg serve serves classifiers. Predict its boxes with "
                         "`repvgg predict`, or export it and serve the ONNX file with Triton or OpenVINO Model Server")
    state = ModelState(artifact, cfg, on_failure)
    metrics = ServerMetrics()
    metrics.track_queue(lambda: state.batcher.waiting if state.batcher is not None else 0)

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        loading = asyncio.get_running_loop().create_task(_load(state, metrics))
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            if state.batcher is not None:
                await state.batcher.stop()
            state.decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="repvgg", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.model = state
    _add_error_handlers(app)
    add_routes(app, state, metrics)
    app.add_middleware(_Guard, max_body=cfg.max_body_bytes, metrics=metrics)
    return app


async def _load(state: ModelState, metrics: ServerMetrics) -> None:
    try:
        await asyncio.to_thread(state.load)
    except Exception as err:  # reported as readiness' error and to the command, which stops
        state.error = f"the model could not be loaded: {err}"
        log.error("%s", state.error)
        if state.on_failure is not None:
            state.on_failure(state.error)
        return
    cfg = state.config
    batcher = Batcher(state.predictor.logits, max_batch=cfg.max_batch, max_wait_s=cfg.max_wait_ms / 1000,
                      max_queue=cfg.max_queue, on_batch=metrics.observe_batch)
    batcher.start()
    state.batcher = batcher


def _add_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError

    statuses: list[tuple[type[Exception], int]] = [(BadRequest, 400), (BadImage, 400), (LimitExceeded, 413),
                                                   (UnknownModel, 404), (QueueFull, 503), (NotReady, 503)]
    for kind, status in statuses:
        app.add_exception_handler(kind, lambda request, err, status=status: error_response(status, str(err)))

    def invalid(request: Any, err: Any) -> Any:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in err.errors()]
        return error_response(422, "; ".join(problems), detail=[{k: e.get(k) for k in ("loc", "msg", "type")}
                                                         for e in err.errors()])

    app.add_exception_handler(RequestValidationError, invalid)
    from starlette.exceptions import HTTPException

    # the framework's own answers (an unknown path, a wrong method, an unparsable upload) in the same JSON shape
    app.add_exception_handler(HTTPException, lambda request, err: error_response(err.status_code, str(err.detail)))


class _Guard:
    """Outermost ASGI middleware: refuses a body over ``max_body`` bytes with 413 (by its ``Content-Length``, or as
    it streams in: the app then sees the client gone and its own answer is dropped) and counts every answer by
    endpoint and status with its latency."""

    def __init__(self, app: Any, *, max_body: int, metrics: ServerMetrics) -> None:
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, received, refused = time.perf_counter(), [0], [0], [False]

        async def guarded_send(message: dict) -> None:
            if refused[0]:
                return  # the 413 was sent; the app's own answer to a cut-off body is dropped
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def refuse() -> None:
            response = error_response(413, f"the request body is larger than the server's limit of "
                                           f"{self.max_body:,} bytes (--max-body-mb)")
            await response(scope, receive, guarded_send)
            refused[0] = True

        async def limited_receive() -> dict:
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.max_body and not refused[0]:
                if status[0]:  # the app answered before reading it all: nothing more to refuse
                    return message
                await refuse()
                return {"type": "http.disconnect"}
            return message

        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        try:
            if declared.isdigit() and int(declared) > self.max_body:
                await refuse()
            else:
                await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused[0]:
                raise
        finally:
            route = scope.get("route")
            self.metrics.observe_request(getattr(route, "path", "unmatched"), status[0] or 500,
                                         time.perf_counter() - started)



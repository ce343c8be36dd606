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
import threading
import time
from collections.abc import Awaitable, Callable
import contextlib
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any


from repvgg import __version__
from repvgg.errors import NonFiniteOutput
from repvgg.limits import LimitExceeded
from repvgg.serve.batcher import Batcher, QueueFull, Stopping
from repvgg.serve.config import ServeConfig, good_model_name
from repvgg.serve.metrics import ServerMetrics
from repvgg.serve.protocol import BadRequest
from repvgg.serve.routes import add_routes, error_response
from repvgg.serve.state import BadImage, ModelState, NotReady, UnknownModel

__all__ = ["create_app"]

log = logging.getLogger(__name__)

#: The status counted (in ``/metrics``) for a request whose client left before sending all of it, as nginx counts
#: it: nothing is sent, and it is no error of the server's.
CLIENT_LEFT = 499

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

    from repvgg.io.card import read_class_names
    from repvgg.predict.predictor import locate_artifact

    cfg = dataclasses.replace(config or ServeConfig(), **options)
    kind, source = locate_artifact(artifact)
    if cfg.classes is not None:
        read_class_names(cfg.classes)  # a bad file is told now, not once the model has loaded
    if cfg.name is None and kind == "onnx" and not good_model_name(Path(source).stem):
        raise ValueError(f"the model would be served as {Path(source).stem!r} (the file's name), which cannot be part "
                         "of a URL: pass --name with letters, digits, '_', '-' and '.'")
    state = ModelState(artifact, cfg, on_failure)
    metrics = ServerMetrics()
    metrics.track_queue(lambda: state.batcher.queued if state.batcher is not None else 0)

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

    # /openapi.json is one of the routes (counted in the metrics, answered to HEAD)
    app = FastAPI(title="repvgg", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.model = state
    _add_error_handlers(app)
    add_routes(app, state, metrics)
    app.add_middleware(_Guard, max_body=cfg.max_body_bytes, max_bodies=cfg.max_bodies, metrics=metrics)
    return app


async def _load(state: ModelState, metrics: ServerMetrics) -> None:
    try:
        await _in_daemon_thread(state.load)
    except Exception as err:  # reported as readiness' error and to the command, which stops
        state.error = f"the model could not be loaded: {err}"
        log.error("%s", state.error)
        if state.on_failure is not None:
            state.on_failure(state.error)
        return
    cfg = state.config
    batcher = Batcher(state.predictor.run, max_batch=cfg.max_batch, max_wait_s=cfg.max_wait_ms / 1000,
                      max_queue=cfg.max_queue, on_batch=metrics.observe_batch)
    batcher.start()
    state.batcher = batcher


#: The name of the thread loading the model (a stop while it runs must not wait for it, nor finalize under it).
LOAD_THREAD = "repvgg-load"


async def _in_daemon_thread(work: Callable[[], None]) -> None:
    """Run ``work`` in a daemon thread: a forced stop during a long load (a compile) exits at once instead of waiting
    for it, as the event loop's own pool would."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(err: BaseException | None) -> None:
        if not done.done():
            done.set_exception(err) if err is not None else done.set_result(None)

    def run() -> None:
        try:
            work()
        except BaseException as err:  # handed to the awaiting task, which reports it
            failure: BaseException | None = err
        else:
            failure = None
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, failure)

    threading.Thread(target=run, name=LOAD_THREAD, daemon=True).start()
    await done


def _add_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError

    statuses: list[tuple[type[Exception], int]] = [(BadRequest, 400), (BadImage, 400), (LimitExceeded, 413),
                                                   (UnknownModel, 404), (QueueFull, 503), (NotReady, 503),
                                                   (Stopping, 503)]
    for kind, status in statuses:
        app.add_exception_handler(kind, lambda request, err, status=status: error_response(status, str(err)))

    def invalid(request: Any, err: Any) -> Any:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in err.errors()]
        return error_response(422, "; ".join(problems), detail=[{k: e.get(k) for k in ("loc", "msg", "type")}
                                                         for e in err.errors()])

    app.add_exception_handler(RequestValidationError, invalid)
    _add_fault_handlers(app)


def _add_fault_handlers(app: Any) -> None:
    """Answers for what is no fault of the request: a model that gives NaN or infinite outputs (a 500 in the JSON
    shape, logged once), a client that left before sending its whole request (no answer, no error); and the
    framework's own answers (an unknown path, a wrong method with ``Allow``, an unparsable upload) in the JSON shape."""
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    logged: list[str] = []

    def model_fault(request: Any, err: Exception) -> Any:
        if not logged:
            logged.append(str(err))
            log.error("%s; answered with 500 (logged once)", err)
        return error_response(500, str(err))

    def client_left(request: Any, err: Exception) -> Any:
        log.debug("the client left before sending its whole request to %s", request.url.path)
        return error_response(CLIENT_LEFT, "the client closed the connection before sending its whole request")

    def framework(request: Any, err: Any) -> Any:
        if isinstance(err.__cause__, ClientDisconnect):  # an upload cut off: FastAPI reports it as unparsable
            return client_left(request, err.__cause__)
        headers = dict(err.headers or {})
        if "GET" in headers.get("Allow", "").split(", "):  # HEAD is answered wherever GET is
            headers["Allow"] += ", HEAD"
        return error_response(err.status_code, str(err.detail), headers=headers)

    app.add_exception_handler(NonFiniteOutput, model_fault)
    app.add_exception_handler(ClientDisconnect, client_left)
    app.add_exception_handler(HTTPException, framework)


class _Guard:
    """Outermost ASGI middleware: refuses a body over ``max_body`` bytes with 413 (by its ``Content-Length``, or as
    it streams in: the app then sees the client gone and its own answer is dropped), a request with a body beyond
    ``max_bodies`` being received or held with 503, and counts every answer by endpoint and status with its latency.
    A refused request's connection is closed: what is left of its body is never read."""

    def __init__(self, app: Any, *, max_body: int, max_bodies: int, metrics: ServerMetrics) -> None:
        self.app, self.max_body, self.max_bodies, self.metrics = app, max_body, max_bodies, metrics
        self.bodies = 0  # requests with a body in the app now

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, received, refused = time.perf_counter(), [0], [0], [False]
        if scope["method"] == "HEAD":  # answered as GET; the server sends the headers only
            scope = {**scope, "method": "GET"}

        async def guarded_send(message: dict) -> None:
            if refused[0]:
                return  # the 413 was sent; the app's own answer to a cut-off body is dropped
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def refuse(status: int = 413, message: str = f"the request body is larger than the server's limit "
                                                              f"of {self.max_body:,} bytes (--max-body-mb)") -> None:
            response = error_response(status, message)
            response.headers["Connection"] = "close"
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

        declared, chunked = b"", False
        for key, value in scope.get("headers") or ():
            if key == b"content-length":
                declared = value
            chunked = chunked or key == b"transfer-encoding"
        body = int(declared not in (b"", b"0") or chunked)
        try:
            if declared.isdigit() and int(declared) > self.max_body:
                await refuse()
            elif body and self.bodies >= self.max_bodies:
                await refuse(503, f"{self.bodies} requests are being received or answered (the limit is "
                                  f"{self.max_bodies}, four times --max-queue); try again shortly")
            else:
                self.bodies += body
                try:
                    await self.app(scope, limited_receive, guarded_send)
                finally:
                    self.bodies -= body
        except Exception:
            if not refused[0]:
                raise
        finally:
            route = scope.get("route")
            self.metrics.observe_request(getattr(route, "path", "unmatched"), status[0] or 500,
                                         time.perf_counter() - started)



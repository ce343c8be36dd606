"""The server's endpoints (see [`repvgg.serve.app`][repvgg.serve.app]). FastAPI reads the endpoints' annotations at
run time, so they are not postponed here."""

from collections.abc import Mapping
from typing import Any

from repvgg import __version__
from repvgg.serve.metrics import ServerMetrics
from repvgg.serve.openapi import READINESS_SCHEMA, errors, infer_openapi
from repvgg.serve.protocol import HEADER_LENGTH
from repvgg.serve.state import infer, page_html

__all__ = ["add_routes", "error_response"]

#: Seconds a client is told to wait (``Retry-After``) when the queue is full or the model is still loading.
RETRY_AFTER_S = 1


def error_response(status: int, message: str, *, headers: Mapping[str, str] | None = None, **extra: Any) -> Any:
    """A JSON ``{"error": message}`` answer with ``headers`` (a 405's ``Allow``); a 503 tells the client when to try
    again."""
    from fastapi.responses import JSONResponse

    headers = {**(headers or {}), **({"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {})}
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def add_routes(app: Any, state: Any, metrics: ServerMetrics) -> None:
    """The health, metadata and inference endpoints of the Open Inference Protocol, ``/predict``, ``/metrics``,
    ``/openapi.json`` and the page at ``/``. Each GET endpoint answers HEAD too (the middleware runs it as GET, and
    the server sends no body)."""
    from fastapi import File, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    cfg = state.config

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return page_html()

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return state.predictor.openapi(app.openapi(), state.name) if state.ready else app.openapi()

    @app.get("/v2")
    def server_metadata() -> dict[str, Any]:
        return {"name": "repvgg", "version": __version__, "extensions": ["binary_tensor_data", "classification"],
                "models": [state.name] if state.ready else []}

    @app.get("/v2/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", responses=_READINESS_ANSWERS)
    def ready() -> Any:
        return _readiness(state)

    _add_model_routes(app, state)

    @app.post("/v2/models/{name}/infer", **infer_openapi())
    async def infer_endpoint(name: str, request: Request) -> Response:
        return await version_infer(name, "1", request)

    @app.post("/v2/models/{name}/versions/{version}/infer", **infer_openapi())
    async def version_infer(name: str, version: str, request: Request) -> Response:
        _check_version(version)
        body, json_length = await infer(state, name, await request.body(), request.headers.get(HEADER_LENGTH))
        if json_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(json_length)})

    @app.post("/predict", response_model=None, responses={200: _ANSWER, **errors(400, 413, 422, 500, 503)})
    async def predict(file: UploadFile = File(..., description="the image (PNG, JPEG, ...)",
                                                   json_schema_extra={"minLength": 1}),
                      topk: int = Query(cfg.topk, ge=1, le=1000)) -> Response:
        """The uploaded image's top-k classes by name, as ``repvgg predict`` gives them; a detector's boxes, a
        segmenter's classes with their share of the pixels and its mask (a base64 PNG)."""
        model = state.model(state.name)
        source = file.filename or "upload"
        results = await state.decode_and_run([(await file.read(), f"the uploaded image {source!r}")])
        return JSONResponse(model.answer(source, results[0], topk))  # plain JSON values: no encoder pass

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    app.add_exception_handler(_VersionError, lambda request, err: error_response(404, str(err)))


#: /predict's answer (its fields depend on the task: see docs/serving.md).
_ANSWER: dict[str, Any] = {"description": "the answer", "content": {"application/json": {"schema": {"type": "object"}}}}

#: Readiness' answers, the protocol's way: the status code says it.
_READINESS_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "ready"},
    400: {"description": "not ready: `error` says why", "content": {"application/json": {"schema": READINESS_SCHEMA}}}}


def _readiness(state: Any) -> Any:
    from fastapi.responses import JSONResponse

    if state.ready:
        return {"ready": True}
    # the protocol: readiness is the status code, 200 or a 4xx
    return JSONResponse({"ready": False, "error": state.error or "the model is loading"}, status_code=400)


def _add_model_routes(app: Any, state: Any) -> None:
    """The model's metadata and readiness, unversioned and at its one version."""
    @app.get("/v2/models/{name}", responses=errors(404, 503))
    def metadata(name: str) -> dict[str, Any]:
        return state.model(name).metadata(state.name)

    @app.get("/v2/models/{name}/versions/{version}", responses=errors(404, 503))
    def version_metadata(name: str, version: str) -> dict[str, Any]:
        model = state.model(name)
        _check_version(version)
        return model.metadata(state.name)

    @app.get("/v2/models/{name}/ready", responses={**_READINESS_ANSWERS, **errors(404)})
    def model_ready(name: str) -> Any:
        if state.ready:
            state.model(name)
        return _readiness(state)

    @app.get("/v2/models/{name}/versions/{version}/ready", responses={**_READINESS_ANSWERS, **errors(404)})
    def version_ready(name: str, version: str) -> Any:
        if state.ready:
            state.model(name)
            _check_version(version)
        return _readiness(state)


def _check_version(version: str) -> None:
    if version != "1":
        raise _VersionError(version)


class _VersionError(LookupError):
    def __init__(self, version: str) -> None:
        super().__init__(f"no version {version!r} of the model here; it has version '1'")

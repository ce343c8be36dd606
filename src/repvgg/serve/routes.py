"""The server's endpoints (see [`repvgg.serve.app`][repvgg.serve.app]). FastAPI reads the endpoints' annotations at
run time, so they are not postponed here."""

from typing import Any

from repvgg import __version__
from repvgg.serve.metrics import ServerMetrics
from repvgg.serve.protocol import HEADER_LENGTH
from repvgg.serve.state import infer, model_metadata, page_html

__all__ = ["add_routes", "error_response"]

#: Seconds a client is told to wait (``Retry-After``) when the queue is full or the model is still loading.
RETRY_AFTER_S = 1


def error_response(status: int, message: str, **extra: Any) -> Any:
    """A JSON ``{"error": message}`` answer; a 503 tells the client when to try again."""
    from fastapi.responses import JSONResponse

    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def add_routes(app: Any, state: Any, metrics: ServerMetrics) -> None:
    """The health, metadata and inference endpoints of the Open Inference Protocol, ``/predict``, ``/metrics`` and
    the page at ``/``."""
    from fastapi import File, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response


    cfg = state.config

    def readiness() -> Any:
        if state.ready:
            return {"ready": True}
        # the protocol: readiness is the status code, 200 or a 4xx
        return JSONResponse({"ready": False, "error": state.error or "the model is loading"}, status_code=400)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return page_html()

    @app.get("/v2")
    def server_metadata() -> dict[str, Any]:
        return {"name": "repvgg", "version": __version__, "extensions": ["binary_tensor_data", "classification"],
                "models": [state.name] if state.ready else []}

    @app.get("/v2/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready() -> Any:
        return readiness()

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    def metadata(name: str, version: str = "1") -> dict[str, Any]:
        state.model(name)
        _check_version(version)
        return model_metadata(state)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    def model_ready(name: str, version: str = "1") -> Any:
        if state.ready:
            state.model(name)
            _check_version(version)
        return readiness()

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_endpoint(name: str, request: Request, version: str = "1") -> Response:
        _check_version(version)
        body, json_length = await infer(state, name, await request.body(), request.headers.get(HEADER_LENGTH))
        if json_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(json_length)})

    @app.post("/predict")
    async def predict(file: UploadFile = File(..., description="the image (PNG, JPEG, ...)"),
                      topk: int = Query(cfg.topk, ge=1, le=1000)) -> dict[str, Any]:
        """The uploaded image's top-k classes by name, as ``repvgg predict`` gives them."""
        predictor = state.model(state.name)
        source = file.filename or "upload"
        image = await state.decode(await file.read(), f"the uploaded image {source!r}")
        logits = await state.run(image[None])
        classes, indices, probabilities = predictor.rank(logits, topk, what=source)[0]
        return {"source": source, "classes": list(classes), "indices": list(indices),
                "probabilities": list(probabilities), "error": None}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    def _check_version(version: str) -> None:
        if version != "1":
            raise _VersionError(version)

    app.add_exception_handler(_VersionError, lambda request, err: error_response(404, str(err)))


class _VersionError(LookupError):
    def __init__(self, version: str) -> None:
        super().__init__(f"no version {version!r} of the model here; it has version '1'")

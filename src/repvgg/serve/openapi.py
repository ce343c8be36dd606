"""The server's OpenAPI description (``/openapi.json``): every answer each endpoint sends, in the one JSON error shape,
and the inference request's bodies (JSON, and the binary tensor data extension), so that a generated client or a
schema-driven test sees what the server does. No web framework is imported here: the routes pass these to FastAPI."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["ERROR_SCHEMA", "INFER_REQUEST", "READINESS_SCHEMA", "errors", "for_model", "infer_openapi"]

#: Every 4xx and 5xx answer: ``error`` says what was wrong and what to do; a 422 adds the framework's ``detail``.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what was wrong, naming the field or the limit"},
                   "detail": {"type": "array", "items": {"type": "object"}}}}

#: Readiness, the protocol's way: 200 when ready, 400 with ``error`` while loading or after a failed load.
READINESS_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["ready"],
    "properties": {"ready": {"type": "boolean"}, "error": {"type": "string"}}}

_WHY = {
    400: "a malformed request or an unreadable image; `error` names the field at fault",
    404: "no model of that name, or no such version of it",
    413: "a body over --max-body-mb, an image over the pixel limit, or more values than a batch of images holds",
    422: "a missing or malformed parameter or form field",
    500: "the model gave NaN or infinite outputs: its predictions cannot be trusted",
    503: "the model is loading, the queue is full or the server is busy; Retry-After says when to try again",
}

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                                "schema": {"type": "integer", "minimum": 0}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses`` for these error statuses, each in the JSON error shape (a 503 with ``Retry-After``)."""
    return {status: {"description": _WHY[status], "content": {"application/json": {"schema": ERROR_SCHEMA}},
                     **({"headers": _RETRY_AFTER} if status == 503 else {})} for status in statuses}


_OUTPUT_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"classification": {"type": "integer", "minimum": 0, "description": "answer the top K classes as "
                                                                                      "BYTES 'value:index:label'"},
                   "binary_data": {"type": "boolean", "description": "answer this output in the binary extension"}}}

_INPUT: dict[str, Any] = {
    "type": "object", "required": ["name", "datatype", "shape"],
    "description": "'input': FP32 [N, 3, S, S] images prepared as the model's metadata says; 'image': BYTES [N] "
                   "encoded images (PNG, JPEG, ...), base64 strings in JSON",
    "properties": {
        "name": {"type": "string", "enum": ["input", "image"]},
        "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "maxItems": 4},
        "data": {"type": "array", "description": "the tensor in row-major order: numbers (FP32, within +-1000) or "
                                                 "base64 strings (BYTES)",
                 "items": {"oneOf": [{"type": "number", "minimum": -1000, "maximum": 1000},
                                     {"type": "string", "format": "byte"}]}},
        "parameters": {"type": "object", "properties": {
            "binary_data_size": {"type": "integer", "minimum": 0,
                                 "description": "the input's bytes follow the JSON part (binary extension)"}}}}}

#: The Open Inference Protocol's inference request (JSON), as this server reads it.
INFER_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "description": "echoed in the response"},
        "inputs": {"type": "array", "items": _INPUT, "minItems": 1, "maxItems": 1},
        "outputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "enum": ["output", "probabilities"]},
                           "parameters": _OUTPUT_PARAMETERS}}},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}}}}

_INFER_RESPONSE: dict[str, Any] = {
    "type": "object", "required": ["model_name", "model_version", "outputs"],
    "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
                   "outputs": {"type": "array",
                               "items": {"type": "object", "required": ["name", "datatype", "shape"]}}}}

_BINARY = {"type": "string", "format": "binary",
           "description": "the binary tensor data extension: the JSON request (its length in the "
                          "Inference-Header-Content-Length header), then the tensors' bytes"}


def infer_openapi() -> dict[str, Any]:
    """FastAPI ``openapi_extra`` and ``responses`` of the inference endpoints: the request body in JSON and in the
    binary extension, its length header, and the answers."""
    header = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
              "description": "the JSON part's length in bytes when binary tensor data follows it",
              "schema": {"type": "string", "pattern": "^[0-9]+$"}}
    extra = {"parameters": [header],
             "requestBody": {"required": True, "content": {"application/json": {"schema": INFER_REQUEST},
                                                           "application/octet-stream": {"schema": _BINARY}}}}
    ok = {"description": "the outputs asked for (JSON, or the binary extension when an output asks for it)",
          "content": {"application/json": {"schema": _INFER_RESPONSE}, "application/octet-stream": {"schema": _BINARY}}}
    return {"openapi_extra": extra, "responses": {200: ok, **errors(400, 404, 413, 500, 503)}}


def for_model(schema: dict[str, Any], name: str, img_size: int, max_batch: int) -> dict[str, Any]:
    """``schema`` with what the loaded model fixes: its name and version in the paths, and the inputs it takes (an
    input's ``shape`` and its ``data``'s length go together: one variant per batch size)."""
    schema = copy.deepcopy(schema)
    fixed = {"name": {"type": "string", "enum": [name]}, "version": {"type": "string", "enum": ["1"]}}
    variants = []
    for n in range(1, max_batch + 1):
        values = n * 3 * img_size * img_size
        variants += [_variant("input", "FP32", [n, 3, img_size, img_size], {"type": "number", "minimum": -1000,
                                                                            "maximum": 1000}, values),
                     _variant("image", "BYTES", [n], {"type": "string", "format": "byte"}, n)]
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in fixed:
                    parameter["schema"] = fixed[parameter["name"]]
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None and path.endswith("/infer"):
                body["schema"] = copy.deepcopy(body["schema"])
                body["schema"]["properties"]["inputs"]["items"] = {"oneOf": variants}
    return schema


def _variant(name: str, datatype: str, shape: list[int], item: dict[str, Any], count: int) -> dict[str, Any]:
    return {"type": "object", "required": ["name", "datatype", "shape", "data"],
            "properties": {"name": {"type": "string", "enum": [name]}, "datatype": {"type": "string",
                                                                                   "enum": [datatype]},
                           "shape": {"type": "array", "items": {"type": "integer"}, "enum": [shape]},
                           "data": {"type": "array", "items": item, "minItems": count, "maxItems": count},
                           "parameters": {"type": "object", "not": {"required": ["binary_data_size"]}}}}

"""The Open Inference Protocol's (KServe v2) inference request and response, JSON and the binary tensor data
extension, for one image classifier (and, in [`parse_encoded`][repvgg.serve.protocol.parse_encoded], for models that
take encoded images only: detectors and segmenters).

A request gives one input: ``input``, FP32 ``[N, C, S, S]`` images already prepared as the model's preprocessing
says, or ``image``, BYTES ``[N]`` encoded images (PNG, JPEG, ...; base64 strings in JSON, raw in the binary extension,
as OpenVINO Model Server takes them). The response has the outputs asked for, by default both: ``output``, the
logits, and ``probabilities``, their softmax; an output asked for with ``"parameters": {"classification": K}`` is
answered as the classification extension does: BYTES ``[N, K]`` of ``"value:index:label"``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from repvgg.limits import LimitExceeded, brief, parse_json
from repvgg.predict.predictor import softmax_rows

__all__ = ["BadRequest", "EncodedRequest", "InferRequest", "encode_response", "parse_encoded", "parse_infer", "INPUT",
           "IMAGE", "OUTPUT", "PROBABILITIES"]

INPUT, IMAGE, OUTPUT, PROBABILITIES = "input", "image", "output", "probabilities"
#: The largest magnitude a prepared image's value may have (normalised pixels lie within a few units of 0).
MAX_PREPARED_VALUE = 1e3
#: Values a request may hold beside its images' (its shape, outputs and parameters need a handful).
_MAX_OTHER_VALUES = 1024
#: The header that gives the JSON part's length when binary tensor data follows it.
HEADER_LENGTH = "inference-header-content-length"


class BadRequest(ValueError):
    """A malformed inference request; ``field`` names the part at fault (``inputs[0].shape``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class RequestedOutput:
    name: str
    classification: int = 0
    binary: bool = False


@dataclass
class InferRequest:
    """A parsed request: prepared ``images`` or ``encoded`` ones, and the outputs to answer."""

    id: str | None
    images: Tensor | None
    encoded: list[bytes] | None
    outputs: list[RequestedOutput]

    @property
    def count(self) -> int:
        return len(self.images) if self.images is not None else len(self.encoded or [])


def parse_infer(body: bytes, header_length: str | None, *, image_shape: tuple[int, int, int], max_batch: int,
                max_bytes: int) -> InferRequest:
    """The request in ``body`` (``header_length``: the binary extension's JSON length header, if given).

    Raises:
        BadRequest: naming the field at fault.
    """
    json_part, binary = _split(body, header_length)
    document = _parse_document(json_part, max_bytes, max_values=max_batch * math.prod(image_shape))
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest("inputs", f"give exactly one input, {INPUT!r} (FP32 prepared images) or {IMAGE!r} (BYTES "
                                   "encoded images)")
    spec = inputs[0]
    name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool)
                                                            for d in shape):
        raise BadRequest("inputs[0].shape", f"a list of integers, got {json.dumps(shape)[:80]}")
    data = _data(spec, binary)
    if name == INPUT:
        images, encoded = _images(shape, datatype, data, image_shape, max_batch), None
    elif name == IMAGE:
        images, encoded = None, _encoded(shape, datatype, data, max_batch)
    else:
        raise BadRequest("inputs[0].name", f"{json.dumps(name)[:80]} is not an input of this model; give {INPUT!r} "
                                           f"or {IMAGE!r}")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("id", f"a string (echoed in the response), got {brief(request_id, 40)}")
    wants_binary = _flag(_parameters(document, "parameters"), "binary_data_output", False,
                         "parameters.binary_data_output")
    return InferRequest(request_id, images, encoded,
                        _outputs(document.get("outputs"), wants_binary))


@dataclass
class EncodedRequest:
    """A parsed request of a model that takes encoded images only (a detector, a segmenter)."""

    id: str | None
    encoded: list[bytes]
    outputs: list[str]


def parse_encoded(body: bytes, header_length: str | None, *, max_bytes: int, max_batch: int,
                  outputs: tuple[str, ...]) -> EncodedRequest:
    """The request in ``body`` to a model whose one input is ``image`` (BYTES ``[N]`` encoded images) and whose
    outputs are ``outputs`` (all of them when the request names none), answered in JSON.

    Raises:
        BadRequest: naming the field at fault.
    """
    json_part, binary = _split(body, header_length)
    document = _parse_document(json_part, max_bytes, max_values=0)
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict) \
            or inputs[0].get("name") != IMAGE:
        raise BadRequest("inputs", f"give exactly one input, {IMAGE!r} (BYTES encoded images); this model takes no "
                                   "prepared tensors")
    shape = inputs[0].get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest("inputs[0].shape", f"a list of integers, got {json.dumps(shape)[:80]}")
    encoded = _encoded(shape, inputs[0].get("datatype"), _data(inputs[0], binary), max_batch)
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("id", f"a string (echoed in the response), got {brief(request_id, 40)}")
    if _flag(_parameters(document, "parameters"), "binary_data_output", False, "parameters.binary_data_output"):
        raise BadRequest("parameters.binary_data_output", "this model answers in JSON only")
    wanted = document.get("outputs")
    if wanted is None:
        return EncodedRequest(request_id, encoded, list(outputs))
    if not isinstance(wanted, list) or not wanted:
        raise BadRequest("outputs", f"a list of outputs, e.g. [{{\"name\": \"{outputs[0]}\"}}]")
    names = []
    for i, spec in enumerate(wanted):
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in outputs:
            raise BadRequest(f"outputs[{i}].name", f"{json.dumps(name)[:80]}: this model's outputs are "
                                                   f"{', '.join(map(repr, outputs))}")
        if _parameters(spec, f"outputs[{i}].parameters"):
            raise BadRequest(f"outputs[{i}].parameters", "this model's outputs take no parameters")
        names.append(name)
    return EncodedRequest(request_id, encoded, names)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not (header_length.isascii() and header_length.isdigit()):  # int() would take "+8", " 8" and "1_0"
        raise BadRequest("Inference-Header-Content-Length", f"a byte count (digits only), got {header_length[:40]!r}")
    length = int(header_length)
    if not 0 < length <= len(body):
        raise BadRequest("Inference-Header-Content-Length", f"{length} is not within the body's {len(body)} bytes")
    return body[:length], body[length:]


def _parse_document(text: bytes, max_bytes: int, *, max_values: int) -> dict[str, Any]:
    """The request's JSON object. The values it may hold are bounded before it is parsed (by its separators): a
    request holds at most ``max_values`` numbers, a batch of prepared images (none for a model that takes encoded
    images only), and a few fields."""
    if not text.strip():
        raise BadRequest("body", "empty; send an inference request (JSON)")
    if text.count(b",") > max_values + _MAX_OTHER_VALUES:
        holds = (f"a batch of prepared images holds {max_values:,} (--max-batch images of the model's input)"
                 if max_values else "this model takes encoded images (a few strings), not tensors of numbers")
        raise LimitExceeded(f"body: the request holds more than {max_values + _MAX_OTHER_VALUES:,} values; {holds}")
    try:
        document = parse_json(text, "the request", max_bytes=max_bytes)
    except ValueError as err:
        raise BadRequest("body", str(err)) from None
    if not isinstance(document, dict):
        raise BadRequest("body", "the request is a JSON object with 'inputs'")
    return document


def _data(spec: dict[str, Any], binary: bytes) -> Any:
    """The input's ``data``, or its bytes in the binary part (``parameters.binary_data_size``)."""
    size = _parameters(spec, "inputs[0].parameters").get("binary_data_size")
    if size is None:
        if "data" not in spec:
            raise BadRequest("inputs[0].data", "missing (or give parameters.binary_data_size and the bytes after the "
                                               "JSON part)")
        return spec["data"]
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise BadRequest("inputs[0].parameters.binary_data_size", f"{size!r} is not the {len(binary)} bytes after "
                                                                  "the JSON part (the one input's data, all of it)")
    return binary


def _images(shape: list[int], datatype: Any, data: Any, image_shape: tuple[int, int, int],
            max_batch: int) -> Tensor:
    if datatype != "FP32":
        raise BadRequest("inputs[0].datatype", f"{INPUT!r} is FP32, got {json.dumps(datatype)[:40]}")
    if len(shape) != 4 or tuple(shape[1:]) != image_shape:
        raise BadRequest("inputs[0].shape", f"[N, {', '.join(map(str, image_shape))}] (images prepared as the "
                                            f"model's preprocessing says), got {shape}; send encoded images as "
                                            f"{IMAGE!r} to have them prepared")
    _check_batch(shape[0], max_batch)
    count = math.prod(shape)
    if not isinstance(data, bytes) and (not isinstance(data, list) or not set(map(type, data)) <= {int, float}):
        # numpy would read "1" as 1.0 and true as 1.0: JSON data are numbers (bool is not one), in a flat list
        raise BadRequest("inputs[0].data", f"a flat list of numbers (the tensor in row-major order), as many as the "
                                           f"shape holds; got {brief(data, 80)}")
    try:
        values = np.frombuffer(data, dtype="<f4") if isinstance(data, bytes) else np.asarray(data, dtype=np.float32)
    except (ValueError, OverflowError) as err:
        raise BadRequest("inputs[0].data", f"numbers, as many as the shape holds: {err}") from None
    if values.size != count:
        raise BadRequest("inputs[0].data", f"{values.size} values for shape {shape} ({count})")
    tensor = torch.from_numpy(values.reshape(shape).copy())
    if not torch.isfinite(tensor).all():
        raise BadRequest("inputs[0].data", "holds NaN or infinite values")
    if tensor.abs().max() > MAX_PREPARED_VALUE:  # normalised pixels lie within a few units of 0
        raise BadRequest("inputs[0].data", f"holds values beyond +-{MAX_PREPARED_VALUE:g}, which no prepared image "
                                           "has (scaled to 0..1, then normalised with the model's mean and std)")
    return tensor


def _encoded(shape: list[int], datatype: Any, data: Any, max_batch: int) -> list[bytes]:
    if datatype != "BYTES":
        raise BadRequest("inputs[0].datatype", f"{IMAGE!r} is BYTES (encoded images), got {json.dumps(datatype)[:40]}")
    if len(shape) != 1:
        raise BadRequest("inputs[0].shape", f"[N] for N encoded images, got {shape}")
    _check_batch(shape[0], max_batch)
    items = _unpack_bytes(data) if isinstance(data, bytes) else _base64_items(data)
    if len(items) != shape[0]:
        raise BadRequest("inputs[0].data", f"{len(items)} images for shape {shape}")
    return items


def _check_batch(n: int, max_batch: int) -> None:
    if not 1 <= n <= max_batch:
        raise BadRequest("inputs[0].shape", f"one image a request ([1]), got {n}" if max_batch == 1 else
                         f"a batch of 1 to {max_batch} images (the server's --max-batch), got {n}")


def _base64_items(data: Any) -> list[bytes]:
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise BadRequest("inputs[0].data", "a list of base64 strings, one encoded image each")
    try:
        return [base64.b64decode(item, validate=True) for item in data]
    except (binascii.Error, ValueError):
        raise BadRequest("inputs[0].data", "an element is not base64") from None


def _unpack_bytes(data: bytes) -> list[bytes]:
    """BYTES elements in the binary extension: each a 4-byte little-endian length and its bytes."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise BadRequest("inputs[0] binary data", "an element's 4-byte length is cut off")
        (length,) = struct.unpack_from("<I", data, offset)
        if offset + 4 + length > len(data):
            raise BadRequest("inputs[0] binary data", f"an element of {length} bytes runs past the data")
        items.append(data[offset + 4: offset + 4 + length])
        offset += 4 + length
    return items


def _outputs(outputs: Any, wants_binary: bool) -> list[RequestedOutput]:
    if outputs is None:
        return [RequestedOutput(OUTPUT, binary=wants_binary), RequestedOutput(PROBABILITIES, binary=wants_binary)]
    if not isinstance(outputs, list) or not outputs:
        raise BadRequest("outputs", "a list of outputs, e.g. [{\"name\": \"probabilities\"}]")
    requested = []
    for i, spec in enumerate(outputs):
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in (OUTPUT, PROBABILITIES):
            raise BadRequest(f"outputs[{i}].name", f"{json.dumps(name)[:80]}: this model's outputs are {OUTPUT!r} "
                                                   f"(logits) and {PROBABILITIES!r}")
        parameters = _parameters(spec, f"outputs[{i}].parameters")
        k = parameters.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise BadRequest(f"outputs[{i}].parameters.classification", f"a count of classes, got {k!r}")
        binary = _flag(parameters, "binary_data", wants_binary, f"outputs[{i}].parameters.binary_data")
        requested.append(RequestedOutput(name, k, binary))
    return requested


def _parameters(spec: dict[str, Any], field: str) -> dict[str, Any]:
    """``spec``'s ``parameters``: an object, if given."""
    parameters = spec.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(field, f"an object of parameters, got {brief(parameters, 40)}")
    return parameters


def _flag(parameters: dict[str, Any], key: str, default: bool, field: str) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(field, f"true or false, got {json.dumps(value)[:40]}")
    return value


def encode_response(model: str, request: InferRequest, logits: Tensor, classes: tuple[str, ...]
                    ) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's length when binary data follows it (for the header)."""
    tensors = {OUTPUT: logits.float(), PROBABILITIES: softmax_rows(logits)}
    outputs, binary = [], b""
    for wanted in request.outputs:
        values = tensors[wanted.name]
        entry: dict[str, Any] = {"name": wanted.name}
        if wanted.classification:
            k = min(wanted.classification, values.shape[1])
            top = values.topk(k, dim=1)
            strings = [[f"{v:f}:{i}:{classes[i]}" for v, i in zip(vs, idx)]
                       for vs, idx in zip(top.values.tolist(), top.indices.tolist())]
            entry.update(datatype="BYTES", shape=[len(strings), k])
            if wanted.binary:
                raw = b"".join(struct.pack("<I", len(b)) + b for row in strings for b in (s.encode() for s in row))
            else:
                entry["data"] = [s for row in strings for s in row]
        else:
            entry.update(datatype="FP32", shape=list(values.shape))
            if wanted.binary:
                raw = values.numpy().astype("<f4").tobytes()
            else:
                entry["data"] = values.flatten().tolist()
        if wanted.binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary += raw
        outputs.append(entry)
    document = {"model_name": model, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        document["id"] = request.id
    text = json.dumps(document).encode()
    return (text + binary, len(text)) if binary else (text, None)

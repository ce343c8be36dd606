"""repvgg serve's API surface: every answer is documented in /openapi.json and sent as documented, a 4xx names the
problem, a model's NaN or infinite output is a JSON 500, a client that left is no error, and a hostile JSON body
leaves the event loop free. A random-weight classifier at 16 x 16 px, under the real uvicorn server in a thread of
this process, on 127.0.0.1 and a free port."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import http, server_thread

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")

#: Hang detectors, not speed expectations.
READY_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 30
SIZE = 16
INFER = "/v2/models/repvgg_tiny/infer"
#: The label the metrics count it under.
INFER_ROUTE = "/v2/models/{name}/infer"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fused RepVGG-tiny with random weights, 3 named classes, prepared at 16 x 16 px."""
    import repvgg

    model = repvgg.reparameterize_model(repvgg.create_model("repvgg_tiny", num_classes=3)).eval()
    extra = {"preprocessing": json.dumps({"img_size": SIZE}), "classes": json.dumps(["cat", "dog", "owl"])}
    return repvgg.save_weights(model, tmp_path_factory.mktemp("served") / "tiny.safetensors", extra=extra)


@pytest.fixture(scope="module")
def live(model_file: Path) -> Iterator[dict[str, Any]]:
    """``repvgg serve``'s server (eager, batches of 2), run by a thread; stopped on every way out."""
    from repvgg.serve.app import create_app
    from repvgg.serve.config import ServeConfig

    config = ServeConfig(max_batch=2, max_queue=4, max_wait_ms=0, runtime="eager")
    app = create_app(model_file, config)
    with server_thread(app, config, ready_timeout_s=READY_TIMEOUT_S) as (url, port), \
            httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        yield {"app": app, "url": url, "port": port, "client": client}


def _prepared(values: list[Any]) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE], "data": values}]}


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 20), (40, 90, 160)).save(out, format="PNG")
    return out.getvalue()


def _requests_counted(client: Any, endpoint: str) -> dict[str, float]:
    pattern = rf'^repvgg_requests_total\{{endpoint="{re.escape(endpoint)}",status="(\d+)"\}} (\S+)$'
    return {status: float(n) for status, n in re.findall(pattern, client.get("/metrics").text, re.M)}


def test_a_model_that_gives_nan_or_infinity_is_a_json_500_logged_once(live: dict[str, Any],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    client, predictor = live["client"], live["app"].state.model.predictor.predictor
    model = predictor.logits
    before = _requests_counted(client, INFER_ROUTE).get("500", 0)
    try:
        with caplog.at_level(logging.ERROR, logger="repvgg.serve"):
            for scale in (1e39, math.nan):  # beyond float32, and NaN, from a prepared input of ordinary values
                predictor.logits = lambda images, scale=scale: model(images) * scale
                for _ in range(2):
                    answer = client.post(INFER, json=_prepared([0.5] * (3 * SIZE * SIZE)))
                    assert answer.status_code == 500 and answer.headers["content-type"] == "application/json"
                    assert "NaN or infinite output" in answer.json()["error"], answer.text
                upload = client.post("/predict", files={"file": ("a.png", _png(), "image/png")})
                assert upload.status_code == 500 and "NaN or infinite" in upload.json()["error"]
    finally:
        del predictor.logits  # the method again
    assert [r.getMessage().count("NaN or infinite") for r in caplog.records] == [1]  # once, no traceback
    assert not any(r.exc_info for r in caplog.records)
    assert _requests_counted(client, INFER_ROUTE)["500"] == before + 4
    assert client.post(INFER, json=_prepared([0.5] * (3 * SIZE * SIZE))).status_code == 200


def test_a_client_that_leaves_mid_body_is_counted_apart_and_not_logged(live: dict[str, Any],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    client = live["client"]
    upload = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
              b"Content-Type: image/png\r\n\r\n")
    with caplog.at_level(logging.DEBUG, logger="uvicorn"), caplog.at_level(logging.DEBUG, logger="repvgg"):
        for path, route, content_type, first in ((INFER, INFER_ROUTE, "application/json", b'{"inputs":'),
                                                 ("/predict", "/predict", "multipart/form-data; boundary=b", upload)):
            before = _requests_counted(client, route)
            with socket.create_connection(("127.0.0.1", live["port"]), timeout=REQUEST_TIMEOUT_S) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                             f"Content-Length: 1000\r\n\r\n".encode() + first)
                time.sleep(0.05)  # the server is reading the body when the client leaves
            deadline = time.monotonic() + REQUEST_TIMEOUT_S
            while _requests_counted(client, route).get("499", 0) != before.get("499", 0) + 1:
                assert time.monotonic() < deadline, _requests_counted(client, route)
                time.sleep(0.02)
            assert _requests_counted(client, route).get("500") == before.get("500")  # no server error counted
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text


def test_a_16_mb_hostile_json_body_leaves_liveness_answered(live: dict[str, Any]) -> None:
    from repvgg.limits import nesting_depth

    # the scan agrees with the brackets' meaning: inside strings, and after escaped quotes, they do not count
    assert nesting_depth('{"a": "[[[\\"[[", "b": [[1], {"c": []}]}') == 4
    assert nesting_depth(b"[" * 40 + b"]" * 40) == 40
    refused: list[httpx.Response] = []
    for body in (b"[" * (16 * 2**20 - 64), b'["[' + b"\\\\" * (8 * 2**20 - 64) + b'", ' + b"[" * 64):
        took: list[float] = []

        def send(b: bytes = body) -> None:
            started = time.perf_counter()
            refused.append(http().post(live["url"] + INFER, content=b, timeout=REQUEST_TIMEOUT_S))
            took.append(time.perf_counter() - started)

        sender = threading.Thread(target=send)
        sender.start()
        waits = []
        with httpx.Client(base_url=live["url"], timeout=REQUEST_TIMEOUT_S) as poller:
            while sender.is_alive():
                started = time.perf_counter()
                assert poller.get("/v2/health/live").status_code == 200
                waits.append(time.perf_counter() - started)
                time.sleep(0.005)
        sender.join()
        # Parsed on the event loop, the body would hold liveness for most of the hostile request's time (the parse
        # is most of it); parsed in a worker thread, a liveness request waits a small share of it.
        assert max(waits) < took[0] / 2, (f"liveness waited {max(waits):.3f} s of the {took[0]:.3f} s a hostile body "
                                          "took to be read and refused")
    assert [r.status_code for r in refused] == [400, 400]
    assert all("levels deep" in r.json()["error"] for r in refused)


def test_a_body_of_more_values_than_a_batch_holds_is_refused_unparsed(live: dict[str, Any]) -> None:
    client = live["client"]
    answer = client.post(INFER, content=b'{"inputs": [{"data": [' + b"0," * 5000 + b"0]}]}")
    assert answer.status_code == 413 and "values" in answer.json()["error"], answer.text


@pytest.mark.parametrize("data, words", [
    (["0.5"] * (3 * SIZE * SIZE), "numbers"),  # strings that numpy would read as numbers
    ([True] + [0.5] * (3 * SIZE * SIZE - 1), "numbers"),  # a bool among numbers
    ([[0.5] * (3 * SIZE * SIZE)], "flat list"),
])
def test_prepared_data_must_be_a_flat_list_of_numbers(live: dict[str, Any], data: list[Any], words: str) -> None:
    answer = live["client"].post(INFER, json=_prepared(data))
    assert answer.status_code == 400 and "inputs[0].data" in answer.json()["error"] and words in answer.json()["error"]


@pytest.mark.parametrize("length", ["+{n}", "{n}.0", "{n}_", "0x{n:x}", "\u0661"])
def test_the_binary_header_length_is_digits_only(live: dict[str, Any], length: str) -> None:
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 4}}]}).encode()
    header = length.format(n=len(head)).encode()
    answer = live["client"].post(INFER, content=head + b"\0\0\0\0", headers=[(b"Inference-Header-Content-Length",
                                                                             header)])
    assert answer.status_code == 400 and "Inference-Header-Content-Length" in answer.json()["error"], answer.text


def test_head_is_answered_where_get_is_and_a_405_says_what_is_allowed(live: dict[str, Any]) -> None:
    client = live["client"]
    for path in ("/", "/v2", "/v2/health/live", "/openapi.json", "/metrics"):
        assert client.head(path).status_code == 200 and client.head(path).content == b"", path
    for method, path, allowed in (("DELETE", "/v2", "GET, HEAD"), ("PUT", "/openapi.json", "GET, HEAD"),
                                  ("GET", INFER, "POST"), ("HEAD", "/predict", "POST")):
        answer = client.request(method, path)
        assert answer.status_code == 405 and answer.headers["allow"] == allowed, (method, path, answer.headers)
        assert method == "HEAD" or "error" in answer.json()


def test_openapi_documents_the_answers_and_bodies_and_is_counted_as_itself(live: dict[str, Any]) -> None:
    client = live["client"]
    before = _requests_counted(client, "/openapi.json").get("200", 0)
    paths = client.get("/openapi.json").json()["paths"]
    assert _requests_counted(client, "/openapi.json")["200"] == before + 1
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        operation = paths[path]["post"]
        assert set(operation["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
        assert {"400", "404", "413", "500", "503"} <= set(operation["responses"]), path
        assert operation["responses"]["503"]["headers"]["Retry-After"]
    assert "multipart/form-data" in paths["/predict"]["post"]["requestBody"]["content"]
    assert {"400", "413", "422", "500", "503"} <= set(paths["/predict"]["post"]["responses"])
    assert paths["/v2/health/ready"]["get"]["responses"]["400"]["content"]["application/json"]["schema"]
    # version is part of the versioned paths only, never a query parameter
    for path, operations in paths.items():
        for operation in operations.values():
            names = {(p["name"], p["in"]) for p in operation.get("parameters", [])}
            assert ("version", "query") not in names and (("version", "path") in names) == ("{version}" in path)


def test_the_model_name_and_class_names_are_checked_before_loading(model_file: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from repvgg.serve.app import create_app

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])])
    for stem in ("a#b c?", "caf\u00e9", ".hidden"):
        onnx.save(helper.make_model(graph), tmp_path / f"{stem}.onnx")
        with pytest.raises(ValueError, match="--name"):
            create_app(tmp_path / f"{stem}.onnx")
    create_app(tmp_path / "a#b c?.onnx", name="ok")  # a name given in its place is taken
    (tmp_path / "twice.txt").write_text("cat\ncat\nowl\n")
    with pytest.raises(ValueError, match="distinct"):
        create_app(model_file, classes=str(tmp_path / "twice.txt"))
    with pytest.raises(FileNotFoundError):
        create_app(model_file, classes=str(tmp_path / "missing.txt"))


def test_the_binary_part_is_exactly_the_size_the_input_declares(live: dict[str, Any]) -> None:
    """``binary_data_size`` names all of the bytes after the JSON part: fewer or more of them (a stray byte, a second
    input's data) is a 400 naming the field, the exact count a 200."""
    data = np.zeros(3 * SIZE * SIZE, dtype="<f4").tobytes()

    def post(declared: int, sent: bytes) -> httpx.Response:
        head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE],
                                       "parameters": {"binary_data_size": declared}}]}).encode()
        return live["client"].post(INFER, content=head + sent,
                                   headers={"Inference-Header-Content-Length": str(len(head))})

    for declared, sent in ((len(data), data + b"\0"), (len(data) - 4, data), (len(data) + 4, data)):
        answer = post(declared, sent)
        assert answer.status_code == 400, answer.text
        assert "binary_data_size" in answer.json()["error"] and f"{len(sent)} bytes" in answer.json()["error"]
    assert post(len(data), data).status_code == 200

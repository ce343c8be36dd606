"""repvgg serve: the app in process (Starlette's test client) and the server in a subprocess on 127.0.0.1 (a free
port), its page in headless Chromium, and the model repositories for Triton and OpenVINO Model Server."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import os
import re
import signal
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import http, started_process, wait_for
from PIL import Image

from repvgg.cli import main

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")

#: Hang detectors, not speed expectations.
READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def served(qa_digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A quantization-friendly digits model (QARepVGG, 24 x 24 px) and 300 digit images as PNG files."""
    from sklearn.datasets import load_digits

    images = tmp_path_factory.mktemp("serve") / "images"
    images.mkdir()
    digits = load_digits()
    for i in range(300):
        pixels = (digits.images[-1 - i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((24, 24), Image.NEAREST).save(images / f"{i:03d}.png")
    return {"run": qa_digits_run, "images": images}


def _predict_cli(run: Path, paths: list[Path], capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict]:
    capsys.readouterr()
    # in two batches or fewer, predict runs PyTorch eager in float32 without weighing the runtimes
    assert main(["predict", str(run), *map(str, paths), "--json", "--topk", "5", "--batch-size", "512", *extra]) == 0
    return json.loads(capsys.readouterr().out)["predictions"]


@contextlib.contextmanager
def _client(run: Path, **options):
    from fastapi.testclient import TestClient

    from repvgg.serve import create_app

    with TestClient(create_app(run, **options)) as client:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while client.get("/v2/health/ready").status_code != 200:
            error = client.get("/v2/health/ready").json().get("error", "")
            assert "could not be loaded" not in error and time.monotonic() < deadline, error
            time.sleep(0.05)
        yield client


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's first bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_health_readiness_and_metadata(served: dict[str, Path]) -> None:
    from fastapi.testclient import TestClient

    from repvgg.serve import create_app

    with TestClient(create_app(served["run"], runtime="eager")) as client:
        # at once: alive, and not ready while the model loads (the protocol: a 4xx), nor serving
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": False, "error": "the model is loading"}
        assert client.get("/v2/models/qarepvgg_tiny").status_code == 503
        assert wait_for_value(lambda: client.get("/v2/health/ready").status_code == 200, READY_TIMEOUT_S)
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert client.get("/v2").json()["models"] == ["qarepvgg_tiny"]
        meta = client.get("/v2/models/qarepvgg_tiny").json()
        assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 24, 24]}
        assert meta["inputs"][1] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
        assert [o["shape"] for o in meta["outputs"]] == [[-1, 10], [-1, 10]]
        assert meta["parameters"]["classes"] == [str(i) for i in range(10)]
        assert meta["parameters"]["preprocessing"]["img_size"] == 24 and meta["parameters"]["precision"] == "float32"
        assert client.get("/v2/models/qarepvgg_tiny/ready").status_code == 200
        assert client.get("/v2/models/other").status_code == 404
        assert client.get("/v2/models/qarepvgg_tiny/versions/2").status_code == 404
        page = client.get("/").text
        assert "<script" in page and not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing from elsewhere


def test_predict_and_infer_answer_what_repvgg_predict_says(served: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    paths = sorted(served["images"].iterdir())[:12]
    expected = _predict_cli(served["run"], paths, capsys)
    with _client(served["run"], max_batch=4, runtime="eager") as client:
        for path, want in zip(paths, expected):
            got = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")}).json()
            assert got["classes"] == want["classes"] and got["indices"] == want["indices"], path
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        # the Open Inference Protocol: encoded images (JSON base64 and the binary extension), prepared tensors
        encoded = [p.read_bytes() for p in paths[:4]]
        json_body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [4],
                                 "data": [base64.b64encode(b).decode() for b in encoded]}],
                     "outputs": [{"name": "probabilities", "parameters": {"classification": 5}}]}
        answer = client.post("/v2/models/qarepvgg_tiny/infer", json=json_body).json()["outputs"][0]
        assert answer["shape"] == [4, 5]
        labels = [s.split(":", 2)[2] for s in answer["data"]]
        assert labels == [c for want in expected[:4] for c in want["classes"]]
        header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [4],
                                         "parameters": {"binary_data_size": sum(4 + len(b) for b in encoded)}}],
                             "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
        body = header + b"".join(struct.pack("<I", len(b)) + b for b in encoded)
        response = client.post("/v2/models/qarepvgg_tiny/infer", content=body,
                               headers={"Inference-Header-Content-Length": str(len(header))})
        length = int(response.headers["Inference-Header-Content-Length"])
        logits = np.frombuffer(response.content[length:], dtype="<f4").reshape(4, 10)
        assert [int(i) for i in logits.argmax(1)] == [want["indices"][0] for want in expected[:4]]
        from repvgg.predict.predictor import Predictor

        prepared = torch.stack([Predictor(served["run"], runtime="eager").prepare_encoded(b) for b in encoded])
        tensor_body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(prepared.shape),
                                   "data": prepared.flatten().tolist()}]}
        answer = client.post("/v2/models/qarepvgg_tiny/infer", json=tensor_body).json()
        outputs = {o["name"]: o for o in answer["outputs"]}
        probabilities = torch.tensor(outputs["probabilities"]["data"]).reshape(4, 10)
        assert probabilities.argmax(1).tolist() == [want["indices"][0] for want in expected[:4]]


def test_a_missing_file_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from repvgg.serve import create_app

    with pytest.raises(FileNotFoundError, match="not found"):
        create_app(tmp_path / "missing.safetensors")


def test_int8_is_served_only_under_the_guard_and_agrees_with_float32(served: dict[str, Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    paths = sorted(served["images"].iterdir())
    expected = _predict_cli(served["run"], paths, capsys)
    # the guard judges INT8 on 64 of the images (and calibrates it on 64 others)
    with _client(served["run"], dtype="int8", validation=str(served["images"]), runtime="onnxruntime",
                 max_batch=32) as client:
        assert client.get("/v2/models/qarepvgg_tiny").json()["parameters"]["precision"] == "int8"
        top1 = []
        for start in range(0, len(paths), 32):
            encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths[start: start + 32]]
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(encoded)], "data": encoded}],
                    "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}
            top1 += [s.split(":", 2)[2] for s in
                     client.post("/v2/models/qarepvgg_tiny/infer", json=body).json()["outputs"][0]["data"]]
        single = client.post("/predict", files={"file": (paths[0].name, paths[0].read_bytes(), "image/png")}).json()
    assert single["classes"][0] == top1[0]
    agree = sum(mine == want["classes"][0] for mine, want in zip(top1, expected))
    assert len(top1) == len(paths) and agree >= 0.99 * len(paths), agree
    from repvgg.serve.config import ServeConfig

    with pytest.raises(ValueError, match="needs --validation"):
        ServeConfig(dtype="int8")
    with pytest.raises(ValueError, match="--max-queue 4 is smaller than --max-batch 8"):
        ServeConfig(max_queue=4, max_batch=8)


def test_each_bad_request_gets_its_4xx_and_the_server_keeps_serving(served: dict[str, Path], tmp_path: Path) -> None:
    good = sorted(served["images"].iterdir())[0].read_bytes()
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    infer = "/v2/models/qarepvgg_tiny/infer"
    with _client(served["run"], max_body_mb=0.05, runtime="eager") as client:
        def upload(data: bytes, name: str = "x.png") -> httpx.Response:
            return client.post("/predict", files={"file": (name, data, "image/png")})

        cases = {
            "corrupt image": (upload(good[:40]), 400, "cannot read"),
            "text file": (upload(text.read_bytes(), "notes.txt"), 400, "not an image format"),
            "empty body": (client.post("/predict"), 422, "file"),
            "empty infer body": (client.post(infer, content=b""), 400, "body"),
            "60000 x 60000 PNG": (upload(_png_header(60_000, 60_000)), 413, "pixels"),
            "wrong tensor shape": (client.post(infer, json={"inputs": [{"name": "input", "datatype": "FP32",
                                                                        "shape": [1, 3, 8, 8], "data": [0] * 192}]}),
                                   400, "inputs[0].shape"),
            "unknown model": (client.post("/v2/models/resnet50/infer", json={}), 404, "resnet50"),
            "body over the limit": (upload(good + b"\0" * 60_000), 413, "--max-body-mb"),
            "a streamed body over the limit": (client.post(infer, content=(b"\0" * 8192 for _ in range(8))), 413,
                                               "--max-body-mb"),  # no Content-Length: counted as it comes
            "bad base64": (client.post(infer, json=_bytes_request(["not base64!"])), 400, "inputs[0].data"),
            "a batch over --max-batch": (client.post(infer, json=_bytes_request(["AA=="] * 9)), 400,
                                         "inputs[0].shape"),
            "wrong datatype": (client.post(infer, json={"inputs": [{"name": "image", "datatype": "FP32",
                                                                    "shape": [1], "data": [0]}]}),
                               400, "inputs[0].datatype"),
            "parameters not an object": (client.post(infer, json={**_bytes_request(["AA=="]), "parameters": "x"}),
                                         400, "parameters"),
            "a number beyond float": (client.post(infer, content=b'{"inputs": [{"name": "input", "datatype": "FP32", '
                                                 b'"shape": [1, 3, 24, 24], "data": [' + b"1" * 400 + b"]}]}"),
                                      400, "inputs[0].data"),
            "values no prepared image has": (client.post(infer, json={"inputs": [{
                "name": "input", "datatype": "FP32", "shape": [1, 3, 24, 24], "data": [1e30] * 1728}]}), 400,
                "inputs[0].data"),
            "a flag that is not a boolean": (client.post(infer, json={**_bytes_request(["AA=="]), "outputs": [
                {"name": "output", "parameters": {"binary_data": "false"}}]}), 400, "binary_data"),
            "an unknown path": (client.get("/v3/nothing"), 404, "Not Found"),
        }
        for case, (response, status, words) in cases.items():
            assert response.status_code == status, (case, response.text)
            assert words in response.json()["error"], (case, response.json())
            assert upload(good).status_code == 200, case  # and the next good request is answered
        metrics = client.get("/metrics").text
    refused = re.findall(r'^repvgg_requests_total\{endpoint="([^"]+)",status="413"\} (\S+)$', metrics, re.M)
    # the bomb (at /predict), the body refused unread and the one refused as it streamed in
    assert sum(float(n) for _, n in refused) == 3, refused


def _bytes_request(data: list[str]) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}]}


def test_a_full_queue_answers_503_with_retry_after(served: dict[str, Path]) -> None:
    good = sorted(served["images"].iterdir())[0].read_bytes()
    with _client(served["run"], max_batch=1, max_queue=1, max_wait_ms=0, runtime="eager") as client:
        batcher = client.app.state.model.batcher
        entered, release, model = threading.Event(), threading.Event(), batcher.run
        # the model is busy until released
        batcher.run = lambda images: (entered.set(), release.wait(REQUEST_TIMEOUT_S), model(images))[2]
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                post = lambda: client.post("/predict", files={"file": ("a.png", good, "image/png")})  # noqa: E731
                running = pool.submit(post)
                assert entered.wait(REQUEST_TIMEOUT_S)  # the first request is in the model
                queued = pool.submit(post)
                assert wait_for_value(lambda: batcher.waiting == 1, REQUEST_TIMEOUT_S)
                refused = post()
                assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
                release.set()
                assert running.result().status_code == 200 and queued.result().status_code == 200
        finally:
            release.set()


def wait_for_value(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


# --- the server process --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(served: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """``repvgg serve`` on 127.0.0.1 and a free port; requests wait up to 2 s for a batch of 16 to fill. PyTorch eager
    runs the model: what these tests check (a real process, its sockets and signals, batching, the page) does not
    depend on the runtime, which the in-process tests cover (ONNX Runtime, INT8), and eager starts seconds sooner."""
    logs = tmp_path_factory.mktemp("server-logs")
    cmd = [sys.executable, "-m", "repvgg", "serve", str(served["run"]), "--port", "0", "--runtime", "eager",
           "--max-batch", "16", "--max-wait-ms", "2000"]
    with started_process(cmd, logs, env={**os.environ, "OMP_NUM_THREADS": "1"}) as proc:
        found: list[str] = []

        def listening() -> bool:
            found[:] = re.findall(r"listening on (http://127\.0\.0\.1:\d+)", (logs / "stderr.txt").read_text())
            return bool(found)

        assert wait_for(listening, proc, timeout=READY_TIMEOUT_S), (logs / "stderr.txt").read_text()
        url = found[0]
        assert wait_for(lambda: http().get(url + "/v2/health/ready").status_code == 200, proc,
                        timeout=READY_TIMEOUT_S), (logs / "stderr.txt").read_text()
        yield proc, url, logs


def _post_image(url: str, data: bytes) -> httpx.Response:
    return http().post(url + "/predict", files={"file": ("d.png", data, "image/png")}, timeout=REQUEST_TIMEOUT_S)


def test_concurrent_requests_are_answered_in_batches(server, served: dict[str, Path]) -> None:
    _, url, _ = server
    images = [p.read_bytes() for p in sorted(served["images"].iterdir())[:32]]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda data: _post_image(url, data), images))
    assert [a.status_code for a in answers] == [200] * 32
    metrics = http().get(url + "/metrics").text
    batches = float(re.search(r"^repvgg_batch_images_count (\S+)$", metrics, re.M).group(1))
    images_run = float(re.search(r"^repvgg_batch_images_sum (\S+)$", metrics, re.M).group(1))
    assert images_run >= 32 and batches < images_run  # some forward passes ran more than one image


def test_the_page_shows_the_top1_the_api_gives(server, served: dict[str, Path], tmp_path: Path) -> None:
    from conftest import headless_chromium

    _, url, _ = server
    image = sorted(served["images"].iterdir())[5]
    expected = _post_image(url, image.read_bytes()).json()["classes"][0]
    with headless_chromium(tmp_path / "profile", page_load_timeout_s=REQUEST_TIMEOUT_S) as browser:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        browser.get(url + "/")
        WebDriverWait(browser, REQUEST_TIMEOUT_S).until(
            lambda b: b.find_element(By.ID, "model").text == "qarepvgg_tiny")
        browser.find_element(By.ID, "file").send_keys(str(image))
        shown = WebDriverWait(browser, REQUEST_TIMEOUT_S).until(
            lambda b: b.find_element(By.ID, "results").get_attribute("data-top1"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")
    assert shown == expected and len(rows) == 5


def test_sigterm_answers_the_requests_in_flight_and_exits_0(server, served: dict[str, Path]) -> None:
    proc, url, logs = server
    images = [p.read_bytes() for p in sorted(served["images"].iterdir())[:10]]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = [pool.submit(_post_image, url, data) for data in images]
        # 10 images wait for a batch of 16 (up to 2 s): in flight when SIGTERM comes
        assert wait_for(lambda: "repvgg_queue_images 10.0" in http().get(url + "/metrics").text, proc,
                        timeout=REQUEST_TIMEOUT_S)
        proc.send_signal(signal.SIGTERM)
        assert [a.result().status_code for a in answers] == [200] * 10
    assert proc.wait(timeout=REQUEST_TIMEOUT_S) == 0, (logs / "stderr.txt").read_text()[-3000:]
    with pytest.raises(httpx.ConnectError):
        http().get(url + "/v2/health/live")


# --- model repositories ----------------------------------------------------------------------------------------

def test_a_triton_repository_parses_with_tritons_schema_and_runs_by_its_names(served: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="tritonclient is not installed (the test extra)")
    from google.protobuf import text_format

    from repvgg.io.card import load_onnx_proto
    from repvgg.io.export import onnxruntime_session

    repo = tmp_path / "models"
    assert main(["export", str(served["run"]), str(repo), "--format", "triton", "--max-batch", "4"]) == 0
    folder = repo / "qarepvgg_tiny"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == \
        ["1/model.onnx", "config.pbtxt", "labels.txt"]
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "qarepvgg_tiny" and config.backend == "onnxruntime" and config.max_batch_size == 4
    assert config.HasField("dynamic_batching") and config.output[0].label_filename == "labels.txt"
    assert (folder / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    graph = load_onnx_proto(folder / "1" / "model.onnx").graph
    assert [config.input[0].name, config.output[0].name] == [graph.input[0].name, graph.output[0].name]
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    assert list(config.input[0].dims) == dims == [3, 24, 24] and list(config.output[0].dims) == [10]
    session = onnxruntime_session(folder / "1" / "model.onnx")
    out = session.run([config.output[0].name], {config.input[0].name: np.zeros((4, *dims), np.float32)})[0]
    assert out.shape == (4, 10)
    assert main(["export", str(served["run"]), str(repo), "--format", "triton"]) == 2  # not replaced unasked
    assert main(["export", str(served["run"]), str(repo), "--format", "triton", "--overwrite"]) == 0


def test_an_int8_file_goes_into_an_ovms_repository_as_it_is(served: dict[str, Path], tmp_path: Path) -> None:
    from repvgg.io.export import export_onnx
    from repvgg.quant.qdq import quantize_onnx, quantized_conv_count

    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m-int8.onnx"
    export_onnx(served["run"] / "deploy.safetensors", fp32)
    calibration = torch.utils.data.TensorDataset(torch.rand(8, 3, 24, 24), torch.zeros(8, dtype=torch.long))
    quantize_onnx(fp32, int8, calibration)
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        assert main(["export", str(int8), str(tmp_path / "ovms"), "--format", "ovms", "--name", "digits",
                     "--json"]) == 0
    report = json.loads(capture.getvalue())
    assert report["precision"] == "int8" and report["files"] == ["1/model.onnx"]
    copied = tmp_path / "ovms" / "digits" / "1" / "model.onnx"
    assert copied.read_bytes() == int8.read_bytes() and quantized_conv_count(copied)[0] > 0


def test_a_batch_that_fills_runs_at_once_without_waiting_out_max_wait() -> None:
    """While a batch gathers, only a request that could fill it wakes the batcher: one that fills it runs it at
    once; one that does not leaves it waiting its ``max_wait_s``."""
    import asyncio

    from repvgg.serve.batcher import Batcher

    async def scenario() -> tuple[float, float, list[int]]:
        sizes: list[int] = []
        batcher = Batcher(lambda x: list(x), max_batch=3, max_wait_s=0.5, max_queue=8,
                          on_batch=lambda n, _: sizes.append(n))
        batcher.start()
        started = time.perf_counter()
        await asyncio.gather(*(batcher.submit([i]) for i in range(3)))  # full: runs at once
        full = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(batcher.submit([i]) for i in range(2)))  # never full: waits out max_wait_s
        partial = time.perf_counter() - started
        await batcher.stop()
        return full, partial, sizes

    full, partial, sizes = asyncio.run(scenario())
    assert sizes == [3, 2] and full < 0.25 and partial >= 0.45, (full, partial, sizes)


def test_the_batcher_batches_and_tells_every_request_when_the_model_fails_or_it_stops() -> None:
    """The batcher alone: concurrent requests share a batch; a failing model fails its batch's requests and the next
    batch runs; a stop in the middle of a batch tells its requests instead of leaving them waiting."""
    import asyncio

    from repvgg.serve.batcher import Batcher, Stopping

    async def scenario() -> None:
        sizes: list[int] = []
        batcher = Batcher(lambda x: [2 * i for i in x], max_batch=4, max_wait_s=0.05, max_queue=8,
                          on_batch=lambda n, _: sizes.append(n))
        batcher.start()
        outputs = await asyncio.gather(*(batcher.submit(torch.full((1, 1), float(i))) for i in range(3)))
        assert [o[0].item() for o in outputs] == [0.0, 2.0, 4.0] and sizes == [3]
        batcher.run = lambda x: (_ for _ in ()).throw(RuntimeError("the model broke"))
        with pytest.raises(RuntimeError, match="the model broke"):
            await batcher.submit(torch.ones(1, 1))
        release = threading.Event()
        batcher.run = lambda x: (release.wait(REQUEST_TIMEOUT_S), x)[1]
        in_model = asyncio.ensure_future(batcher.submit(torch.ones(1, 1)))
        await asyncio.sleep(0.2)  # taken into the model, which waits
        threading.Timer(0.5, release.set).start()  # stop() joins the model thread: let it end
        await batcher.stop()
        with pytest.raises(Stopping, match="the server is stopping"):  # answered 503: another server may take it
            await in_model
        assert not batcher.running and batcher.waiting == 0
        with pytest.raises(Stopping, match="the server is stopping"):
            await batcher.submit(torch.ones(1, 1))

    asyncio.run(scenario())

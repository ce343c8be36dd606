"""repvgg serve at the transport: the real uvicorn server in a thread of this process, on 127.0.0.1 and a free port.
Idle and slowloris connections are closed and never lock anyone out; decoding, bursts and bodies are bounded with
JSON 503s that say when to retry; a refused body's connection is closed; a loopback server answers only requests
addressed to it."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import http, server_thread

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")

#: Hang detectors, not speed expectations.
READY_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 30
#: The header timeout of the server under test (short, so that closing slow connections is seen quickly).
HEADER_TIMEOUT_S = 0.5


def _png(value: int, side: int = 24) -> bytes:
    out = io.BytesIO()
    Image.new("L", (side, side), value).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def live(qa_digits_run: Path) -> Iterator[dict[str, Any]]:
    """``repvgg serve``'s server for the digits model (eager, --max-queue 8, a 50 KB body limit, a short header
    timeout), run by a thread; stopped on every way out."""
    from repvgg.serve.app import create_app
    from repvgg.serve.config import ServeConfig

    config = ServeConfig(max_batch=8, max_queue=8, max_wait_ms=0, runtime="eager", max_body_mb=0.05,
                         header_timeout_s=HEADER_TIMEOUT_S, allowed_hosts=("box.lan",))
    app = create_app(qa_digits_run, config)
    with server_thread(app, config, ready_timeout_s=READY_TIMEOUT_S) as (url, port):
        yield {"app": app, "url": url, "port": port}


def _predict(url: str, data: bytes, **headers: str) -> httpx.Response:
    return http().post(url + "/predict", files={"file": ("d.png", data, "image/png")}, headers=headers,
                      timeout=REQUEST_TIMEOUT_S)


def _answer_until_closed(sock: socket.socket, timeout: float) -> bytes | None:
    """Everything the server sends on ``sock`` until it closes it; None if it is still open after ``timeout``."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except socket.timeout:
        return None
    return received


def _assert_retry_json(response: httpx.Response) -> None:
    assert response.status_code == 503 and response.headers.get("Retry-After") == "1", response.text
    assert "error" in response.json()


def test_idle_and_slowloris_connections_are_closed_and_lock_nobody_out(live: dict[str, Any]) -> None:
    url, port, good = live["url"], live["port"], _png(90)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(256)]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
    # a kept-alive connection that answered one request, then sends its next request's headers a byte at a time
    kept = socket.create_connection(("127.0.0.1", port))
    try:
        kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"200 OK" in kept.recv(65536)
        started, worst, header = time.monotonic(), 0.0, b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1"
        for byte in range(len(header)):  # slowloris: one byte per connection every 0.1 s, past the header timeout
            for sock in [*slow, kept]:
                try:
                    sock.send(header[byte: byte + 1])
                except OSError:
                    pass  # closed by the server
            t = time.perf_counter()
            assert http().get(url + "/v2/health/live", timeout=REQUEST_TIMEOUT_S).status_code == 200
            assert _predict(url, good).status_code == 200
            worst = max(worst, time.perf_counter() - t)
            if time.monotonic() - started > HEADER_TIMEOUT_S + 0.3:
                break
            time.sleep(0.1)
        # a bound for a loaded 2-core test machine; benchmarks/serve_abuse.py measures the latency itself
        assert worst < 2.0, f"liveness and a prediction took {worst:.2f} s among 556 idle and slow connections"
        assert time.monotonic() - started > HEADER_TIMEOUT_S + 0.3  # the slow ones kept sending past their timeout
        assert all(_answer_until_closed(s, 2.0) is not None for s in [*idle, *slow, kept])  # all closed by the server
    finally:
        for sock in [*idle, *slow, kept]:
            sock.close()


def test_a_body_refused_by_its_length_or_as_it_streams_closes_the_connection(live: dict[str, Any]) -> None:
    port = live["port"]
    head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    lying = socket.create_connection(("127.0.0.1", port))
    chunked = socket.create_connection(("127.0.0.1", port))
    try:
        lying.sendall(head % b"/predict" + b"Content-Length: 100000000000\r\n\r\n" + b"x" * 65536)
        chunk = b"%x\r\n%s\r\n" % (30_000, b" " * 30_000)
        chunked.sendall(head % b"/v2/models/qarepvgg_tiny/infer" + b"Transfer-Encoding: chunked\r\n\r\n" +
                        chunk * 2)  # 60 KB of a 50 KB limit, with no length declared
        for sock in (lying, chunked):
            answer = _answer_until_closed(sock, 2.0)  # the server closes: nothing more of the body is read
            assert answer is not None, "the connection was left open after the refusal"
            assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower(), answer[:300]
            assert b'"error"' in answer
    finally:
        lying.close()
        chunked.close()


def test_images_being_decoded_count_against_the_queue(live: dict[str, Any]) -> None:
    url, state = live["url"], live["app"].state.model
    model, entered, release = state.predictor, threading.Event(), threading.Event()
    decode = model.decode

    def slow_decode(data: bytes, what: str) -> torch.Tensor:
        entered.set()
        release.wait(REQUEST_TIMEOUT_S)
        return decode(data, what)

    # larger than what is decoded on the event loop (INLINE_PIXELS): these go to the decoding pool
    images = [base64.b64encode(_png(i * 20, side=96)).decode() for i in range(8)]
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [8], "data": images}]}
    model.decode = slow_decode
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            eight = pool.submit(http().post, url + "/v2/models/qarepvgg_tiny/infer", json=request,
                                timeout=REQUEST_TIMEOUT_S)
            assert entered.wait(REQUEST_TIMEOUT_S)  # eight images admitted, being decoded
            assert "repvgg_queue_images 8.0" in http().get(url + "/metrics").text
            t = time.perf_counter()
            _assert_retry_json(_predict(url, _png(1)))  # refused before its image is decoded, not after theirs
            # refused at once: waiting for their decoding would take until the release below (REQUEST_TIMEOUT_S)
            assert time.perf_counter() - t < REQUEST_TIMEOUT_S / 4
            release.set()
            assert eight.result().status_code == 200
    finally:
        release.set()
        del model.decode  # the method again
    assert state.batcher.queued == 0 and _predict(url, _png(1)).status_code == 200


def test_a_burst_over_capacity_is_served_up_to_it_and_the_rest_told_when_to_retry(live: dict[str, Any]) -> None:
    url, batcher, good = live["url"], live["app"].state.model.batcher, _png(120)
    release, in_model, model = threading.Event(), [0], batcher.run

    def busy(images: torch.Tensor) -> torch.Tensor:
        in_model[0] += len(images)
        release.wait(REQUEST_TIMEOUT_S)
        return model(images)

    batcher.run = busy
    try:
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            answers = [pool.submit(_predict, url, good) for _ in range(64)]
            deadline = time.monotonic() + REQUEST_TIMEOUT_S
            while sum(a.done() for a in answers) + in_model[0] + batcher.queued < 64:
                assert time.monotonic() < deadline, "the burst was neither served nor refused"
                time.sleep(0.02)
            release.set()
            answered = [a.result() for a in answers]
    finally:
        release.set()
        batcher.run = model
    served = [a for a in answered if a.status_code == 200]
    assert 8 <= len(served) <= 16  # the queue's 8 and the batch in the model
    for refused in answered:
        if refused.status_code != 200:
            _assert_retry_json(refused)


def test_a_loopback_server_answers_only_its_own_names_and_pages(live: dict[str, Any]) -> None:
    url, port = live["url"], live["port"]

    def live_with(host: str) -> httpx.Response:
        return http().get(url + "/v2/health/live", headers={"Host": host}, timeout=REQUEST_TIMEOUT_S)

    for host in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.2", f"BOX.lan:{port}"):
        assert live_with(host).status_code == 200, host
    for host in (f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example"):
        refused = live_with(host)
        assert refused.status_code == 421 and "localhost" in refused.json()["error"], host
    good = _png(60)
    assert _predict(url, good, Origin=url).status_code == 200
    for origin in ("http://evil.example", f"http://localhost:{port + 1}", "null"):
        refused = _predict(url, good, Origin=origin)
        assert refused.status_code == 403 and "another site" in refused.json()["error"], origin


def test_the_log_shows_an_ipv6_address_in_brackets() -> None:
    from repvgg.serve.server import url

    assert url("::1", 8000) == "http://[::1]:8000"
    assert url("127.0.0.1", 0) == "http://127.0.0.1:0"


def test_a_request_still_waiting_when_the_server_stops_is_told_503() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from repvgg.serve.app import _add_error_handlers
    from repvgg.serve.batcher import Batcher, Stopping

    async def stopped() -> BaseException | None:
        batcher = Batcher(lambda x: x, max_batch=4, max_wait_s=10, max_queue=4)  # a batch that waits to fill
        batcher.start()
        with batcher.admit(2) as admission:
            waiting = asyncio.ensure_future(batcher.submit(torch.ones(2, 1), admission))
            await asyncio.sleep(0.05)
        assert batcher.queued == 2
        assert batcher._task is not None
        batcher._task.cancel()  # what a forced stop does to the gathering loop
        results = await asyncio.gather(waiting, return_exceptions=True)
        return results[0] if isinstance(results[0], BaseException) else None

    error = asyncio.run(stopped())
    assert isinstance(error, Stopping)
    app = FastAPI()
    _add_error_handlers(app)

    @app.get("/x")
    def waiting_request() -> None:
        raise error

    answer = TestClient(app).get("/x")
    _assert_retry_json(answer)
    assert "stopping" in answer.json()["error"]


@pytest.mark.parametrize("forced", [False, True])
def test_a_stop_while_the_model_loads_ends_the_process_at_once(monkeypatch: pytest.MonkeyPatch, forced: bool) -> None:
    """A load still running when the server stops (a compile in native code) is not waited for, nor finalized under:
    the process ends at once, with the stop's status (130 when forced). The server runs with the cores shared with
    the runtimes' threads, and leaves the process as it found it."""
    from repvgg.io.onnx_run import cores_shared
    from repvgg.serve import server as server_module
    from repvgg.serve.app import LOAD_THREAD
    from repvgg.serve.config import ServeConfig

    shared: list[bool] = []

    class Stopped:  # the uvicorn server after a stop: run() returns at once
        force_exit = forced

        def run(self, sockets: Any) -> None:
            shared.append(cores_shared())
            sockets[0].close()

    def exit_now(status: int) -> None:
        raise SystemExit(status)

    monkeypatch.setattr(server_module, "make_server", lambda *args, **kwargs: Stopped())
    monkeypatch.setattr(server_module.os, "_exit", exit_now)
    app = type("App", (), {"state": type("State", (), {})()})()
    release = threading.Event()
    loading = threading.Thread(target=release.wait, name=LOAD_THREAD, daemon=True)
    loading.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            server_module.serve(app, ServeConfig(port=0), failures=[])
        assert stopped.value.code == (server_module.FORCED_STOP if forced else 0)
    finally:
        release.set()
        loading.join()
    assert server_module.serve(app, ServeConfig(port=0), failures=[]) == (130 if forced else 0)  # no load: returns
    assert shared == [True, True] and not cores_shared()


def test_each_connection_sends_its_writes_at_once() -> None:
    """TCP_NODELAY on every accepted connection. A listening socket made the usual way (protocol 0, as
    ``socket.create_server`` and the server's own make it) gives accepted sockets on which asyncio leaves Nagle's
    algorithm on; an answer's body then waited for the client to acknowledge its headers (up to 40 ms a request)."""
    from repvgg.serve.server import _no_delay

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # what asyncio leaves

        class Transport:
            def get_extra_info(self, name: str) -> Any:
                return accepted if name == "socket" else None

        _no_delay(Transport())  # type: ignore[arg-type]
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for sock in (client, accepted, listener):
            sock.close()


def test_keep_alive_requests_are_not_held_by_delayed_acks(live: dict[str, Any]) -> None:
    """Requests on one kept connection against requests each on a new connection, interleaved, over plain sockets:
    with Nagle's algorithm on, every answer on the kept connection waited for a delayed acknowledgement (43 ms
    against about 1 ms on a new connection, which the kernel acknowledges at once)."""
    address = ("127.0.0.1", live["port"])
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def answer(sock: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200")

    kept, fresh = [], []
    with socket.create_connection(address, timeout=REQUEST_TIMEOUT_S) as connection:
        connection.sendall(request)
        answer(connection)
        for _ in range(9):
            started = time.perf_counter()
            connection.sendall(request)
            answer(connection)
            kept.append(time.perf_counter() - started)
            started = time.perf_counter()
            with socket.create_connection(address, timeout=REQUEST_TIMEOUT_S) as new:
                new.sendall(request)
                answer(new)
            fresh.append(time.perf_counter() - started)
    # a kept connection saves the handshake: it must not cost more than a new one (it cost 40 times as much)
    assert sorted(kept)[4] <= 3 * sorted(fresh)[4], (kept, fresh)


def test_the_server_leaves_the_process_logging_alone(tmp_path: Path) -> None:
    """uvicorn's own logging configuration (``dictConfig``) closes every handler of the process, and a handler such
    as absl's closes its stream then (under pytest, the capture's file: every later test of the process failed).
    The server configures no logging: another library's handler and its stream are left as they were."""
    import logging

    from repvgg.serve.config import ServeConfig
    from repvgg.serve.server import make_server

    class ClosesItsStream(logging.StreamHandler):  # as absl's handler does on close()
        def close(self) -> None:
            self.stream.close()
            super().close()

    class App:  # never called: only the server is made
        state = None

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            raise AssertionError("never called")

    library = logging.getLogger("another.library")
    with open(tmp_path / "log.txt", "w") as stream:
        handler = ClosesItsStream(stream)
        library.addHandler(handler)
        try:
            make_server(App(), ServeConfig(), port=8000)
            assert not stream.closed and library.handlers == [handler]
        finally:
            library.removeHandler(handler)


def test_only_a_small_upload_to_a_model_of_small_inputs_is_decoded_on_the_event_loop() -> None:
    """A small upload is decoded on the loop only when what decoding makes of it is small too: resized up to a large
    model's input (or, very elongated, to a small model's short side) it goes to the decoding pool, leaving the loop
    to liveness and the other requests."""
    from types import SimpleNamespace

    from repvgg.io.card import Preprocessing
    from repvgg.serve.classifier import ClassifierModel
    from repvgg.serve.config import ServeConfig
    from repvgg.serve.state import ModelState

    class Model:
        def __init__(self, img_size: int) -> None:
            self.predictor = SimpleNamespace(preprocessing=Preprocessing(img_size=img_size))
            self.threads: list[str] = []

        prepared_pixels = ClassifierModel.prepared_pixels

        def decode(self, data: bytes, what: str) -> str:
            self.threads.append(threading.current_thread().name)
            return what

    def png(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height)).save(buffer, "PNG")
        return buffer.getvalue()

    async def decode(img_size: int, data: bytes) -> tuple[str, str]:
        state = ModelState("unused", ServeConfig(), None)
        state.predictor = Model(img_size)
        try:
            await state.decode(data, "the upload")
            return state.predictor.threads[0], threading.current_thread().name
        finally:
            state.decoder.shutdown()

    digits, large = 32, 1792  # resized to short sides of 36 and 2048 (crop 0.875)
    assert (Preprocessing(img_size=digits).resize, Preprocessing(img_size=large).resize) == (36, 2048)
    where = {case: asyncio.run(decode(img_size, png(*size))) for case, (img_size, size) in {
        "small to small": (digits, (32, 32)), "small to large": (large, (32, 32)),
        "elongated to small": (digits, (1, 4000)), "large to small": (digits, (65, 65))}.items()}
    assert where["small to small"][0] == where["small to small"][1]  # the loop's own thread
    pooled = {case: decoded for case, (decoded, _) in where.items() if case != "small to small"}
    assert all(thread.startswith("repvgg-decode") for thread in pooled.values()), where


@pytest.mark.parametrize("task, kind", [("detection", "detector"), ("segmentation", "segmenter")])
def test_a_dense_model_refuses_a_precision_it_is_not_served_in(task: str, kind: str, tmp_path: Path) -> None:
    """``--dtype int8`` (or bfloat16) for a detector or a segmenter is refused, as ``repvgg predict`` refuses it, not
    dropped for float32 without a word."""
    from repvgg.serve.config import ServeConfig
    from repvgg.serve.dense import DenseModel

    for dtype in ("int8", "bfloat16"):
        with pytest.raises(ValueError, match=f"a {kind} is served in float32 here \\(--dtype {dtype} applies to "
                                             "classifiers\\); quantize it with `repvgg quantize`"):
            DenseModel("unused", task, ServeConfig(dtype=dtype, validation=str(tmp_path)))

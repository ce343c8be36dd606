"""Shared test helpers: randomized BatchNorm statistics (default-initialized BN hides fusion bugs)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running mean/var and affine parameters, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                n = module.num_features

                def uniform(lo: float, hi: float) -> torch.Tensor:
                    return lo + (hi - lo) * torch.rand(n, generator=gen)

                module.running_mean.copy_(uniform(-0.5, 0.5))
                module.running_var.copy_(uniform(0.5, 2.0))
                if module.affine:
                    module.weight.copy_(uniform(0.5, 1.5))
                    module.bias.copy_(uniform(-0.3, 0.3))
    return model


def write_image_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 40) -> Path:
    """An ImageNet-style folder (``train/`` and ``val/``, ``class_<i>/<j>.png``) of distinguishable noisy images."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                base = torch.full((size, size, 3), 60 * c, dtype=torch.uint8)
                noise = torch.randint(0, 40, (size, size, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray((base + noise).numpy()).save(folder / f"{i}.png")
    return root


def edited_model_file(source: Path, target: Path, kind: str, **fields: object) -> Path:
    """A copy of the detector's or segmenter's (``kind``) file ``source`` at ``target`` with metadata ``fields``
    replaced: a field of the model's configuration by its name, any other by its own (a JSON value, or a str taken
    as the raw field)."""
    import json

    from repvgg.io.weights import read_safetensors, write_safetensors

    tensors, metadata = read_safetensors(source)
    config = json.loads(metadata[kind])
    for key in [k for k in fields if k in config]:
        config[key] = fields.pop(key)
    metadata[kind] = json.dumps(config)
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
    return write_safetensors(tensors, target, metadata)


def narrow(name: str) -> dict[str, object]:
    """Overrides giving registered model ``name``'s layout (depths, groups, SE, block kind) at 1/8 of its widths:
    what is per block (fusion, the interfaces) holds at any width, and a B3 at full width costs seconds to build."""
    from repvgg.nn.registry import get_spec

    return {"base_widths": tuple(w // 8 for w in get_spec(name).base_widths)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# Under pytest-xdist each worker gets its share of the cores: two workers with two threads each on a 2-core
# machine would spin against each other. The processes a test starts (torchrun-style runs, the CLI) inherit the
# share through OMP_NUM_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _SHARE = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_SHARE)
    os.environ["OMP_NUM_THREADS"] = str(_SHARE)


#: The files that take longest (seconds of one worker on a 2-core machine, measured), run first: with one file per
#: worker (``--dist loadfile``, queued in this order by ``--no-loadscope-reorder``), a long file that starts last keeps
#: one worker busy while the other waits.
LONGEST_FIRST = ("test_serve.py", "test_detection.py", "test_train.py", "test_multinode.py", "test_segment_deploy.py",
                 "test_fast.py", "test_cluster.py", "test_segmentation_train.py", "test_model.py", "test_quantize.py",
                 "test_reliability.py", "test_hostile_inputs.py", "test_run_safety.py", "test_predict.py",
                 "test_precision.py", "test_outputs.py", "test_bench.py", "test_run_mixups.py", "test_plus.py",
                 "test_timm_interface.py", "test_weights.py", "test_export.py", "test_cli.py", "test_hub.py",
                 "test_claims.py", "test_yolo.py", "test_ablation.py", "test_docs.py", "test_serve_transport.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the collected tests so the longest files come first (see :data:`LONGEST_FIRST`), the rest as collected;
    every worker orders them alike, so the schedule stays deterministic."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_model_left_loading() -> Iterator[None]:
    """An app stopped while its model loads leaves the load to finish in a daemon thread (``repvgg serve`` exits
    then; an embedded app cannot). It is waited for here, so that the next test never shares its process with it:
    TorchScript, which the load may compile, fails when two threads compile at once."""
    yield
    from repvgg.serve.app import LOAD_THREAD

    for thread in threading.enumerate():
        if thread.name == LOAD_THREAD and thread is not threading.current_thread():
            thread.join(timeout=600)


@functools.cache
def http() -> Any:
    """One ``httpx.Client`` for the servers the tests start on 127.0.0.1. A client made per request (``httpx.get``)
    loads the system's certificates each time, about 30 ms of CPU, in every polling loop; this one keeps no
    connection between requests, as ``httpx.get`` does not, and is safe to share between threads."""
    import httpx

    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


@contextlib.contextmanager
def started_process(cmd: list[str], log_dir: Path, *, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` in its own process group, output to files in ``log_dir`` (a full pipe cannot block it);
    the whole group is killed on every way out of the ``with`` block."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "w") as out, open(log_dir / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, *, timeout: float) -> bool:
    """Poll ``condition`` until it holds, the process ends, or ``timeout`` (a hang detector, not a speed limit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def run_process(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group and kill the whole group on every way out (timeout included).

    ``timeout`` is a hard limit for a hang, not a speed expectation: keep it generous.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout:.0f} s (killed)\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="session")
def qa_digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A QARepVGG trained on the digits at 24 x 24 (8 epochs of 11 steps; INT8 agrees with it on every validation
    image), read-only. It is trained once a session: the first worker to ask trains it, another waits for it (a lock
    in the temporary folder the workers share)."""
    from filelock import FileLock

    from repvgg.cli import main

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    run = shared / "qa-digits-24"
    with FileLock(str(shared / "qa-digits-24.lock")):
        if not (run / "deploy.safetensors").is_file():
            assert main(["train", "--model", "qarepvgg_tiny", "--epochs", "8", "--batch-size", "128", "--img-size",
                         "24", "--device", "cpu", "--no-inference-speed", "--output", str(run)]) == 0
    return run


@contextlib.contextmanager
def server_thread(app: object, config: object, *, ready_timeout_s: float = 120) -> Iterator[tuple[str, int]]:
    """``repvgg serve``'s server for ``app`` run by a thread on 127.0.0.1 and a free port, once it is ready: ``(url,
    port)``; stopped on every way out."""
    import socket
    import threading

    import httpx

    from repvgg.serve.server import make_server

    sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = sock.getsockname()[1]
    server = make_server(app, config, port=port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return http().get(url + "/v2/health/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        deadline = time.monotonic() + ready_timeout_s
        while not ready():
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.02)
        yield url, port
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextlib.contextmanager
def headless_chromium(profile: Path, *, page_load_timeout_s: float = 30) -> Iterator[object]:
    """Debian's Chromium driven by its ChromeDriver, headless, with its profile in ``profile``; quit on every way out.
    Skips the test where selenium, chromium or chromedriver is missing (``.ci/run`` installs the two)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        browser.set_page_load_timeout(page_load_timeout_s)
        yield browser
    finally:
        browser.quit()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The process ends next: freeze what is left out of the garbage collector, whose final collection over every
    object the tests' PyTorch created would take seconds (the same as `repvgg.cli.run_and_exit`)."""
    import gc

    gc.freeze()

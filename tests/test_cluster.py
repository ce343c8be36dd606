"""Prediction over a Ray cluster (``repvgg predict --ray``): the same predictions as plain ``predict``, each input
exactly once even when an actor is killed mid-run, bad images as ``--bad-images`` says, and a clear exit 2 for a
cluster that cannot be reached. Skipped, saying why, without the ``scale`` extra."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is not installed: the scale extra (pip install 'repvgg[scale]')")

from repvgg.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 small grey images and one file that is not an image."""
    folder = tmp_path_factory.mktemp("cluster") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def _predict(*argv: str) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["predict", *argv, "--json"])
    return status, json.loads(out.getvalue())


def _assert_same(found: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [p["source"] for p in found] == [p["source"] for p in expected]  # each input once, in input order
    for got, want in zip(found, expected):
        assert (got["classes"], got["indices"], got["error"]) == (want["classes"], want["indices"], want["error"])
        assert np.allclose(got["probabilities"], want["probabilities"], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def plain(qa_digits_run: Path, images: Path) -> list[dict[str, Any]]:
    status, document = _predict(str(qa_digits_run), str(images), "--bad-images", "skip", "--runtime", "eager")
    assert status == 0
    return document["predictions"]


def _actors(others: set[int]) -> dict[int, str]:
    """This machine's processes that are actors of the predictor's pool, by pid: their Ray process titles.
    ``others``: the pids known to be none of Ray's, skipped (and added to): only Ray's worker becomes an actor, and
    reading every process's title at each look took seconds of the CPU the cluster needs."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in others:
            with contextlib.suppress(OSError):
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "MapBatches(_Predict)" in title:
                    found[int(entry.name)] = title
                elif "ray" not in title:  # Ray's processes (and a fork of one before its exec) say ray
                    others.add(int(entry.name))
    return found


@pytest.fixture
def ray_temp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder of its own for the session files of a cluster the test starts (logs, sockets), removed after: Ray
    keeps them in /tmp/ray otherwise. Short, as Ray's socket paths must be."""
    folder = Path(tempfile.mkdtemp(prefix="rt-"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the test finds the actor's process in /proc")
def test_ray_local_predicts_what_plain_predict_does_even_when_its_actor_is_killed(
        qa_digits_run: Path, images: Path, plain: list[dict[str, Any]], ray_temp: Path) -> None:
    """``--ray local`` (one actor, batches of two) while a watcher kills the actor in the middle of a batch: Ray
    starts another, and every image comes once, in order, as plain ``predict`` says it (the broken one skipped)."""
    killed: list[int] = []
    replaced: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        others: set[int] = set()
        while not stop.is_set():
            for pid, title in _actors(others).items():
                if not killed and ".submit" in title:  # predicting a batch
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                elif killed and pid != killed[0] and pid not in replaced:
                    replaced.append(pid)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        status, document = _predict(str(qa_digits_run), str(images), "--bad-images", "skip", "--runtime", "eager",
                                    "--ray", "local", "--ray-actors", "1", "--batch-size", "2")
    finally:
        stop.set()
        watcher.join()
    assert status == 0 and not ray.is_initialized()  # the cluster it started is stopped
    assert list(ray_temp.glob("ray/session_*")), "the cluster kept its files elsewhere"
    assert killed and replaced, (killed, replaced)
    assert document["ray"]["actors"] == 1 and document["skipped"] == 1
    _assert_same(document["predictions"], plain)


def test_a_bad_image_fails_the_run_as_in_plain_predict(monkeypatch: pytest.MonkeyPatch) -> None:
    """The actors report an unreadable image (the first test's skipped one); the driver applies --bad-images fail
    at the first such row, with plain predict's message (here fed batches as the actors answer them)."""
    from repvgg.predict import cluster as module

    broken = os.path.abspath("broken.png")  # what the actors are given, and answer for
    rows = [{"source": os.path.abspath("a.png"), "classes": ["1"], "indices": [1], "probabilities": [0.9],
             "error": None},
            {"source": broken, "classes": [], "indices": [], "probabilities": [],
             "error": f"cannot read image {broken}: not an image"}]
    model = json.dumps({"runtime": "eager", "task": "classification"})

    class Answers:
        def iter_batches(self, **_: Any) -> Iterator[dict[str, Any]]:
            yield {"prediction": np.array([json.dumps(r) for r in rows], dtype=object),
                   "model": np.array([model] * 2, dtype=object), "mask": np.array([b""] * 2, dtype=object),
                   "draw": np.array([b""] * 2, dtype=object)}

    monkeypatch.setattr(module, "predict_dataset", lambda *args, **kwargs: Answers())
    monkeypatch.setattr(ray.data, "from_items", lambda items, **blocks: items)
    found = list(module.iter_predict_paths(["a.png", "broken.png"], "run", module.ClusterOptions(),
                                           bad_images="skip"))
    assert [(row["source"], row["error"]) for row, _, _ in found] == [
        ("a.png", None), ("broken.png", "cannot read image broken.png: not an image")]  # named as given
    with pytest.raises(ValueError, match="broken.png: not an image. Remove or replace the file, or pass "
                                         "--bad-images skip"):
        list(module.iter_predict_paths(["a.png", "broken.png"], "run", module.ClusterOptions(), bad_images="fail"))


def test_a_cluster_out_of_reach_is_exit_2_without_a_traceback(qa_digits_run: Path, images: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    status = main(["predict", str(qa_digits_run), str(images / "000.png"), "--ray", "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert status == 2 and "cannot reach a Ray cluster at 127.0.0.1:9" in err and "Traceback" not in err
    assert not ray.is_initialized()
    # plain predict's decoding workers: each actor decodes its own batches, so the flag would be ignored
    assert main(["predict", str(qa_digits_run), str(images / "000.png"), "--ray", "local", "--workers", "4"]) == 2
    assert "--workers applies to plain predict" in capsys.readouterr().err and not ray.is_initialized()


def test_a_cluster_started_here_is_stopped_its_monitor_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """``stop_started`` kills the local cluster's autoscaler monitor before ``ray.shutdown()``, which would otherwise
    wait out its one-second grace for it (the monitor reports its end to a control store stopped by then); a process
    that joined a cluster (no node of its own) just disconnects."""
    from repvgg.predict import cluster

    events: list[str] = []

    class Process:
        def __init__(self, kind: str) -> None:
            self.process = self
            self.kind = kind

        def kill(self) -> None:
            events.append(f"kill {self.kind}")

    class Node:
        all_processes = {"monitor": [Process("monitor")], "raylet": [Process("raylet")]}

    monkeypatch.setattr(ray, "shutdown", lambda: events.append("shutdown"))
    monkeypatch.setattr(ray._private.worker, "_global_node", Node(), raising=False)
    cluster.stop_started()
    assert events == ["kill monitor", "shutdown"]  # the rest is ray.shutdown's to stop
    events.clear()
    monkeypatch.setattr(ray._private.worker, "_global_node", None, raising=False)
    cluster.stop_started()
    assert events == ["shutdown"]


def test_detectors_and_segmenters_predict_with_ray_as_without_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``predict --ray`` for a detector and a segmenter (random weights) answers plain ``predict``'s boxes, classes
    and fractions, and writes the same drawings, masks and overlays, byte for byte; an unreadable image is skipped as
    plain ``predict`` skips it. The actor (``_Predict``) runs in this process, fed the driver's paths in batches of
    three: the transport between them, Ray Data's actor pool, is the first test's (one cluster start in the suite)."""
    import torch

    from repvgg.detection import create_detector, save_detector
    from repvgg.io.onnx_run import cores_shared, share_cores
    from repvgg.predict import cluster
    from repvgg.segmentation.pspnet import SegmenterConfig, build_segmenter
    from repvgg.segmentation.weights import save_segmenter

    class Answers:
        def __init__(self, paths: list[str], artifact: str, options: Any, graph: bytes | bool) -> None:
            self.paths, self.options = paths, options
            self.actor = cluster._Predict(str(artifact), options, 1, graph or None)

        def iter_batches(self, **_: Any) -> Iterator[dict[str, Any]]:
            for i in range(0, len(self.paths), 3):  # two batches, the second with the broken image only
                yield self.actor({"path": np.array(self.paths[i:i + 3], dtype=object)})

    monkeypatch.setattr(cluster, "connect", lambda address: False)
    monkeypatch.setattr(ray.data, "from_items", lambda items, **blocks: [item["path"] for item in items])
    monkeypatch.setattr(cluster, "predict_dataset", Answers)
    detector = save_detector(create_detector("repvgg_tiny", 2, image_size=64, head_convs=0), tmp_path / "det.st",
                             classes=["a", "b"], data={"data": None, "synthetic": {"image_size": 64}})
    segmenter = save_segmenter(build_segmenter(SegmenterConfig("repvgg_tiny", 3, head_channels=8, aux_channels=0)),
                               tmp_path / "seg.st", classes=["x", "y", "z"])
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, size in enumerate([(64, 64), (48, 80), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    runs = {"boxes": (detector, ["--score-threshold", "0.05", "--draw"]), "masks": (segmenter, ["--draw"])}
    threads, shared = torch.get_num_threads(), cores_shared()  # what the actor sets for its own process
    found: dict[str, dict[str, Any]] = {}
    try:
        for kind, (artifact, extra) in runs.items():
            for mode, ray_args in (("plain", []), ("ray", ["--ray", "auto", "--ray-actors", "1"])):
                files = tmp_path / kind / mode
                masks = ["--masks", str(files / "masks")] if kind == "masks" else []
                status, found[f"{kind} {mode}"] = _predict(str(artifact), str(folder), "--bad-images", "skip", *extra,
                                                           str(files / "drawn"), *masks, *ray_args)
                assert status == 0
    finally:
        torch.set_num_threads(threads)
        share_cores(shared)
    for kind in runs:
        plain_rows, ray_rows = found[f"{kind} plain"], found[f"{kind} ray"]
        assert ray_rows["ray"]["actors"] == 1 and ray_rows["skipped"] == plain_rows["skipped"] == 1
        for got, want in zip(ray_rows["predictions"], plain_rows["predictions"], strict=True):
            assert {k: v for k, v in got.items() if k not in ("detections", "mask")} == \
                {k: v for k, v in want.items() if k not in ("detections", "mask")}
            assert Path(got.get("mask") or "").name == Path(want.get("mask") or "").name
            assert [d["class"] for d in got.get("detections", [])] == [d["class"] for d in want.get("detections", [])]
            for a, b in zip(got.get("detections", []), want.get("detections", [])):
                assert abs(a["score"] - b["score"]) < 1e-5 and np.allclose(a["box"], b["box"], rtol=0, atol=1e-3)
        written = sorted(p.relative_to(tmp_path / kind / "plain") for p in (tmp_path / kind / "plain").rglob("*.png"))
        assert len(written) == (3 if kind == "boxes" else 6)  # the broken image has none
        for name in written:  # the same pixels (file for file: both encode them alike)
            assert (tmp_path / kind / "ray" / name).read_bytes() == (tmp_path / kind / "plain" / name).read_bytes()
    assert sum(len(p["detections"]) for p in found["boxes plain"]["predictions"]) > 0


def test_an_actor_answers_each_row_of_its_batch_as_given(qa_digits_run: Path, images: Path,
                                                         plain: list[dict[str, Any]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A Dataset's rows are not listed again by the actor: a path given twice is predicted twice, and a missing file
    or a folder is a row with its ``error`` (for ``--bad-images`` on the driver), not a failed batch; the columns
    keep the batch's length and order."""
    import torch

    from repvgg.io import onnx_run
    from repvgg.predict.cluster import ClusterOptions, _Predict

    first = str(images / "000.png")
    paths = [first, str(images / "missing.png"), first, str(images), str(images / "001.png")]
    # the actor sets its process's threads and core sharing: this process's are put back after
    monkeypatch.setattr(onnx_run, "_sharing", {"cores": onnx_run.cores_shared()})
    threads = torch.get_num_threads()
    try:
        actor = _Predict(str(qa_digits_run), ClusterOptions(runtime="eager", measure=False, batch_size=4), 1, None)
        batch = actor({"path": np.array(paths, dtype=object)})
    finally:
        torch.set_num_threads(threads)
    assert all(len(batch[column]) == len(paths) for column in ("prediction", "model", "mask", "draw"))
    rows = [json.loads(text) for text in batch["prediction"]]
    assert [row["source"] for row in rows] == paths
    assert [bool(row["error"]) for row in rows] == [False, True, False, True, False]
    assert "missing.png" in rows[1]["error"] and str(images) in rows[3]["error"]
    by_source = {p["source"]: p for p in plain}
    _assert_same([rows[0], rows[2], rows[4]], [by_source[first], by_source[first], by_source[paths[4]]])


def test_relative_paths_reach_actors_working_elsewhere(qa_digits_run: Path, images: Path,
                                                       plain: list[dict[str, Any]], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """On a cluster started in another folder (``--ray auto``, another machine) an actor resolves a relative path
    against its own working folder: the artifact, the images and the ``--classes`` file go to the actors as absolute
    paths, and the answers name the images as given. Ray Data is stood in for by its actor, run here after moving
    to another folder."""
    import torch

    from repvgg.io import onnx_run
    from repvgg.predict import cluster as module

    driver, elsewhere = tmp_path / "driver", tmp_path / "elsewhere"
    driver.mkdir(), elsewhere.mkdir()
    (driver / "names.txt").write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    monkeypatch.chdir(driver)
    given = [os.path.relpath(images / name, driver) for name in ("000.png", "001.png", "broken.png", "002.png")]
    (tmp_path / "deep" / "inner").mkdir(parents=True)  # lnk/../000.png is deep/000.png to the system, not ./000.png
    shutil.copy(images / "000.png", tmp_path / "deep" / "000.png")
    (driver / "lnk").symlink_to(tmp_path / "deep" / "inner")
    given.append(os.path.join("lnk", "..", "000.png"))

    class Dataset:  # Ray Data's part: the rows in order, each batch to the actor the pool holds
        context = type("Context", (), {"execution_options": type("Options", (), {})()})()

        def __init__(self, items: list[dict[str, str]]) -> None:
            self.items = items

        def map_batches(self, actor: Any, *, fn_constructor_args: tuple, batch_size: int, **_: Any) -> Any:
            self.actor, self.arguments, self.batch_size = actor, fn_constructor_args, batch_size
            return self

        def iter_batches(self, **_: Any) -> Iterator[dict[str, Any]]:
            monkeypatch.chdir(elsewhere)
            pool = self.actor(*self.arguments)
            for start in range(0, len(self.items), self.batch_size):
                chunk = self.items[start: start + self.batch_size]
                yield pool({"path": np.array([item["path"] for item in chunk], dtype=object)})

    monkeypatch.setattr(ray.data, "from_items", lambda items, **blocks: Dataset(items))
    monkeypatch.setattr(ray.data, "ActorPoolStrategy", lambda **size: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1})
    # the actor sets its process's threads and core sharing: this process's are put back after
    monkeypatch.setattr(onnx_run, "_sharing", {"cores": onnx_run.cores_shared()})
    threads = torch.get_num_threads()
    options = module.ClusterOptions(runtime="eager", measure=False, batch_size=3, classes="names.txt")
    try:
        found = [row for row, _, _ in module.iter_predict_paths(given, os.path.relpath(qa_digits_run, driver),
                                                                options, bad_images="skip", graph=False)]
    finally:
        torch.set_num_threads(threads)
    assert [row["source"] for row in found] == given
    assert found[2]["error"] and given[2] in found[2]["error"] and str(images) not in found[2]["error"]
    by_source = {Path(p["source"]).name: p for p in plain}
    for row in (found[0], found[1], found[3], found[4]):
        want = by_source[Path(row["source"]).name]
        assert row["error"] is None and row["classes"] == [f"digit {i}" for i in want["indices"]]
        assert np.allclose(row["probabilities"], want["probabilities"], rtol=0, atol=1e-5)

"""Prediction over a Ray cluster (``repvgg predict --ray``): the same predictions as plain ``predict``, each input
exactly once even when an actor is killed mid-run, bad images as ``--bad-images`` says, and a clear exit 2 for a
cluster that cannot be reached. Skipped, saying why, without the ``scale`` extra."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
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


def test_ray_local_predicts_what_plain_predict_does(qa_digits_run: Path, images: Path,
                                                    plain: list[dict[str, Any]]) -> None:
    status, document = _predict(str(qa_digits_run), str(images), "--bad-images", "skip", "--runtime", "eager",
                                "--ray", "local", "--ray-actors", "1", "--batch-size", "8")
    assert status == 0 and not ray.is_initialized()  # the cluster it started is stopped
    assert document["ray"]["actors"] == 1 and document["skipped"] == 1
    _assert_same(document["predictions"], plain)


def test_a_cluster_out_of_reach_is_exit_2_without_a_traceback(qa_digits_run: Path, images: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    status = main(["predict", str(qa_digits_run), str(images / "000.png"), "--ray", "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert status == 2 and "cannot reach a Ray cluster at 127.0.0.1:9" in err and "Traceback" not in err
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_an_actor_killed_mid_run_is_replaced_and_every_input_comes_once(cluster: None, qa_digits_run: Path,
                                                                        images: Path,
                                                                        plain: list[dict[str, Any]]) -> None:
    from repvgg.predict.cluster import ClusterOptions, predict_dataset

    paths = sorted(str(p) for p in images.iterdir())
    dataset = ray.data.from_items([{"path": p} for p in paths])
    options = ClusterOptions(batch_size=4, actors=2, runtime="eager", measure=False)
    found, killed = [], None
    for batch in predict_dataset(dataset, qa_digits_run, options).iter_batches(batch_size=None,
                                                                               batch_format="numpy"):
        found += [json.loads(text) for text in batch["prediction"]]
        if killed is None:
            killed = json.loads(batch["model"][0])["pid"]
            os.kill(killed, signal.SIGKILL)  # the actor that answered first, with batches still to come
    assert killed is not None and len(found) == len(paths)
    _assert_same(found, plain)


def test_a_bad_image_fails_the_run_as_in_plain_predict(monkeypatch: pytest.MonkeyPatch) -> None:
    """The actors report an unreadable image (the first test's skipped one); the driver applies --bad-images fail
    at the first such row, with plain predict's message (here fed batches as the actors answer them)."""
    from repvgg.predict import cluster as module

    rows = [{"source": "a.png", "classes": ["1"], "indices": [1], "probabilities": [0.9], "error": None},
            {"source": "broken.png", "classes": [], "indices": [], "probabilities": [],
             "error": "cannot read image broken.png: not an image"}]
    model = json.dumps({"runtime": "eager"})

    class Answers:
        def iter_batches(self, **_: Any) -> Iterator[dict[str, Any]]:
            yield {"prediction": np.array([json.dumps(r) for r in rows], dtype=object),
                   "model": np.array([model] * 2, dtype=object)}

    monkeypatch.setattr(module, "predict_dataset", lambda *args: Answers())
    monkeypatch.setattr(ray.data, "from_items", lambda items: items)
    found = list(module.iter_predict_paths(["a.png", "broken.png"], "run", module.ClusterOptions(),
                                           bad_images="skip"))
    assert [p.error for p, _ in found] == [None, rows[1]["error"]]
    with pytest.raises(ValueError, match="broken.png: not an image. Remove or replace the file, or pass "
                                         "--bad-images skip"):
        list(module.iter_predict_paths(["a.png", "broken.png"], "run", module.ClusterOptions(), bad_images="fail"))

"""Prediction over a Ray cluster (``repvgg predict ... --ray ADDRESS``): Ray Data streams the image paths listed
on the driver to a pool of actors, each holding one [`Predictor`][repvgg.predict.predictor.Predictor] (its runtime
and precision chosen and guarded as in plain ``predict``), which reads, decodes and predicts its batches where it
runs. Nothing but paths goes to the actors and nothing but the predictions comes back: the images are never pulled
through the driver, nor moved between machines as decoded arrays.

Ray's own machinery does the rest: an actor that dies is restarted and its batch run again (every input is
predicted exactly once in the output), the output comes back in input order as batches finish, and a cluster of
many machines is used the same way as the local one. Ray is imported only here (``pip install 'repvgg[scale]'``).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repvgg.predict.predictor import Prediction, bad_image_error

__all__ = ["ClusterOptions", "connect", "iter_predict_paths", "model_graph", "predict_dataset"]

#: Seconds to wait for a cluster's address to answer before saying it cannot be reached.
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ClusterOptions:
    """How each actor predicts (the arguments of [`Predictor`][repvgg.predict.predictor.Predictor]) and how many
    there are; ``cpus`` per actor (its threads) defaults to the cluster's CPUs shared among the actors."""

    topk: int = 5
    batch_size: int = 32
    actors: int = 2
    cpus: int | None = None
    runtime: str = "auto"
    dtype: str = "float32"
    classes: Sequence[str] | str | None = None
    calibration: Sequence[str] | None = None
    measure: bool = True
    min_agreement: float = 0.995
    max_top1_drop: float = 0.5


def connect(address: str) -> bool:
    """Join the Ray cluster at ``address`` (``auto``: the one running on this machine; ``local``: a new one on this
    machine; ``HOST:PORT``: its head) unless this process has joined one; ``True`` when the caller started it and
    should stop it (``ray.shutdown()``) after.

    Raises:
        ValueError: no cluster answers at ``address`` (naming it, with what to do).
    """
    import logging

    import ray

    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data logs each stage's progress; the CLI has its bar
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        return True
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, configure_logging=False, log_to_driver=False)
    except (ConnectionError, RuntimeError) as err:
        raise ValueError(f"cannot join a Ray cluster at {address!r}: {err}. Start one (`ray start --head`), give "
                         "its head's HOST:PORT, or use --ray local to start one on this machine") from None
    return False


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray takes auto, local or HOST:PORT (a cluster head's address), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ValueError(f"cannot reach a Ray cluster at {address}: {err}. Start one there (`ray start --head "
                         f"--port {port}`), or use --ray local to start one on this machine") from None


def predict_dataset(dataset: Any, artifact: str | os.PathLike[str], options: ClusterOptions | None = None, *,
                    graph: bytes | bool = True) -> Any:
    """``dataset`` (a Ray Dataset with a ``path`` column of image files every node can read) predicted by
    ``artifact``: a Dataset of the same rows in the same order, with ``prediction`` added (a JSON object: what
    ``predict --json`` gives for the image; ``error`` says why an unreadable one was skipped) and ``model`` (a JSON
    object: the runtime, precision and preprocessing the actor chose, its threads and process id). Lazy, as Ray
    Datasets are.

    ``graph``: ``True`` exports the model's ONNX graph here, once ([`model_graph`][repvgg.predict.cluster.model_graph]),
    for every actor to build its ONNX runtimes from; the bytes of one made earlier; ``False``: each actor exports its
    own."""
    import ray

    options = options or ClusterOptions()
    shared = model_graph(artifact, options) if graph is True else graph or None
    cpus = options.cpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // options.actors)
    # Ray Data restarts a dead actor and runs its batches again (its defaults: max_restarts and max_task_retries -1)
    predicted = dataset.map_batches(
        _Classify, fn_constructor_args=(os.fspath(artifact), options, cpus, shared), batch_size=options.batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=options.actors), num_cpus=cpus)
    for context in (dataset.context, predicted.context):  # each Dataset holds its own copy of the options
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
    return predicted


def model_graph(artifact: str | os.PathLike[str], options: ClusterOptions) -> bytes | None:
    """The ONNX graph each actor's predictor would export to build its ONNX runtimes from
    ([`export_graph`][repvgg.predict.opening.export_graph]), made once, here: the actors then start without
    exporting it, each still checking every runtime it builds against the model. ``None`` where no actor needs one
    (an ONNX file, a runtime of PyTorch's) or where the weights would lie beside the graph (over ~1.8 GB)."""
    from repvgg.predict.opening import builds_from_graph, export_graph
    from repvgg.predict.predictor import locate_artifact

    kind, path = locate_artifact(artifact)
    if kind == "onnx" or not builds_from_graph(options.runtime, options.dtype, options.measure):
        return None
    with tempfile.TemporaryDirectory(prefix="repvgg-graph-") as tmp:
        written = export_graph(path, Path(tmp) / "model.onnx", batch_size=options.batch_size)
        return written.read_bytes() if len(list(Path(tmp).iterdir())) == 1 else None


def iter_predict_paths(paths: Sequence[str], artifact: str | os.PathLike[str], options: ClusterOptions, *,
                       bad_images: str = "fail", on_batch: Callable[[int], None] | None = None,
                       graph: bytes | bool = True) -> Iterator[tuple[Prediction, dict[str, Any]]]:
    """Each of ``paths`` predicted on the cluster this process has joined ([`connect`][repvgg.predict.cluster.connect]),
    in input order as batches finish: the prediction and the model's description (``graph`` as in
    [`predict_dataset`][repvgg.predict.cluster.predict_dataset]).

    Raises:
        ValueError: an unreadable image with ``bad_images="fail"``, as plain ``predict`` says it.
    """
    import ray

    dataset = ray.data.from_items([{"path": str(path)} for path in paths])
    predicted = predict_dataset(dataset, artifact, options, graph=graph)
    for batch in predicted.iter_batches(batch_size=None, batch_format="numpy"):
        for text, model in zip(batch["prediction"], batch["model"]):
            row = json.loads(text)
            if row["error"] and bad_images == "fail":
                raise bad_image_error(row["error"])
            yield Prediction(row["source"], tuple(row["classes"]), tuple(row["indices"]),
                             tuple(row["probabilities"]), row["error"]), json.loads(model)
        if on_batch is not None:
            on_batch(len(batch["prediction"]))


class _Classify:
    """A Ray actor holding one predictor: a batch of paths in, their predictions (unreadable images reported, never
    raised: the driver applies ``--bad-images``) and the model's description out."""

    def __init__(self, artifact: str, options: ClusterOptions, cpus: int, graph: bytes | None) -> None:
        import torch

        from repvgg.io.onnx_run import share_cores
        from repvgg.predict.predictor import Predictor

        torch.set_num_threads(cpus)
        share_cores()  # the actors of a machine share its cores: no runtime spins on them or pins its threads
        self.options = options
        with tempfile.TemporaryDirectory(prefix="repvgg-actor-") as tmp:  # the runtimes load the graph as built
            local = None if graph is None else Path(tmp) / "model.onnx"
            if graph is not None:
                Path(tmp, "model.onnx").write_bytes(graph)
            self.predictor = Predictor(artifact, runtime=options.runtime, dtype=options.dtype,
                                       batch_size=options.batch_size, classes=options.classes,
                                       calibration=options.calibration, measure=options.measure,
                                       min_agreement=options.min_agreement, max_top1_drop=options.max_top1_drop,
                                       graph=local)
        p = self.predictor
        self.model = json.dumps({"artifact": p.artifact, "runtime": p.backend, "dtype": p.dtype,
                                 "preprocessing": p.preprocessing.to_dict(), "notes": list(p.card.notes),
                                 "threads": cpus, "pid": os.getpid()})

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        paths = [str(path) for path in batch["path"]]
        found = self.predictor.predict(paths, topk=self.options.topk, bad_images="skip")
        batch["prediction"] = np.array([json.dumps(p.as_dict()) for p in found], dtype=object)
        batch["model"] = np.array([self.model] * len(found), dtype=object)
        return batch

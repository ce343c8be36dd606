"""Prediction over a Ray cluster (``repvgg predict ... --ray ADDRESS``): Ray Data streams the image paths listed
on the driver to a pool of actors, each holding one predictor of the artifact's task (a classifier's
[`Predictor`][repvgg.predict.predictor.Predictor], its runtime and precision chosen and guarded as in plain
``predict``; a detector's or a segmenter's), which reads, decodes and predicts its batches where it runs. Nothing but
paths goes to the actors and nothing but the predictions comes back (with the masks and drawings asked for, as PNGs):
the images are never pulled through the driver, nor moved between machines as decoded arrays.

Ray's own machinery does the rest: an actor that dies is restarted and its batch run again (every input is
predicted exactly once in the output), the output comes back in input order as batches finish, and a cluster of
many machines is used the same way as the local one. Ray is imported only here (``pip install 'repvgg[scale]'``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repvgg.predict.predictor import bad_image_error

__all__ = ["FILES", "ClusterOptions", "check_address", "connect", "iter_predict_paths", "model_graph",
           "predict_dataset", "stop_started", "task_of"]

#: Seconds to wait for a cluster's address to answer before saying it cannot be reached.
CONNECT_TIMEOUT_S = 5.0
#: The PNGs an answer may carry (`ClusterOptions.files`).
FILES = ("mask", "draw")
#: Most blocks the listed paths are cut into (beyond MAX_BLOCKS batches, a block holds several).
MAX_BLOCKS = 10_000


@dataclass(frozen=True)
class ClusterOptions:
    """How each actor predicts (the arguments of [`Predictor`][repvgg.predict.predictor.Predictor], a detector's
    ``score_threshold``) and how many there are; ``cpus`` per actor (its threads) defaults to the cluster's CPUs shared
    among the actors. ``files``: the PNGs each image's answer carries, ``"mask"`` (a segmenter's label map, as
    ``predict --masks`` writes it) and ``"draw"`` (a detector's boxes or a segmenter's overlay, as ``--draw``)."""

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
    score_threshold: float | None = None
    files: tuple[str, ...] = ()


def connect(address: str) -> bool:
    """Join the Ray cluster at ``address`` (``auto``: the one running on this machine; ``local``: a new one on this
    machine; ``HOST:PORT``: its head) unless this process has joined one; ``True`` when the caller started it and
    should stop it ([`stop_started`][repvgg.predict.cluster.stop_started]) after.

    Raises:
        ValueError: no cluster answers at ``address`` (naming it, with what to do).
    """
    import ray

    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray's INFO lines (Ray Data's logger keeps its own level)
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        return True
    check_address(address)
    try:
        ray.init(address=address, configure_logging=False, log_to_driver=False)
    except (ConnectionError, RuntimeError) as err:
        raise ValueError(f"cannot join a Ray cluster at {address!r}: {err}. Start one (`ray start --head`), give "
                         "its head's HOST:PORT, or use --ray local to start one on this machine") from None
    return False


def stop_started() -> None:
    """Stop the cluster this process started (``ray.shutdown()``). Its autoscaler monitor is stopped first: a local
    cluster has nothing to scale, and the monitor answers ``ray.shutdown()``'s SIGTERM by reporting to the cluster's
    control store, stopped by then, so that it always outlived the one-second grace Ray gives it (a second of every
    ``--ray local`` run)."""
    import ray

    with contextlib.suppress(AttributeError, OSError):  # Ray's own bookkeeping of the processes it started here
        node = getattr(ray._private.worker, "_global_node", None)  # None when this process joined a cluster
        for process in (getattr(node, "all_processes", None) or {}).get("monitor", []):
            process.process.kill()
    ray.shutdown()


def check_address(address: str) -> None:
    """Refuse an ``address`` that is not ``auto``, ``local`` or ``HOST:PORT``, or whose head does not answer (at
    once, before anything slow starts).

    Raises:
        ValueError: naming the address, with what to do.
    """
    if address in ("auto", "local"):
        return
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
    object: the task, the runtime, precision and preprocessing the actor chose, its threads and process id), and
    ``mask`` and ``draw`` (the PNGs ``options.files`` asks for, else empty). Lazy, as Ray Datasets are.

    ``graph``: ``True`` exports the model's ONNX graph here, once ([`model_graph`][repvgg.predict.cluster.model_graph]),
    for every actor to build its ONNX runtimes from; the bytes of one made earlier; ``False``: each actor exports its
    own."""
    import ray

    artifact, options = _for_every_node(artifact, options or ClusterOptions())
    shared = model_graph(artifact, options) if graph is True else graph or None
    cpus = options.cpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // options.actors)
    # Ray Data restarts a dead actor and runs its batches again (its defaults: max_restarts and max_task_retries -1)
    predicted = dataset.map_batches(
        _Predict, fn_constructor_args=(os.fspath(artifact), options, cpus, shared), batch_size=options.batch_size,
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

    if task_of(artifact) != "classification":
        return None
    kind, path = locate_artifact(artifact)
    if kind == "onnx" or not builds_from_graph(options.runtime, options.dtype, options.measure):
        return None
    with tempfile.TemporaryDirectory(prefix="repvgg-graph-") as tmp:
        written = export_graph(path, Path(tmp) / "model.onnx", batch_size=options.batch_size)
        return written.read_bytes() if len(list(Path(tmp).iterdir())) == 1 else None


def task_of(artifact: str | os.PathLike[str]) -> str:
    """``"detection"``, ``"segmentation"`` or ``"classification"``: what the artifact's model does."""
    from repvgg.detection.predict import detection_artifact
    from repvgg.segmentation.predict import segmentation_artifact

    if detection_artifact(artifact) is not None:
        return "detection"
    return "segmentation" if segmentation_artifact(artifact) is not None else "classification"


def iter_predict_paths(paths: Sequence[str], artifact: str | os.PathLike[str], options: ClusterOptions, *,
                       bad_images: str = "fail", on_batch: Callable[[int], None] | None = None,
                       graph: bytes | bool = True
                       ) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]]:
    """Each of ``paths`` predicted on the cluster this process has joined ([`connect`][repvgg.predict.cluster.connect]),
    in input order as batches finish: what ``predict --json`` gives for the image, the model's description (its
    ``task`` among it), and the PNGs ``options.files`` asked for (``graph`` as in
    [`predict_dataset`][repvgg.predict.cluster.predict_dataset]).

    Raises:
        ValueError: an unreadable image with ``bad_images="fail"``, as plain ``predict`` says it.
    """
    import ray

    # blocks of about a batch of paths (up to MAX_BLOCKS): Ray Data's default blocks made batches of about 17 paths
    blocks = min(MAX_BLOCKS, max(1, -(-len(paths) // options.batch_size)))
    absolute = [_absolute(path) for path in paths]  # an actor's working folder is not this process's
    dataset = ray.data.from_items([{"path": path} for path in absolute], override_num_blocks=blocks)
    predicted = predict_dataset(dataset, artifact, options, graph=graph)
    given = iter(zip(paths, absolute))
    for batch in predicted.iter_batches(batch_size=None, batch_format="numpy"):
        for i, text in enumerate(batch["prediction"]):
            row, model = _as_given(json.loads(text), next(given, None)), json.loads(batch["model"][i])
            if row["error"] and bad_images == "fail":
                raise bad_image_error(row["error"]) if model["task"] == "classification" else ValueError(row["error"])
            yield row, model, {kind: bytes(batch[kind][i]) for kind in FILES if len(batch[kind][i])}
        if on_batch is not None:
            on_batch(len(batch["prediction"]))


def _for_every_node(artifact: str | os.PathLike[str], options: ClusterOptions) -> tuple[str, ClusterOptions]:
    """``artifact`` and the files ``options`` names (``classes``, ``calibration``) as absolute paths, for actors whose
    working folder is another (a cluster started elsewhere, another machine); a hub reference stays as it is."""
    from dataclasses import replace

    def local(path: str | os.PathLike[str]) -> str:
        return _absolute(path) if os.path.exists(path) else os.fspath(path)

    classes = local(options.classes) if isinstance(options.classes, (str, os.PathLike)) else options.classes
    calibration = None if options.calibration is None else [_absolute(p) for p in options.calibration]
    return local(artifact), replace(options, classes=classes, calibration=calibration)


def _absolute(path: str | os.PathLike[str]) -> str:
    """``path`` from this process's working folder, as the system reads it (``link/..`` is not ``.``: no text is
    collapsed)."""
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def _as_given(row: dict[str, Any], paths: tuple[str, str] | None) -> dict[str, Any]:
    """An actor's answer for the absolute path it was given, named by the ``paths`` (as given, absolute) it answers
    for, as plain ``predict`` names it.

    Raises:
        RuntimeError: an answer out of order, or one too many (Ray Data keeps the order: never expected).
    """
    if paths is None or row["source"] != paths[1]:
        raise RuntimeError(f"the cluster answered for {row['source']!r} where {paths and paths[1]!r} was next: "
                           "its answers are out of order; run again")
    row["source"] = paths[0]
    if row["error"]:
        row["error"] = row["error"].replace(paths[1], paths[0])
    return row


class _Predict:
    """A Ray actor holding one predictor of the artifact's task: a batch of paths in; out, their predictions
    (unreadable images reported, never raised: the driver applies ``--bad-images``), the PNGs asked for and the
    model's description."""

    def __init__(self, artifact: str, options: ClusterOptions, cpus: int, graph: bytes | None) -> None:
        import torch

        from repvgg.io.onnx_run import share_cores

        torch.set_num_threads(cpus)
        share_cores()  # the actors of a machine share its cores: no runtime spins on them or pins its threads
        self.options, self.task = options, task_of(artifact)
        opened = {"classification": _classifier, "detection": _detector, "segmentation": _segmenter}[self.task]
        self.predictor, model = opened(artifact, options, graph)
        self.model = json.dumps({**model, "task": self.task, "threads": cpus, "pid": os.getpid()})

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        paths = [str(path) for path in batch["path"]]
        made: dict[str, dict[str, bytes]] = {}
        if self.task == "classification":
            rows = [p.as_dict() for p in self.predictor.predict(paths, topk=self.options.topk, bad_images="skip",
                                                                expand=False)]  # listed: a row each, as given
        else:
            def keep(path: str, image: Any, found: Any) -> None:
                made[path] = self.predictor.pngs(image, found, self.options.files)

            rows = [r.as_dict() for r in self.predictor.iter_predict(paths, bad_images="skip", on_image=keep)]
        batch["prediction"] = np.array([json.dumps(row) for row in rows], dtype=object)
        batch["model"] = np.array([self.model] * len(rows), dtype=object)
        for kind in FILES:
            batch[kind] = np.array([made.get(row["source"], {}).get(kind, b"") for row in rows], dtype=object)
        return batch


def _classifier(artifact: str, options: ClusterOptions, graph: bytes | None) -> tuple[Any, dict[str, Any]]:
    from repvgg.predict.predictor import Predictor

    with tempfile.TemporaryDirectory(prefix="repvgg-actor-") as tmp:  # the runtimes load the graph as built
        local = None
        if graph is not None:
            local = Path(tmp) / "model.onnx"
            local.write_bytes(graph)
        p = Predictor(artifact, runtime=options.runtime, dtype=options.dtype, batch_size=options.batch_size,
                      classes=options.classes, calibration=options.calibration, measure=options.measure,
                      min_agreement=options.min_agreement, max_top1_drop=options.max_top1_drop, graph=local)
    return p, {"artifact": p.artifact, "runtime": p.backend, "dtype": p.dtype,
               "preprocessing": p.preprocessing.to_dict(), "notes": list(p.card.notes)}


def _detector(artifact: str, options: ClusterOptions, graph: bytes | None) -> tuple[Any, dict[str, Any]]:
    from repvgg.detection.predict import DEFAULT_SCORE_THRESHOLD, DetectionPredictor

    threshold = DEFAULT_SCORE_THRESHOLD if options.score_threshold is None else options.score_threshold
    p = DetectionPredictor(artifact, runtime=options.runtime, score_threshold=threshold, classes=options.classes,
                           measure=options.measure, samples=options.calibration)
    return p, {"artifact": p.artifact, "runtime": p.backend, "runtime_reason": p.reason,
               "score_threshold": p.score_threshold}


def _segmenter(artifact: str, options: ClusterOptions, graph: bytes | None) -> tuple[Any, dict[str, Any]]:
    from repvgg.segmentation.predict import SegmentationPredictor

    p = SegmentationPredictor(artifact, runtime=options.runtime, classes=options.classes)
    return p, {"artifact": p.artifact, "runtime": p.backend}

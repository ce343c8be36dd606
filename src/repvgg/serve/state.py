"""The served model's state: the predictor once loaded, its decoding pool and batcher; what the endpoints compute
from it (metadata, inference) and the page."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import torch
from torch import Tensor

from repvgg.limits import LimitExceeded
from repvgg.serve.batcher import Batcher
from repvgg.serve.config import ServeConfig
from repvgg.serve.protocol import IMAGE, INPUT, OUTPUT, PROBABILITIES, encode_response, parse_infer

__all__ = ["BadImage", "ModelState", "NotReady", "UnknownModel", "infer", "model_metadata", "page_html"]

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """The model is still loading (or failed to load)."""


class UnknownModel(LookupError):
    """A model name this server does not serve."""


class BadImage(ValueError):
    """An upload that is not a readable image."""


class ModelState:
    """The served model once loaded: the predictor, its decoding pool and its batcher; ``error`` if loading failed."""

    def __init__(self, artifact: str | os.PathLike[str], config: ServeConfig,
                 on_failure: Callable[[str], None] | None) -> None:
        self.artifact, self.config, self.on_failure = artifact, config, on_failure
        self.predictor: Any = None
        self.batcher: Batcher | None = None
        self.error: str | None = None
        self.name = config.name
        self.decoder = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="repvgg-decode")

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.running

    @property
    def task(self) -> str:
        """``classification``, ``detection`` or ``segmentation`` (once loaded)."""
        return getattr(self.predictor, "task", "classification")

    def load(self) -> None:
        """Build the predictor and warm it (in a worker thread: the server answers liveness meanwhile)."""
        from repvgg.predict.inputs import expand_inputs
        from repvgg.predict.predictor import Predictor
        from repvgg.serve.dense import DenseModel, dense_task

        cfg = self.config
        task = dense_task(self.artifact)
        if task is not None:
            dense = DenseModel(self.artifact, task, cfg)
            self.predictor, self.name = dense, cfg.name or dense.name
            log.info("serving %s (%s) as %r on %s: %s", dense.predictor.artifact, task, self.name, dense.backend,
                     dense.reason)
            return
        validation = expand_inputs([cfg.validation]) if cfg.validation else None
        predictor = Predictor(self.artifact, runtime=cfg.runtime, dtype=cfg.dtype, device=cfg.device,
                              batch_size=cfg.max_batch, classes=cfg.classes, calibration=validation,
                              min_agreement=cfg.min_agreement, max_top1_drop=cfg.max_top1_drop)
        size = predictor.preprocessing.img_size
        for n in (cfg.max_batch, 1):  # the runtimes' first calls allocate and plan: before readiness, not after
            predictor.logits(torch.zeros(n, 3, size, size))
        self.predictor, self.name = predictor, cfg.name or predictor.name
        log.info("serving %s as %r on %s (%s): %s", predictor.artifact, self.name, predictor.backend,
                 predictor.dtype, predictor.reason)

    def model(self, name: str) -> Any:
        """The predictor, if ``name`` is the model's and it is ready."""
        if not self.ready:
            raise NotReady(self.error or "the model is loading; try again shortly")
        if name != self.name:
            raise UnknownModel(f"no model named {name!r} here; this server serves {self.name!r}")
        return self.predictor

    async def decode(self, data: bytes, what: str) -> Any:
        """An encoded image prepared as the model's preprocessing says (a dense model's: read as a file is), decoded
        in the pool."""
        if not data:
            raise BadImage(f"{what} is empty")
        prepare = self.predictor.decode if self.task != "classification" else self.predictor.prepare_encoded
        try:
            return await asyncio.get_running_loop().run_in_executor(self.decoder, prepare, data, what)
        except LimitExceeded:
            raise
        except ValueError as err:
            raise BadImage(str(err)) from None

    async def run(self, images: Tensor) -> Tensor:
        assert self.batcher is not None
        return await self.batcher.submit(images)

    async def decode_and_run(self, encoded: list[tuple[bytes, str]]) -> Any:
        """The model's outputs for encoded images (each with what to call it in a message). Their places in the queue
        are held from before decoding starts, so decoding is bounded by ``max_queue`` as waiting is.

        Raises:
            QueueFull: the queue has no room for them (before any is decoded).
        """
        assert self.batcher is not None
        with self.batcher.admit(len(encoded)) as admission:
            # every decoding ends before the places are given back, even when one fails
            decoded = await asyncio.gather(*(self.decode(data, what) for data, what in encoded), return_exceptions=True)
            for result in decoded:
                if isinstance(result, BaseException):
                    raise result
            batch: Any = torch.stack(decoded) if self.task == "classification" else list(decoded)  # type: ignore
            return await self.batcher.submit(batch, admission)


def page_html() -> str:
    """The page at ``/`` (one file, no external scripts, styles or fonts)."""
    return resources.files("repvgg.serve").joinpath("page.html").read_text(encoding="utf-8")


def model_metadata(state: ModelState) -> dict[str, Any]:
    """The Open Inference Protocol's model metadata, with the task, class names, preprocessing, runtime and
    precision."""
    predictor, cfg = state.predictor, state.config
    if state.task != "classification":
        return predictor.metadata(state.name)
    size = predictor.preprocessing.img_size
    classes = list(predictor.classes)
    return {"name": state.name, "versions": ["1"], "platform": f"repvgg/{predictor.backend}",
            "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]},
                       {"name": IMAGE, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(classes)]},
                        {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(classes)]}],
            "parameters": {"classes": classes, "preprocessing": predictor.preprocessing.to_dict(),
                           "runtime": predictor.backend, "precision": predictor.dtype, "max_batch": cfg.max_batch,
                           "topk": cfg.topk, "task": "classification"}}


async def infer(state: ModelState, name: str, body: bytes, header_length: str | None) -> tuple[bytes, int | None]:
    """An inference request's response body (and its JSON length when binary data follows)."""
    predictor = state.model(name)
    if state.task != "classification":
        data, request_id, wanted = await asyncio.to_thread(predictor.parse, body, header_length)
        found = await state.decode_and_run([(data, "inputs[0].data[0]")])
        return predictor.encode(state.name or name, request_id, wanted, found[0]), None
    cfg = state.config
    size = predictor.preprocessing.img_size
    # parsed in a worker thread: a large body takes the event loop (liveness, other requests) no time
    request = await asyncio.to_thread(parse_infer, body, header_length, image_shape=(3, size, size),
                                      max_batch=cfg.max_batch, max_bytes=cfg.max_body_bytes)
    if request.images is None:
        logits = await state.decode_and_run([(data, f"inputs[0].data[{i}]")
                                             for i, data in enumerate(request.encoded or [])])
    else:
        logits = await state.run(request.images)
    predictor.rank(logits, 1, what="an image of the request")  # a NaN or infinite output is refused, as predict does
    return encode_response(state.name or name, request, logits, predictor.classes)


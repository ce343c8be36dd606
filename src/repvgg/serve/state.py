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

from torch import Tensor

from repvgg.limits import LimitExceeded
from repvgg.serve.batcher import Batcher
from repvgg.serve.config import ServeConfig

__all__ = ["BadImage", "ModelState", "NotReady", "UnknownModel", "infer", "page_html"]

log = logging.getLogger(__name__)

#: Uploads of at most this many pixels (by their header), for a model that prepares them at no more pixels than
#: this, are decoded on the event loop: decoding one costs about what handing it to a decoding thread and back
#: costs, and on 32 x 32 uploads those hand-offs were a fifth of the loop's work (docs/serving.md). A small upload
#: to a model of large inputs is resized up to them: that goes to the pool, leaving the loop to the other requests.
INLINE_PIXELS = 64 * 64


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

    def load(self) -> None:
        """Build the model and warm it (in a worker thread: the server answers liveness meanwhile)."""
        from repvgg.serve.classifier import ClassifierModel
        from repvgg.serve.dense import DenseModel, dense_task

        task = dense_task(self.artifact)
        model = DenseModel(self.artifact, task, self.config) if task else ClassifierModel(self.artifact, self.config)
        self.predictor, self.name = model, self.config.name or model.name
        log.info("serving %s (%s) as %r on %s: %s", model.predictor.artifact, model.task, self.name,
                 model.description, model.reason)

    def model(self, name: str) -> Any:
        """The model ([`ClassifierModel`][repvgg.serve.classifier.ClassifierModel] or
        [`DenseModel`][repvgg.serve.dense.DenseModel]), if ``name`` is the model's and it is ready."""
        if not self.ready:
            raise NotReady(self.error or "the model is loading; try again shortly")
        if name != self.name:
            raise UnknownModel(f"no model named {name!r} here; this server serves {self.name!r}")
        return self.predictor

    async def decode(self, data: bytes, what: str) -> Any:
        """An encoded image decoded as ``predict`` reads a file of it: in the pool, or on the loop where the upload
        and what decoding makes of it are both small (`INLINE_PIXELS`)."""
        if not data:
            raise BadImage(f"{what} is empty")
        try:
            size = _size(data)
            if size and size[0] * size[1] <= INLINE_PIXELS and self.predictor.prepared_pixels(*size) <= INLINE_PIXELS:
                return self.predictor.decode(data, what)
            return await asyncio.get_running_loop().run_in_executor(self.decoder, self.predictor.decode, data, what)
        except LimitExceeded:
            raise
        except ValueError as err:
            raise BadImage(str(err)) from None

    async def run(self, images: Tensor) -> list[Any]:
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
            if len(encoded) == 1:  # no task to gather
                decoded = [await self.decode(*encoded[0])]
            else:
                decoded = await asyncio.gather(*(self.decode(data, what) for data, what in encoded),
                                               return_exceptions=True)
                for result in decoded:
                    if isinstance(result, BaseException):
                        raise result
            return await self.batcher.submit(decoded, admission)


def _size(data: bytes) -> tuple[int, int] | None:
    """An encoded image's width and height from its header (``None`` when it cannot be read: it is then decoded in
    the pool, which says what is wrong)."""
    from repvgg.training.images import open_image

    try:
        with open_image(data, load=False) as image:
            return image.width, image.height
    except Exception:  # anything refused or raised for a foreign, broken or too large header
        return None


def page_html() -> str:
    """The page at ``/`` (one file, no external scripts, styles or fonts)."""
    return resources.files("repvgg.serve").joinpath("page.html").read_text(encoding="utf-8")


async def infer(state: ModelState, name: str, body: bytes, header_length: str | None) -> tuple[bytes, int | None]:
    """An inference request's response body (and its JSON length when binary data follows)."""
    model = state.model(name)
    # parsed in a worker thread: a large body takes the event loop (liveness, other requests) no time
    request = await asyncio.to_thread(model.parse, body, header_length)
    if getattr(request, "images", None) is not None:  # a classifier's prepared images
        results = await state.run(request.images)
    else:
        results = await state.decode_and_run([(data, f"inputs[0].data[{i}]") for i, data in enumerate(request.encoded)])
    return model.encode(state.name or name, request, results)

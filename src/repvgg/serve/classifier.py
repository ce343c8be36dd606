"""Serving a classifier: the [`Predictor`][repvgg.predict.predictor.Predictor] of ``repvgg predict`` behind the
same interface as a detector or a segmenter ([`DenseModel`][repvgg.serve.dense.DenseModel]), so that the server never
asks which task it serves.

A batch is ranked where it is run, in the batcher's thread and once for the whole batch: each image's softmax, its
finiteness and its top ``--topk`` classes. The event loop then only picks an image's answer out (a request asking
another ``topk`` is ranked by [`Predictor.rank`][repvgg.predict.predictor.Predictor.rank] itself), which on small
images halves what the loop does for a request beside HTTP (docs/serving.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from repvgg.serve.config import ServeConfig
from repvgg.serve.openapi import for_model
from repvgg.serve.protocol import (IMAGE, INPUT, OUTPUT, PROBABILITIES, InferRequest, encode_response,
                                   parse_infer)

__all__ = ["ClassifierModel", "Ranked"]


@dataclass(frozen=True)
class Ranked:
    """One image's outputs: its ``logits``, whether they and their softmax are all finite, and its top classes
    (names, indices, probabilities) at the server's ``--topk``."""

    logits: Tensor
    finite: bool
    top: tuple[tuple[str, ...], tuple[int, ...], tuple[float, ...]]


class ClassifierModel:
    """A classifier's predictor as the server uses it: ``decode`` an upload, ``run`` a batch of decoded images (the
    batcher's call) and the answers."""

    task = "classification"

    def __init__(self, artifact: str | os.PathLike[str], config: ServeConfig) -> None:
        from repvgg.predict.inputs import expand_inputs
        from repvgg.predict.predictor import Predictor

        validation = expand_inputs([config.validation]) if config.validation else None
        self.predictor = Predictor(artifact, runtime=config.runtime, dtype=config.dtype, device=config.device,
                                   batch_size=config.max_batch, classes=config.classes, calibration=validation,
                                   min_agreement=config.min_agreement, max_top1_drop=config.max_top1_drop)
        size = self.predictor.preprocessing.img_size
        for n in (config.max_batch, 1):  # the runtimes' first calls allocate and plan: before readiness, not after
            self.predictor.logits(torch.zeros(n, 3, size, size))
        self.config, self.classes = config, tuple(self.predictor.classes)
        self.name, self.backend, self.reason = self.predictor.name, self.predictor.backend, self.predictor.reason
        self.description = f"{self.backend} ({self.predictor.dtype})"

    def prepared_pixels(self, width: int, height: int) -> int:
        """Pixels decoding an upload of ``width`` x ``height`` makes besides reading it: its resize to the short
        side ``predict`` resizes to, before the centre crop."""
        resized_width, resized_height = self.predictor.preprocessing.resized_size(width, height)
        return resized_width * resized_height

    def decode(self, data: bytes, what: str) -> Tensor:
        """An uploaded image prepared as ``predict`` prepares a file of it."""
        return self.predictor.prepare_encoded(data, what)

    def run(self, images: list[Tensor]) -> list[Ranked]:
        """Each image's logits, ranked at the server's ``--topk`` (one stack, one model call, one ranking)."""
        logits = self.predictor.logits(torch.stack(images))
        finite, rows = self.predictor.rank_rows(logits, self.config.topk)
        return [Ranked(row, ok, top) for row, ok, top in zip(logits, finite, rows)]

    def answer(self, source: str, result: Ranked, topk: int | None = None) -> dict[str, Any]:
        """``/predict``'s answer for one image: its top ``topk`` classes (the server's ``--topk`` by default).

        Raises:
            NonFiniteOutput: a NaN or infinite output (as ``predict`` refuses it).
        """
        classes, indices, probabilities = self._top(source, result, topk or self.config.topk)
        return {"source": source, "classes": list(classes), "indices": list(indices),
                "probabilities": list(probabilities), "error": None}

    def _top(self, what: str, result: Ranked, topk: int) -> tuple[tuple[str, ...], tuple[int, ...],
                                                                 tuple[float, ...]]:
        if result.finite and topk == self.config.topk:
            return result.top
        return self.predictor.rank(result.logits[None], topk, what=what)[0]  # the one place that refuses a NaN

    def metadata(self, name: str) -> dict[str, Any]:
        """The Open Inference Protocol's model metadata, with the class names, preprocessing, runtime and
        precision."""
        size, classes = self.predictor.preprocessing.img_size, list(self.classes)
        return {"name": name, "versions": ["1"], "platform": f"repvgg/{self.backend}",
                "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]},
                           {"name": IMAGE, "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(classes)]},
                            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(classes)]}],
                "parameters": {"classes": classes, "preprocessing": self.predictor.preprocessing.to_dict(),
                               "runtime": self.backend, "precision": self.predictor.dtype,
                               "max_batch": self.config.max_batch, "topk": self.config.topk,
                               "task": self.task}}

    def openapi(self, schema: dict[str, Any], name: str) -> dict[str, Any]:
        """The server's OpenAPI document with this model's name, input size and batch limit."""
        return for_model(schema, name, self.predictor.preprocessing.img_size, self.config.max_batch)

    def parse(self, body: bytes, header_length: str | None) -> InferRequest:
        """An infer request: prepared images or encoded ones, and the outputs it asks for.

        Raises:
            BadRequest: naming the field at fault.
        """
        size = self.predictor.preprocessing.img_size
        return parse_infer(body, header_length, image_shape=(3, size, size), max_batch=self.config.max_batch,
                           max_bytes=self.config.max_body_bytes)

    def encode(self, model: str, request: InferRequest, results: list[Ranked]) -> tuple[bytes, int | None]:
        """The infer response of a request's ``results``, and its JSON part's length when binary data follows.

        Raises:
            NonFiniteOutput: an image's output is NaN or infinite.
        """
        for result in results:
            if not result.finite:
                self._top("an image of the request", result, 1)
        return encode_response(model, request, torch.stack([r.logits for r in results]), self.classes)

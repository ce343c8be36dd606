"""Serving a detector or a segmenter: models that take images of any size and answer boxes or a mask. The server
runs the predictors of ``repvgg predict`` ([`DetectionPredictor`][repvgg.detection.predict.DetectionPredictor],
[`SegmentationPredictor`][repvgg.segmentation.predict.SegmentationPredictor]), so every answer is what ``predict``
gives for the same image: ``/predict`` answers the boxes of ``predict --json`` (class, score, box) or the classes
present with their share of the pixels and the mask as a base64 PNG, the same bytes ``predict --masks`` writes. The
Open Inference Protocol's infer takes one encoded image (BYTES) a request and answers tensors: ``boxes`` (FP32
``[N, 4]``), ``scores`` (FP32 ``[N]``) and ``labels`` (INT64 ``[N]``), or ``mask`` (UINT8 ``[H, W]``)."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import torch
from torch import Tensor

from repvgg.limits import LimitExceeded
from repvgg.serve.config import ServeConfig
from repvgg.serve.protocol import IMAGE, EncodedRequest, parse_encoded

__all__ = ["DENSE_OUTPUTS", "DenseModel", "dense_model_name", "dense_task"]

#: Each dense task's infer outputs: name -> (datatype, shape with -1 for sizes known per image).
DENSE_OUTPUTS = {"detection": {"boxes": ("FP32", [-1, 4]), "scores": ("FP32", [-1]), "labels": ("INT64", [-1])},
                 "segmentation": {"mask": ("UINT8", [-1, -1])}}


def dense_task(artifact: str | os.PathLike[str]) -> str | None:
    """``"detection"`` or ``"segmentation"`` for a detector's or segmenter's artifact, else ``None`` (told by
    content)."""
    from repvgg.detection.predict import detection_artifact
    from repvgg.segmentation.predict import segmentation_artifact

    if detection_artifact(artifact) is not None:
        return "detection"
    if segmentation_artifact(artifact) is not None:
        return "segmentation"
    return None


def dense_model_name(task: str, config: Any) -> str:
    """A dense model's name where ``--name`` gives none: ``KIND-BACKBONE`` (``yolo-efficientrep_t``,
    ``pspnet-repvgg_tiny``), from its configuration (an object or its dict)."""
    def get(key: str, default: Any = None) -> Any:
        return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

    return f"{get('kind', 'fcos')}-{get('backbone')}" if task == "detection" else f"pspnet-{get('backbone')}"


class DenseModel:
    """A detector's or segmenter's predictor as the server uses it: ``decode`` an upload, ``run`` decoded images (the
    batcher's call), and the answers; the interface of
    [`ClassifierModel`][repvgg.serve.classifier.ClassifierModel]."""

    def __init__(self, artifact: str | os.PathLike[str], task: str, config: ServeConfig) -> None:
        if config.dtype != "float32":  # as `repvgg predict` refuses it: a precision asked for is never dropped
            kind = "detector" if task == "detection" else "segmenter"
            raise ValueError(f"a {kind} is served in float32 here (--dtype {config.dtype} applies to classifiers); "
                             f"quantize it with `repvgg quantize` and serve the INT8 file")
        runtime = "pytorch" if config.runtime in ("eager", "channels_last") else config.runtime
        if task == "detection":
            from repvgg.detection.predict import DEFAULT_SCORE_THRESHOLD, DetectionPredictor

            threshold = DEFAULT_SCORE_THRESHOLD if config.score_threshold is None else config.score_threshold
            self.predictor: Any = DetectionPredictor(artifact, runtime=runtime, score_threshold=threshold,
                                                     classes=config.classes, device=config.device)
        else:
            from repvgg.segmentation.predict import SegmentationPredictor

            self.predictor = SegmentationPredictor(artifact, runtime=runtime, classes=config.classes,
                                                   device=config.device)
        self.task, self.config = task, config
        self.classes = list(self.predictor.classes)
        self.backend = self.predictor.backend
        self.reason = getattr(self.predictor, "reason", None) or ("asked for" if config.runtime != "auto" else
                                                                  "a segmenter file runs in PyTorch, an ONNX one in "
                                                                  "ONNX Runtime")
        self.name = dense_model_name(task, self.predictor.config)
        self.description = self.backend

    def prepared_pixels(self, width: int, height: int) -> int:
        """Pixels decoding an upload of ``width`` x ``height`` makes besides reading it: none (a dense model's
        resizing runs with the model)."""
        return 0

    def decode(self, data: bytes, what: str) -> Any:
        """An uploaded image, read as ``predict`` reads a file (the pixel limit, 16-bit grey, a detector's size), and
        no larger than ``--max-segment-mp`` for a segmenter that runs it at its own size."""
        from repvgg.detection.predict import check_detector_image
        from repvgg.training.images import load_rgb

        image = load_rgb(data, what=what)
        if self.task == "detection":
            check_detector_image(image.width, image.height, self.predictor.config.image_size, what)
        elif self.predictor.val_size is None and image.width * image.height > self.config.max_segment_mp * 1e6:
            raise LimitExceeded(f"{what} is {image.width} x {image.height} pixels, more than this server's segmenter "
                                f"takes ({self.config.max_segment_mp:g} megapixels, --max-segment-mp: it runs each "
                                "image at its own size); send a smaller one")
        return image

    def run(self, images: list[Any]) -> list[Any]:
        """Each image's detections or mask (one at a time: the images differ in size)."""
        if self.task == "detection":
            return [self.predictor.detect(image) for image in images]
        return [self.predictor.segment(image) for image in images]

    def answer(self, source: str, result: Any, topk: int | None = None) -> dict[str, Any]:
        """``/predict``'s answer for one image: what ``predict --json`` reports, with the class names; a
        segmenter's mask as a base64 palette PNG (``topk``, a classifier's, is not asked of these models)."""
        if self.task == "detection":
            return {**self.predictor.describe(source, result).as_dict(), "classes": self.classes}
        from repvgg.segmentation.predict import mask_png

        png = mask_png(result, len(self.classes))
        shares = [{"class": name, "fraction": share} for name, share in self.predictor.fractions(result).items()]
        return {"source": source, "error": None, "classes": shares, "names": self.classes,
                "mask_png": base64.b64encode(png).decode("ascii"), "height": int(result.shape[0]),
                "width": int(result.shape[1])}

    def metadata(self, name: str) -> dict[str, Any]:
        """The Open Inference Protocol's model metadata: one encoded image in, the task's tensors out."""
        outputs = [{"name": n, "datatype": d, "shape": s} for n, (d, s) in DENSE_OUTPUTS[self.task].items()]
        parameters: dict[str, Any] = {"task": self.task, "classes": self.classes, "runtime": self.backend,
                                      "max_batch": self.config.max_batch}
        if self.task == "detection":
            parameters["score_threshold"] = self.predictor.score_threshold
        return {"name": name, "versions": ["1"], "platform": f"repvgg/{self.backend}",
                "inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [1]}], "outputs": outputs,
                "parameters": parameters}

    def openapi(self, schema: dict[str, Any], name: str) -> dict[str, Any]:
        """The server's OpenAPI document as it is: a dense model takes images of any size."""
        return schema

    def encode(self, model: str, request: EncodedRequest, results: list[Any]) -> tuple[bytes, None]:
        """The infer response (JSON) of the request's one image: the outputs it asks for, as tensors."""
        (result,) = results
        tensors: dict[str, Tensor] = ({"boxes": result["boxes"].float(), "scores": result["scores"].float(),
                                       "labels": result["labels"].long()} if self.task == "detection"
                                      else {"mask": result.to(torch.uint8)})
        outputs = []
        for output in request.outputs:
            values = tensors[output]
            outputs.append({"name": output, "datatype": DENSE_OUTPUTS[self.task][output][0],
                            "shape": list(values.shape), "data": values.flatten().tolist()})
        document: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": outputs,
                                    "parameters": {"task": self.task}}
        if request.id is not None:
            document["id"] = request.id
        return json.dumps(document).encode(), None

    def parse(self, body: bytes, header_length: str | None) -> EncodedRequest:
        """An infer request of one encoded image, with the outputs it asks for (all by default).

        Raises:
            BadRequest: naming the field at fault.
        """
        return parse_encoded(body, header_length, max_bytes=self.config.max_body_bytes, max_batch=1,
                             outputs=tuple(DENSE_OUTPUTS[self.task]))

"""Detecting objects in new images with a trained detector: a ``det-train`` file (or its run folder) run by PyTorch,
or an exported ``.onnx`` detector run by ONNX Runtime or OpenVINO. Each image's boxes come back in its own pixels,
named by the artifact's classes; ``repvgg predict`` prints them, writes them as CSV and draws them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from repvgg.dense.weights import dense_artifact
from repvgg.io.card import check_class_names, read_class_names
from repvgg.io.formats import identify_file
from repvgg.limits import check_float
from repvgg.training.images import load_rgb, rgb_tensor

__all__ = ["DEFAULT_SCORE_THRESHOLD", "DetectionPredictor", "ImageDetections", "check_detector_image",
           "detection_artifact", "drawing_png"]

#: ``on_image(path, image, detections)``: what a caller does with each readable image (e.g. draw it).
ImageHook = Callable[[str, Any, dict[str, Tensor]], None]
#: Detections scoring below this are not reported unless the user asks.
DEFAULT_SCORE_THRESHOLD = 0.3
#: Images the runtimes are checked and timed on.
SAMPLE_IMAGES = 4


def detection_artifact(artifact: str | os.PathLike[str]) -> Path | None:
    """The detector file ``artifact`` names (a run folder gives its ``deploy.safetensors``), or ``None`` when it is
    not a detector: a ``det-train`` file or an ONNX file exported from one, told by content. Asking imports neither
    torchvision nor the detector's modules (a classifier's ``predict`` asks first)."""
    def metadata(path: Path) -> Any:  # read for an ONNX file only
        from repvgg.detection.export import onnx_detector_metadata

        return onnx_detector_metadata(path)

    return dense_artifact(artifact, "detector", metadata)


def check_detector_image(width: int, height: int, image_size: int, what: str) -> None:
    """Refuse an image that the detector's resize (its longer side to ``image_size``) would leave without a row or a
    column: an unreadable image for ``--bad-images``.

    Raises:
        ValueError: naming ``what`` and its size.
    """
    if min(width, height) * image_size < max(width, height):
        raise ValueError(f"cannot read {what}: a {width} x {height} image resized to a longer side of {image_size} "
                         "(the detector's size) keeps no row or column of pixels; crop it first")


@dataclass
class ImageDetections:
    """One image's detections: ``boxes`` as ``[x1, y1, x2, y2]`` in its pixels, best first; ``error`` when the image
    could not be read (and was skipped)."""

    source: str
    classes: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "error": self.error,
                "detections": [{"class": c, "score": s, "box": b} for c, s, b in zip(self.classes, self.scores,
                                                                                    self.boxes)]}


class DetectionPredictor:
    """Boxes in new images from a detector artifact.

    Args:
        artifact: a ``det-train`` run folder or file (``deploy.safetensors``, ``best.pt``, ``last.pt``; a
            training-time one is converted), or an exported ``.onnx`` detector.
        runtime: ``"auto"``, ``"pytorch"`` (a model file; ``"eager"`` and ``"channels_last"`` mean it too),
            ``"onnxruntime"`` or ``"openvino"`` (an ONNX file, or a model file's graph exported on the fly and checked).
            ``auto`` with ``measure`` takes the fastest runtime that detects as the artifact does
            ([`repvgg.detection.runtime`][repvgg.detection.runtime]); without, PyTorch for a model file and ONNX
            Runtime for an ONNX file.
        score_threshold: detections scoring below it are left out.
        classes: names in place of the artifact's (one per class): a list, or a text file with one name a line.
        device: where PyTorch runs a model file (other than ``cpu``: PyTorch alone).
        measure: weigh the runtimes (which exports the graph and compiles it: seconds) for ``runtime="auto"``.
        samples: images (paths, PIL images or uint8 ``(3, H, W)`` tensors) to check and time the runtimes on;
            default: validation images of the data the artifact records (generated scenes where it has moved).
    """

    def __init__(self, artifact: str | os.PathLike[str], *, runtime: str = "auto",
                 score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                 classes: Sequence[str] | str | os.PathLike[str] | None = None, device: str = "cpu",
                 measure: bool = True, samples: Sequence[Any] | None = None) -> None:
        from repvgg.detection.runtime import DETECTOR_RUNTIMES

        path = detection_artifact(artifact)
        if path is None:
            raise ValueError(f"{os.fspath(artifact)} is not a detector (a det-train file, its run folder, or an ONNX "
                             "file exported from one)")
        self.score_threshold = check_float(score_threshold, "--score-threshold", low=0, high=1)
        self.artifact = str(path)
        runtime = "pytorch" if runtime in ("eager", "channels_last") else runtime
        if runtime not in DETECTOR_RUNTIMES:
            raise ValueError(f"a detector runs on {', '.join(DETECTOR_RUNTIMES)} (or eager), not {runtime}")
        from repvgg.detection.detector import DetectorConfig
        from repvgg.detection.export import onnx_detector_metadata
        from repvgg.detection.weights import load_detector

        onnx = identify_file(path) == "onnx"
        if device != "cpu" and (onnx or runtime not in ("auto", "pytorch")):
            raise ValueError(f"ONNX runtimes run a detector on the CPU here; predict the det-train file with --runtime "
                             f"pytorch for --device {device}")
        model, meta = (None, onnx_detector_metadata(path) or {}) if onnx else load_detector(path)
        self.config = DetectorConfig.from_dict(meta["detector"])
        self.classes = list(meta["classes"] or [])
        if classes is not None:
            names = read_class_names(classes) if isinstance(classes, (str, os.PathLike)) else list(classes)
            source = f"--classes {os.fspath(classes)}" if isinstance(classes, (str, os.PathLike)) else "classes="
            self.classes = check_class_names(names, source, self.config.num_classes, model="the detector")
        if not self.classes:
            raise ValueError(f"{path} records no class names; give them with --classes")
        self._runner = _runner(path, model, meta, self.config.image_size, runtime, device, measure, samples)
        self.backend, self.reason, self._run = self._runner.backend, self._runner.reason, self._runner.run

    @torch.no_grad()
    def detect(self, image: Any) -> dict[str, Tensor]:
        """One PIL image's (or uint8 ``(3, H, W)`` tensor's) detections over the score threshold."""
        tensor = rgb_tensor(image)
        check_detector_image(tensor.shape[-1], tensor.shape[-2], self.config.image_size, "the image")
        found = self._run(tensor.float() / 255)
        keep = found["scores"] >= self.score_threshold
        labels = found["labels"][keep].long()
        if len(labels) and int(labels.max()) >= len(self.classes):
            raise ValueError(f"the detector predicts class {int(labels.max())} but names only {len(self.classes)}")
        return {"boxes": found["boxes"][keep].float(), "scores": found["scores"][keep].float(), "labels": labels}

    def iter_predict(self, paths: Sequence[str], *, bad_images: str = "fail",
                     on_image: ImageHook | None = None) -> Iterator[ImageDetections]:
        """Each path's detections in order; an unreadable image stops (``"fail"``, a ValueError naming it) or is
        reported and skipped (``"skip"``). ``on_image(path, image, detections)`` sees every readable image."""
        for path in paths:
            try:
                image = load_rgb(path)
                check_detector_image(image.width, image.height, self.config.image_size, f"image {path}")
            except ValueError as err:
                if bad_images == "fail":
                    raise
                yield ImageDetections(path, error=str(err))
                continue
            found = self.detect(image)
            if on_image is not None:
                on_image(path, image, found)
            yield self.describe(path, found)

    def pngs(self, image: Any, found: dict[str, Tensor], wanted: Sequence[str]) -> dict[str, bytes]:
        """The PNGs of one image that ``wanted`` names: ``"draw"``, the image with ``found`` drawn (``--draw``)."""
        return {"draw": drawing_png(image, found, self.classes)} if "draw" in wanted else {}

    def describe(self, source: str, found: dict[str, Tensor]) -> ImageDetections:
        """``found`` (from [`detect`][repvgg.detection.predict.DetectionPredictor.detect]) as ``predict`` reports it:
        class names, scores to 6 decimals, boxes to 3."""
        return ImageDetections(source, [self.classes[int(c)] for c in found["labels"]],
                               [round(float(s), 6) for s in found["scores"]],
                               [[round(float(v), 3) for v in box] for box in found["boxes"]])


def _runner(path: Path, model: Any, meta: dict[str, Any], size: int, runtime: str, device: str, measure: bool,
            samples: Sequence[Any] | None) -> Any:
    """How a detector artifact runs: ``model`` (``None`` for the ONNX file ``path``; its ``image_size`` is ``size``)
    in ``runtime``, weighed on ``samples`` where there is a choice
    ([`repvgg.detection.runtime`][repvgg.detection.runtime])."""
    from repvgg.detection.runtime import DetectorRunner, detector_runner, graph_runner
    from repvgg.nn.convert import reparameterize_model

    weigh = (runtime == "auto" and measure) or runtime in ("onnxruntime", "openvino")
    images = _samples(samples, meta, size) if weigh else []
    if model is None:
        return graph_runner(path, images, runtime, measure=measure)
    model = (model if model.deploy else reparameterize_model(model)).eval()
    if device != "cpu":
        model = model.to(device)
        return DetectorRunner(lambda image: {k: v.cpu() for k, v in model([image.to(device)])[0].items()}, "pytorch",
                              f"PyTorch on {device}")
    return detector_runner(model, images, runtime, measure=measure)


def _samples(samples: Sequence[Any] | None, meta: dict[str, Any], size: int) -> list[Tensor]:
    """Float images in [0, 1] to weigh the runtimes on: up to `SAMPLE_IMAGES` readable ones of ``samples``, or
    validation images of the data ``meta`` records."""
    from repvgg.detection.export import check_images

    if samples is None:
        return check_images(meta, size, None, SAMPLE_IMAGES)
    images = []
    for sample in samples:
        try:
            tensor = rgb_tensor(load_rgb(sample) if isinstance(sample, (str, os.PathLike)) else sample, "a sample")
            check_detector_image(tensor.shape[-1], tensor.shape[-2], size, "a sample")
        except ValueError:
            continue  # unreadable, or left without pixels by the resize: told when it is predicted
        images.append(tensor.float() / 255)
        if len(images) == SAMPLE_IMAGES:
            break
    return images or check_images(meta, size, None, SAMPLE_IMAGES)


def drawing_png(image: Any, detections: dict[str, Tensor], classes: Sequence[str]) -> bytes:
    """``image`` with ``detections`` drawn (class name and score on each box), as a PNG's bytes."""
    import io

    from PIL import Image

    from repvgg.detection.plots import draw_detections

    drawn = draw_detections(rgb_tensor(image), detections, classes, threshold=0.0)
    buffer = io.BytesIO()
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()

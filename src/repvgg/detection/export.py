"""ONNX export of a detector: the converted network, torchvision's resizing and normalisation, box decoding and
non-maximum suppression (ONNX ``NonMaxSuppression``) in one graph, which ONNX Runtime and OpenVINO run.

The graph takes one float image ``(3, H, W)`` in [0, 1] of any size and returns ``boxes`` ``(N, 4)`` (``x1, y1, x2,
y2`` in the input's pixels), ``scores`` ``(N,)`` and ``labels`` ``(N,)`` (class indices, named by the file's
``classes``). It is written only after ONNX Runtime detected what PyTorch does on validation images: the same
labels, boxes within [`BOX_TOLERANCE_PX`][repvgg.detection.metrics.BOX_TOLERANCE_PX] (where two overlapping boxes of a
class score within float rounding of each other, NMS may keep either: such a pair counts as the same detection).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from repvgg.detection.evaluate import validation_data
from repvgg.detection.metrics import BOX_TOLERANCE_PX, SCORE_TOLERANCE, box_deviation, differs_by_ties_only
from repvgg.detection.weights import load_detector
from repvgg.errors import ConversionMismatch
from repvgg.io.card import write_onnx_metadata
from repvgg.io.export import noticing_interrupts
from repvgg.io.onnx_run import onnxruntime_session, openvino_model
from repvgg.limits import MIN_OPSET, check_int
from repvgg.nn.convert import reparameterize_model
from repvgg.serialization import check_output_path, commit_staged, staging_folder

__all__ = ["DETECTOR_OUTPUTS", "DetectorExport", "export_detector", "onnx_detector"]

log = logging.getLogger(__name__)

#: The exported graph's outputs, in order.
DETECTOR_OUTPUTS = ("boxes", "scores", "labels")


@dataclass(frozen=True)
class DetectorExport:
    """What [`export_detector`][repvgg.detection.export.export_detector] wrote and how it was checked."""

    path: str
    converted: bool
    opset: int
    images_checked: int
    max_box_deviation_px: float
    detections_checked: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def onnx_detector(path: str | os.PathLike[str], runtime: str = "onnxruntime") -> Callable[[torch.Tensor],
                                                                                        dict[str, torch.Tensor]]:
    """An exported detector as a callable: one float ``(3, H, W)`` image in [0, 1] in, its ``boxes``, ``scores`` and
    ``labels`` out, run by ONNX Runtime or by OpenVINO (in float32: left to itself on a CPU with BF16 units, OpenVINO
    may compute in BF16)."""
    if runtime == "onnxruntime":
        session = onnxruntime_session(path)
        name = session.get_inputs()[0].name
        return lambda image: _named(session.run(None, {name: image.float().numpy()}))
    if runtime == "openvino":
        compiled = openvino_model(path)
        return lambda image: _named(list(compiled(image.float().numpy()).values()))
    raise ValueError(f"an ONNX detector runs on onnxruntime or openvino, not {runtime!r}")


def _named(outputs: list[Any]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(value) for name, value in zip(DETECTOR_OUTPUTS, outputs)}


@torch.no_grad()
def export_detector(weights: str | os.PathLike[str], path: str | os.PathLike[str], *, opset: int = 18,
                    images: int = 8, overwrite: bool = False) -> DetectorExport:
    """Export the detector in ``weights`` (a ``det-train`` file; a training-time one is converted first) to ``path``,
    checked on ``images`` validation images of the data the file records.

    Raises:
        ValueError: bad arguments, or ``path`` may not be written
            ([`check_output_path`][repvgg.serialization.check_output_path]).
        ConversionMismatch: ONNX Runtime does not detect what PyTorch does; nothing is written.
    """
    check_int(opset, "opset", low=MIN_OPSET, high=20)  # the TorchScript-based exporter writes up to 20
    check_int(images, "images", low=1, high=10_000)
    path = check_output_path(path, reads=[weights], overwrite=overwrite, suffixes=(".onnx",))
    model, meta = load_detector(weights)
    converted = not model.deploy
    if converted:
        log.info("the detector is in training-time form: converting it to the plain form before export")
        model = reparameterize_model(model)
    val = validation_data(meta, model.config.image_size, None).val
    samples = [val[i][0].float() / 255 for i in range(min(images, len(val)))]
    metadata = {"task": "detection", "detector": json.dumps(model.config.to_dict()),
                "classes": json.dumps(meta.get("classes")), "outputs": json.dumps(list(DETECTOR_OUTPUTS))}
    with staging_folder(path) as staging:
        staged = Path(staging) / path.name
        with noticing_interrupts() as interrupted, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's tracer warnings on detection code
            torch.onnx.export(model, ([samples[0]],), str(staged), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=list(DETECTOR_OUTPUTS),
                              dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                                            "scores": {0: "detections"}, "labels": {0: "detections"}})
        if interrupted:
            raise KeyboardInterrupt("interrupted during the ONNX export")
        write_onnx_metadata(staged, metadata)
        worst, count = _parity(staged, model, samples)
        for staged_file in Path(staging).iterdir():
            commit_staged(staged_file, path)
    return DetectorExport(str(path), converted, opset, len(samples), worst, count)


def _parity(path: Path, model: Any, samples: list[torch.Tensor]) -> tuple[float, int]:
    """ONNX Runtime against PyTorch on ``samples``: the largest box deviation and the detections compared, or a
    ConversionMismatch."""
    run = onnx_detector(path)
    worst, count, swaps = 0.0, 0, 0
    for index, image in enumerate(samples):
        expected = model([image])[0]
        got = run(image)
        finite = all(bool(torch.isfinite(got[k].float()).all()) for k in ("boxes", "scores"))
        same, gap = box_deviation(expected, got)
        if finite and same and gap > BOX_TOLERANCE_PX and differs_by_ties_only(expected, got):
            gap = 0.0  # two near-equal overlapping boxes, NMS keeping the other one: not a deviation of the graph
            swaps += 1
        if not (finite and same and gap <= BOX_TOLERANCE_PX):
            raise ConversionMismatch(f"ONNX Runtime does not detect what PyTorch does on validation image {index} "
                                     f"(labels agree: {same}, largest box deviation {gap:.3g} px, finite: {finite}); "
                                     "nothing was written")
        worst, count = max(worst, gap), count + len(expected["labels"])
    if swaps:
        log.info("on %d of %d validation images NMS kept the other of two near-equal overlapping boxes (scores within "
                 "%g)", swaps, len(samples), SCORE_TOLERANCE)
    return worst, count

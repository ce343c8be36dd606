"""ONNX export of a detector: the converted network, torchvision's resizing and normalisation, box decoding and
non-maximum suppression (ONNX ``NonMaxSuppression``) in one graph, which ONNX Runtime and OpenVINO run.

The graph takes one float image ``(3, H, W)`` in [0, 1] of any size and returns ``boxes`` ``(N, 4)`` (``x1, y1, x2,
y2`` in the input's pixels), ``scores`` ``(N,)`` and ``labels`` ``(N,)`` (class indices, named by the file's
``classes``). It is written only after ONNX Runtime and OpenVINO (where installed) detected what PyTorch does on
validation images: the same labels, boxes within [`BOX_TOLERANCE_PX`][repvgg.detection.metrics.BOX_TOLERANCE_PX]
(where two overlapping boxes of a class score within float rounding of each other, NMS may keep either: such a pair
counts as the same detection).
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

from repvgg.dense.scenes import SyntheticConfig, scene
from repvgg.dense.weights import trained_data_folder
from repvgg.detection.evaluate import validation_set
from repvgg.detection.metrics import BOX_TOLERANCE_PX, SCORE_TOLERANCE, box_deviation, differs_by_ties_only
from repvgg.detection.weights import detector_metadata, load_detector
from repvgg.errors import ConversionMismatch
from repvgg.io.card import load_onnx_proto, write_onnx_metadata
from repvgg.io.export import noticing_interrupts
from repvgg.io.onnx_run import installed_runtimes, onnxruntime_session, openvino_by_shape
from repvgg.limits import MIN_OPSET, brief, check_int, parse_json
from repvgg.nn.convert import reparameterize_model
from repvgg.serialization import check_output_path, commit_staged, staging_folder

__all__ = ["DETECTOR_OUTPUTS", "DetectorExport", "check_images", "export_detector", "onnx_detector",
           "onnx_detector_metadata", "runtime_parity", "write_detector_graph"]

log = logging.getLogger(__name__)

#: The exported graph's outputs, in order.
DETECTOR_OUTPUTS = ("boxes", "scores", "labels")
#: Image shapes OpenVINO compiles a detector for, each on first use; others run in the graph of any shape.
STATIC_SHAPES = 4


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
        run = openvino_by_shape(path, static_shapes=STATIC_SHAPES)
        return lambda image: _named(run(image.float().numpy()))
    raise ValueError(f"an ONNX detector runs on onnxruntime or openvino, not {runtime!r}")


def onnx_detector_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checked metadata of an ONNX file exported from a detector
    ([`detector_metadata`][repvgg.detection.weights.detector_metadata]), or ``None`` when the file is not tagged as
    one (``task`` is not ``detection``).

    Raises:
        ValueError: a field is malformed, or the graph is not a detector's (one ``(3, H, W)`` image in, ``boxes``,
            ``scores`` and ``labels`` out); the message names the file.
    """
    proto = load_onnx_proto(path)
    raw = {prop.key: prop.value for prop in proto.metadata_props}
    if raw.get("task") != "detection":
        return None
    inputs = [i for i in proto.graph.input if i.name not in {init.name for init in proto.graph.initializer}]
    outputs = [o.name for o in proto.graph.output]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 3 or outputs != list(DETECTOR_OUTPUTS):
        raise ValueError(f"{path} is tagged as a detector (task=detection) but its graph is not one exported by "
                         f"`repvgg export` (it takes {len(inputs)} input(s) and returns {brief(outputs)}, not one "
                         f"(3, height, width) image and {list(DETECTOR_OUTPUTS)})")
    fields = {name: parse_json(raw[name], f"{path}: metadata field {name!r}") for name in ("detector", "classes")
              if name in raw}
    return detector_metadata(fields | {"deploy": True}, os.fspath(path))


def _named(outputs: list[Any]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(value) for name, value in zip(DETECTOR_OUTPUTS, outputs)}


@torch.no_grad()
def export_detector(weights: str | os.PathLike[str], path: str | os.PathLike[str], *, opset: int = 18,
                    images: int = 8, overwrite: bool = False,
                    data: str | os.PathLike[str] | None = None) -> DetectorExport:
    """Export the detector in ``weights`` (a ``det-train`` file; a training-time one is converted first) to ``path``,
    checked on ``images`` validation images of ``data`` (a COCO folder; default: the data the file records, or
    generated scenes where that folder is no longer there: the check compares two forms of one detector, so any
    images do).

    Raises:
        ValueError: bad arguments, or ``path`` may not be written
            ([`check_output_path`][repvgg.serialization.check_output_path]).
        ConversionMismatch: ONNX Runtime or OpenVINO does not detect what PyTorch does; nothing is written.
    """
    check_int(opset, "opset", low=MIN_OPSET, high=20)  # the TorchScript-based exporter writes up to 20
    check_int(images, "images", low=1, high=10_000)
    model, meta = load_detector(weights)
    path = check_output_path(path, reads=[weights, trained_data_folder(meta)], overwrite=overwrite, suffixes=(".onnx",))
    converted = not model.deploy
    if converted:
        log.info("the detector is in training-time form: converting it to the plain form before export")
        model = reparameterize_model(model)
    samples = check_images(meta, model.config.image_size, None if data is None else os.fspath(data), images)
    with staging_folder(path) as staging:
        staged = Path(staging) / path.name
        write_detector_graph(model, samples[0], staged, opset=opset, classes=meta.get("classes"))
        worst, count = _parity(staged, model, samples)
        for staged_file in Path(staging).iterdir():
            commit_staged(staged_file, path)
    return DetectorExport(str(path), converted, opset, len(samples), worst, count)


def write_detector_graph(model: Any, sample: torch.Tensor, path: Path, *, opset: int = 18,
                         classes: list[str] | None = None) -> None:
    """Trace the converted ``model`` on ``sample`` (a float ``(3, H, W)`` image) into the ONNX graph at ``path``
    (any image size in, `DETECTOR_OUTPUTS` out), tagged with its configuration and ``classes``; unchecked."""
    with noticing_interrupts() as interrupted, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's tracer warnings on detection code
        torch.onnx.export(model, ([sample],), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=list(DETECTOR_OUTPUTS),
                          dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                                        "scores": {0: "detections"}, "labels": {0: "detections"}})
    if interrupted:
        raise KeyboardInterrupt("interrupted during the ONNX export")
    write_onnx_metadata(path, {"task": "detection", "detector": json.dumps(model.config.to_dict()),
                               "classes": json.dumps(classes), "outputs": json.dumps(list(DETECTOR_OUTPUTS))})


def check_images(meta: dict[str, Any], size: int, data: str | None, count: int) -> list[torch.Tensor]:
    """Up to ``count`` float images in [0, 1] to compare two forms of a detector on: validation images of ``data``
    (default: the data ``meta`` records), or generated scenes where that folder is no longer there."""
    recorded = trained_data_folder(meta)
    if data is None and recorded is not None and not os.path.isdir(recorded):
        log.info("the data folder %s the detector was trained on is not there: checking the export on generated "
                 "scenes", recorded)
        scenes = SyntheticConfig(image_size=size, num_val=count)
        return [torch.from_numpy(scene(scenes, "val", i).image).permute(2, 0, 1) for i in range(count)]
    _, val = validation_set(meta, size, data)
    return [val[i][0].float() / 255 for i in range(min(count, len(val)))]


def _parity(path: Path, model: Any, samples: list[torch.Tensor]) -> tuple[float, int]:
    """ONNX Runtime (and OpenVINO, where installed) against PyTorch on ``samples``: the largest box deviation and the
    detections compared, or a ConversionMismatch."""
    worst, count = 0.0, 0
    for runtime in installed_runtimes():
        gap, count = runtime_parity(onnx_detector(path, runtime), runtime, model, samples)
        worst = max(worst, gap)
    return worst, count


def runtime_parity(run: Callable[[torch.Tensor], dict[str, torch.Tensor]], runtime: str, model: Any,
                   samples: list[torch.Tensor]) -> tuple[float, int]:
    """``run`` (one image in, its detections out) against ``model`` (a list of images in, as torchvision's detectors
    take them) on ``samples``: the largest box deviation and the detections compared.

    Raises:
        ConversionMismatch: other labels, a box further than `BOX_TOLERANCE_PX` (but for NMS's near-ties), or a
            non-finite output, naming ``runtime`` and the image.
    """
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
            raise ConversionMismatch(f"{runtime} does not detect what PyTorch does on validation image {index} "
                                     f"(labels agree: {same}, largest box deviation {gap:.3g} px, finite: {finite}); "
                                     "nothing was written")
        worst, count = max(worst, gap), count + len(expected["labels"])
    if swaps:
        log.info("on %d of %d validation images NMS kept the other of two near-equal overlapping boxes (scores within "
                 "%g)", swaps, len(samples), SCORE_TOLERANCE)
    return worst, count

"""ONNX export of a segmenter: normalisation, the converted network and the per-pixel argmax in one graph, which ONNX
Runtime and OpenVINO run on images of any height and width.

The graph takes one float image ``(3, H, W)`` in [0, 1] and returns ``mask`` ``(H, W)``: each pixel's class index
(named by the file's ``classes``). ONNX has no adaptive pooling of a size known only at run time, so the pyramid's
average pools are written as what they compute (PyTorch's bins: rows ``floor(i H / b)`` to ``ceil((i + 1) H / b)``,
the same for columns, each bin's mean), which PyTorch's own pooling is checked against in the tests. It is written only
after ONNX Runtime and OpenVINO (where installed) gave PyTorch's mask on validation images, pixel for pixel but where
the two best classes' logits lie within [`TIE_TOLERANCE`][repvgg.segmentation.export.TIE_TOLERANCE] of each other
(float rounding may order such a pair either way).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from repvgg.errors import ConversionMismatch
from repvgg.io.card import IMAGENET_MEAN, IMAGENET_STD, load_onnx_proto, write_onnx_metadata
from repvgg.io.export import noticing_interrupts
from repvgg.io.onnx_run import installed_runtimes, onnxruntime_session, openvino_by_shape
from repvgg.limits import MIN_OPSET, check_int, parse_json
from repvgg.nn.convert import reparameterize_model
from repvgg.dense.weights import trained_data_folder
from repvgg.segmentation.weights import segmenter_metadata
from repvgg.serialization import check_output_path, commit_staged, staging_folder

__all__ = ["SEGMENTER_OUTPUTS", "TIE_TOLERANCE", "SegmenterExport", "SegmenterGraph", "export_segmenter",
           "mask_mismatch", "normalized", "onnx_segmenter", "onnx_segmenter_metadata", "unnormalized"]

log = logging.getLogger(__name__)

#: The exported graph's outputs, in order.
SEGMENTER_OUTPUTS = ("mask",)
#: Two classes whose logits at a pixel lie within this of each other tie: either may win there.
TIE_TOLERANCE = 1e-3


class AveragePoolBins(nn.Module):
    """``nn.AdaptiveAvgPool2d(bins)`` written as slices and means, so that a graph of any input size holds it: the
    same bins as PyTorch's (rows ``floor(i H / b)`` to ``ceil((i + 1) H / b)``), each one's mean."""

    def __init__(self, bins: int) -> None:
        super().__init__()
        self.bins = bins

    def forward(self, x: Tensor) -> Tensor:
        b, height, width = self.bins, x.shape[-2], x.shape[-1]
        if b == 1:
            return x.mean((2, 3), keepdim=True)
        rows = []
        for i in range(b):
            top, bottom = (i * height) // b, ((i + 1) * height + b - 1) // b
            cells = [x[:, :, top:bottom, (j * width) // b:((j + 1) * width + b - 1) // b].mean((2, 3))
                     for j in range(b)]
            rows.append(torch.stack(cells, -1))
        return torch.stack(rows, -2)


class SegmenterGraph(nn.Module):
    """What the exported graph computes: a float ``(3, H, W)`` image in [0, 1], normalised with the ImageNet
    statistics, through a copy of the converted ``model`` whose adaptive pools are `AveragePoolBins`, to the
    ``(H, W)`` mask of class indices."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        for name, module in list(self.model.named_modules()):
            if isinstance(module, nn.AdaptiveAvgPool2d):
                size: Any = module.output_size
                bins = size if isinstance(size, int) else size[0]
                if not isinstance(bins, int) or (not isinstance(size, int) and size[0] != size[1]):
                    raise ValueError(f"the segmenter pools {name} to {size}; only square bins are exported")
                parent, _, attr = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, attr, AveragePoolBins(bins))

    def forward(self, image: Tensor) -> Tensor:
        return self.model(normalized(image)[None])[0].argmax(0)


@dataclass(frozen=True)
class SegmenterExport:
    """What [`export_segmenter`][repvgg.segmentation.export.export_segmenter] wrote and how it was checked."""

    path: str
    converted: bool
    opset: int
    images_checked: int
    pixels_checked: int
    pixels_at_ties: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def normalized(image: Tensor) -> Tensor:
    """A float ``(3, H, W)`` image in [0, 1] normalised with the ImageNet statistics, as a segmenter is trained."""
    return (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def unnormalized(tensor: Tensor) -> Tensor:
    """A normalised ``(3, H, W)`` training or validation tensor back to a float image in [0, 1]: the graph's input."""
    return (tensor * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).clamp(0, 1)


def logits_of(model: nn.Module, image: Tensor) -> Tensor:
    """``model``'s ``(C, H, W)`` logits for a float ``(3, H, W)`` image in [0, 1] (normalised as in training)."""
    with torch.no_grad():
        return model(normalized(image)[None])[0]


def mask_mismatch(logits: Tensor, mask: Tensor) -> tuple[int, int]:
    """``(pixels where mask is not the argmax of logits and no tie excuses it, pixels that differ at ties)``."""
    expected = logits.argmax(0)
    differs = expected != mask.to(expected.device).long()
    if not differs.any():
        return 0, 0
    best = logits.max(0).values
    chosen = logits.gather(0, mask.long().clamp(0, logits.shape[0] - 1)[None])[0]
    tie = (best - chosen <= TIE_TOLERANCE) & (mask.long() < logits.shape[0])
    return int((differs & ~tie).sum()), int((differs & tie).sum())


@torch.no_grad()
def export_segmenter(weights: str | os.PathLike[str], path: str | os.PathLike[str], *, opset: int = 18,
                     images: int = 8, overwrite: bool = False,
                     data: str | os.PathLike[str] | None = None) -> SegmenterExport:
    """Export the segmenter in ``weights`` (a ``seg-train`` file; a training-time one is converted first) to ``path``,
    checked on ``images`` validation images of ``data`` (default: the data the file records; generated scenes for a
    generated-data run).

    Raises:
        ValueError: bad arguments, or ``path`` may not be written.
        ConversionMismatch: ONNX Runtime or OpenVINO does not give PyTorch's mask; nothing is written.
    """
    from repvgg.segmentation.weights import load_segmenter

    check_int(opset, "opset", low=MIN_OPSET, high=20)
    check_int(images, "images", low=1, high=10_000)
    model, meta = load_segmenter(weights)
    path = check_output_path(path, reads=[weights, trained_data_folder(meta)], overwrite=overwrite, suffixes=(".onnx",))
    converted = not model.deploy
    model = reparameterize_model(model) if converted else model
    samples = check_images(meta, model.config, None if data is None else os.fspath(data), images)
    with staging_folder(path) as staging:
        staged = Path(staging) / path.name
        write_segmenter_graph(model, samples[0], staged, opset=opset, meta=meta)
        pixels, ties = 0, 0
        for runtime in installed_runtimes():
            pixels, found = segmenter_parity(onnx_segmenter(staged, runtime), runtime, model, samples)
            ties = max(ties, found)
        for staged_file in Path(staging).iterdir():
            commit_staged(staged_file, path)
    return SegmenterExport(str(path), converted, opset, len(samples), pixels, ties)


def write_segmenter_graph(model: nn.Module, sample: Tensor, path: Path, *, opset: int = 18,
                          meta: dict[str, Any] | None = None) -> None:
    """Trace ``SegmenterGraph(model)`` on ``sample`` into the ONNX file ``path`` (any height and width), tagged with
    the segmenter's configuration, classes and preprocessing; unchecked."""
    meta = meta or {}
    config: Any = getattr(model, "config")
    with noticing_interrupts() as interrupted, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's tracer warnings
        torch.onnx.export(SegmenterGraph(model), (sample,), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=list(SEGMENTER_OUTPUTS),
                          dynamic_axes={"image": {1: "height", 2: "width"}, "mask": {0: "height", 1: "width"}})
    if interrupted:
        raise KeyboardInterrupt("interrupted during the ONNX export")
    val_size = (meta.get("data") or {}).get("val_size")
    write_onnx_metadata(path, {"task": "segmentation", "segmenter": json.dumps(config.to_dict()),
                               "classes": json.dumps(meta.get("classes")), "val_size": json.dumps(val_size),
                               "outputs": json.dumps(list(SEGMENTER_OUTPUTS))})


def check_images(meta: dict[str, Any], config: Any, data: str | None, count: int) -> list[Tensor]:
    """Up to ``count`` validation images (float ``(3, H, W)`` in [0, 1]) of ``data`` or the data ``meta`` records."""
    from repvgg.segmentation.evaluate import validation_data

    bundle = validation_data(meta, config, data, None)
    return [unnormalized(bundle.val[i][0]) for i in range(min(count, len(bundle.val)))]


def segmenter_parity(run: Callable[[Tensor], Tensor], runtime: str, model: nn.Module,
                     samples: list[Tensor]) -> tuple[int, int]:
    """``run`` (an image in, its mask out) against ``model`` on ``samples``: the pixels compared and those that
    differ at ties, or a ConversionMismatch naming the runtime and the image."""
    pixels, ties = 0, 0
    for index, image in enumerate(samples):
        logits, mask = logits_of(model, image), run(image)
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise ConversionMismatch(f"{runtime} gave a mask of shape {tuple(mask.shape)} for validation image {index} "
                                     f"of {tuple(image.shape[-2:])}; nothing was written")
        wrong, tied = mask_mismatch(logits, mask)
        if wrong:
            raise ConversionMismatch(f"{runtime} does not give PyTorch's mask on validation image {index}: {wrong} "
                                     f"pixels differ beyond ties (logits within {TIE_TOLERANCE}); nothing was written")
        pixels, ties = pixels + mask.numel(), ties + tied
    return pixels, ties


def onnx_segmenter(path: str | os.PathLike[str], runtime: str = "onnxruntime") -> Callable[[Tensor], Tensor]:
    """An exported segmenter as a callable: one float ``(3, H, W)`` image in [0, 1] in, its ``(H, W)`` mask out, run
    by ONNX Runtime or OpenVINO (in float32, compiled for each image shape it meets, up to a few)."""
    if runtime == "onnxruntime":
        session = onnxruntime_session(path)
        name = session.get_inputs()[0].name
        return lambda image: torch.from_numpy(session.run(None, {name: image.float().numpy()})[0])
    if runtime == "openvino":
        run = openvino_by_shape(path)
        return lambda image: torch.from_numpy(run(image.float().numpy())[0])
    raise ValueError(f"an ONNX segmenter runs on onnxruntime or openvino, not {runtime!r}")


def onnx_segmenter_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The metadata of an ONNX file exported from a segmenter (``segmenter``, ``classes``, ``data`` with its
    ``val_size``), or ``None`` when the file is not tagged as one.

    Raises:
        ValueError: a field is malformed, or the graph is not a segmenter's; the message names the file.
    """
    proto = load_onnx_proto(path)
    raw = {prop.key: prop.value for prop in proto.metadata_props}
    if raw.get("task") != "segmentation":
        return None
    outputs = [o.name for o in proto.graph.output]
    if outputs != list(SEGMENTER_OUTPUTS) or "segmenter" not in raw:
        raise ValueError(f"{path} is tagged as a segmenter (task=segmentation) but is not one exported by "
                         f"`repvgg export` (outputs {outputs}, not {list(SEGMENTER_OUTPUTS)}, or no configuration)")
    fields = {name: parse_json(raw.get(name, "null"), f"{path}: metadata field {name!r}")
              for name in ("segmenter", "classes", "val_size")}
    return segmenter_metadata({"segmenter": fields["segmenter"], "classes": fields["classes"], "deploy": True,
                               "data": {"val_size": fields["val_size"]}}, os.fspath(path))

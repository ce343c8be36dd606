"""Segmenting new images with a trained segmenter: a ``seg-train`` file (or its run folder) run by PyTorch, or an
exported ``.onnx`` segmenter run by ONNX Runtime or OpenVINO. Each image is prepared as ``seg-eval`` prepares its
validation images (resized to the ``val_size`` the file records, if any; normalised with the ImageNet statistics),
and its mask comes back at the image's own size (nearest-neighbour resize from the model's input); ``repvgg predict
--masks`` writes it as a palette PNG."""

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
from repvgg.training.images import load_rgb, rgb_tensor

__all__ = ["ImageSegmentation", "SegmentationPredictor", "mask_png", "overlay_png",
           "segmentation_artifact"]

#: ``on_image(path, image, mask)``: what a caller does with each readable image (e.g. write its mask).
ImageHook = Callable[[str, Any, Tensor], None]
#: The overlay's opacity of the class colours over the image.
OVERLAY_ALPHA = 0.5


def segmentation_artifact(artifact: str | os.PathLike[str]) -> Path | None:
    """The segmenter file ``artifact`` names (a run folder gives its ``deploy.safetensors``), or ``None`` when it is
    not a segmenter: a ``seg-train`` file or an ONNX file exported from one, told by content."""
    from repvgg.segmentation.export import onnx_segmenter_metadata

    return dense_artifact(artifact, "segmenter", onnx_segmenter_metadata)


@dataclass
class ImageSegmentation:
    """One image's segmentation: each class present with its share of the pixels (largest first), where its mask
    was written; ``error`` when the image could not be read (and was skipped)."""

    source: str
    classes: dict[str, float] = field(default_factory=dict)
    mask: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "error": self.error, "mask": self.mask,
                "classes": [{"class": name, "fraction": share} for name, share in self.classes.items()]}


class SegmentationPredictor:
    """Masks of new images from a segmenter artifact.

    Args:
        artifact: a ``seg-train`` run folder or file (``deploy.safetensors``, ``best.pt``, ``last.pt``; a
            training-time one is converted), or an exported ``.onnx`` segmenter.
        runtime: ``"auto"`` (PyTorch for a model file, ONNX Runtime for an ONNX file), ``"pytorch"`` (``"eager"``)
            for a model file, ``"onnxruntime"`` or ``"openvino"`` for an ONNX file.
        classes: names in place of the artifact's (one per class): a list, or a text file with one name a line.
        device: where PyTorch runs a model file.
    """

    def __init__(self, artifact: str | os.PathLike[str], *, runtime: str = "auto",
                 classes: Sequence[str] | str | os.PathLike[str] | None = None, device: str = "cpu") -> None:
        from repvgg.nn.convert import reparameterize_model
        from repvgg.segmentation.export import logits_of, onnx_segmenter, onnx_segmenter_metadata
        from repvgg.segmentation.pspnet import SegmenterConfig
        from repvgg.segmentation.weights import load_segmenter

        path = segmentation_artifact(artifact)
        if path is None:
            raise ValueError(f"{os.fspath(artifact)} is not a segmenter (a seg-train file, its run folder, or an ONNX "
                             "file exported from one)")
        self.artifact = str(path)
        runtime = "pytorch" if runtime == "eager" else runtime
        if identify_file(path) == "onnx":
            if runtime not in ("auto", "onnxruntime", "openvino") or device != "cpu":
                raise ValueError(f"an ONNX segmenter runs on the CPU in onnxruntime or openvino (not {runtime} on "
                                 f"{device}); predict the seg-train file for pytorch")
            meta: dict[str, Any] = onnx_segmenter_metadata(path) or {}
            self.backend = "openvino" if runtime == "openvino" else "onnxruntime"
            self._run = onnx_segmenter(path, self.backend)
        else:
            if runtime not in ("auto", "pytorch"):
                raise ValueError(f"a segmenter file runs in PyTorch (--runtime auto or eager), not {runtime}; for "
                                 "onnxruntime or openvino, predict the ONNX file `repvgg export` writes of it")
            model, meta = load_segmenter(path)
            model = (model if model.deploy else reparameterize_model(model)).to(device).eval()
            self.backend = "pytorch"
            self._run = lambda image: logits_of(model, image.to(device)).argmax(0).cpu()
        self.config = SegmenterConfig.from_dict(dict(meta["segmenter"]))
        self.val_size: int | None = (meta.get("data") or {}).get("val_size")
        self.classes = _class_names(meta, classes, self.config.num_classes, path)

    @torch.no_grad()
    def segment(self, image: Any) -> Tensor:
        """One PIL image's (or uint8 ``(3, H, W)`` tensor's) mask: class indices ``(H, W)``, uint8, at its size."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        tensor = rgb_tensor(image)
        size = list(tensor.shape[-2:])
        if self.val_size is not None:
            tensor = F.resize(tensor, [self.val_size, self.val_size], antialias=True)
        mask = self._run(tensor.float() / 255).to(torch.uint8)
        if list(mask.shape) != size:
            mask = F.resize(mask[None], size, interpolation=InterpolationMode.NEAREST)[0]
        return mask

    def fractions(self, mask: Tensor) -> dict[str, float]:
        """Each class present in ``mask`` with its share of the pixels, largest first."""
        counts = torch.bincount(mask.flatten().long(), minlength=len(self.classes))
        order = torch.argsort(counts, descending=True, stable=True).tolist()
        return {self.classes[i]: round(float(counts[i]) / mask.numel(), 6) for i in order if counts[i] > 0}

    def pngs(self, image: Any, mask: Tensor, wanted: Sequence[str]) -> dict[str, bytes]:
        """The PNGs of one image that ``wanted`` names: ``"mask"``, its label map (``--masks``); ``"draw"``, the
        image with the mask laid over it (``--draw``)."""
        return {**({"mask": mask_png(mask, len(self.classes))} if "mask" in wanted else {}),
                **({"draw": overlay_png(image, mask, len(self.classes))} if "draw" in wanted else {})}

    def iter_predict(self, paths: Sequence[str], *, bad_images: str = "fail",
                     on_image: ImageHook | None = None) -> Iterator[ImageSegmentation]:
        """Each path's segmentation in order; an unreadable image stops (``"fail"``, a ValueError naming it) or is
        reported and skipped (``"skip"``). ``on_image(path, image, mask)`` sees every readable image."""
        for path in paths:
            try:
                image = load_rgb(path)
            except ValueError as err:
                if bad_images == "fail":
                    raise
                yield ImageSegmentation(path, error=str(err))
                continue
            mask = self.segment(image)
            if on_image is not None:
                on_image(path, image, mask)
            yield ImageSegmentation(path, self.fractions(mask))


def _class_names(meta: dict[str, Any], classes: Sequence[str] | str | os.PathLike[str] | None, count: int,
                 path: Path) -> list[str]:
    """The artifact's class names, or ``classes`` in their place (checked against the segmenter's ``count``)."""
    if classes is not None:
        names = read_class_names(classes) if isinstance(classes, (str, os.PathLike)) else list(classes)
        source = f"--classes {os.fspath(classes)}" if isinstance(classes, (str, os.PathLike)) else "classes="
        return check_class_names(names, source, count, model="the segmenter")
    names = list(meta.get("classes") or [])
    if not names:
        raise ValueError(f"{path} records no class names; give them with --classes")
    return names


def mask_png(mask: Tensor, num_classes: int) -> bytes:
    """``mask`` as a palette PNG's bytes: pixel values are the class indices, the palette the run figures' colours."""
    import io

    from PIL import Image

    from repvgg.segmentation.plots import class_colours

    picture = Image.fromarray(mask.numpy().astype("uint8"), mode="P")
    palette = class_colours(max(num_classes, 1)).flatten().tolist()
    picture.putpalette(palette + [0] * (768 - len(palette)))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def overlay_png(image: Any, mask: Tensor, num_classes: int) -> bytes:
    """``image`` with each pixel's class colour laid over it (`OVERLAY_ALPHA`), as a PNG's bytes."""
    import io

    import numpy as np
    from PIL import Image

    from repvgg.segmentation.plots import colorize

    pixels = rgb_tensor(image).permute(1, 2, 0).numpy().astype(np.float32)
    blended = (1 - OVERLAY_ALPHA) * pixels + OVERLAY_ALPHA * colorize(mask, num_classes).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.rint(blended).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()

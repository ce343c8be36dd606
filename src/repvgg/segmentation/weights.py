"""Segmenter files ([`repvgg.dense.weights`][repvgg.dense.weights]'s format): safetensors with the architecture in the
metadata, and reading seg-train checkpoints.

A file written by [`save_segmenter`][repvgg.segmentation.weights.save_segmenter] rebuilds the segmenter from the file
alone: its metadata holds ``format`` (``"repvgg-segmenter"``), ``arch``, ``deploy``, the
[`SegmenterConfig`][repvgg.segmentation.pspnet.SegmenterConfig] as JSON, the class names and a description of the data
it was trained on (so ``repvgg seg-eval`` can rebuild the validation set).
[`load_segmenter`][repvgg.segmentation.weights.load_segmenter] reads those files and ``seg-train``'s ``best.pt`` /
``last.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from repvgg.dense.weights import build_dense_model, check_dense_metadata, read_dense_model, save_dense_model
from repvgg.segmentation.pspnet import PSPNet, SegmenterConfig, build_segmenter

__all__ = ["SEGMENTER_FORMAT", "load_segmenter", "save_segmenter", "segmenter_metadata"]

SEGMENTER_FORMAT = "repvgg-segmenter"


def save_segmenter(
    model: PSPNet,
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights as safetensors, atomically, with the metadata to rebuild it.

    Args:
        model: a training-time or converted [`PSPNet`][repvgg.segmentation.pspnet.PSPNet].
        classes: class names, index = class id.
        data: a JSON-serialisable description of the training data (see ``repvgg seg-eval``).
    """
    return save_dense_model(model, path, kind="segmenter", config=model.config, classes=classes, data=data)


def load_segmenter(path: str | os.PathLike[str]) -> tuple[PSPNet, dict[str, Any]]:
    """Rebuild a segmenter from a [`save_segmenter`][repvgg.segmentation.weights.save_segmenter] file or a ``seg-train``
    checkpoint.

    Returns the model (on the CPU, eval mode) and the file's metadata: ``segmenter`` (config dict),
    ``deploy``, ``classes`` and ``data`` (``None`` where unknown).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, not a segmenter file, or its weights do not fit its configuration.
    """
    state_dict, meta = read_dense_model(path, kind="segmenter", command="seg-train")
    meta = segmenter_metadata(meta, os.fspath(path))
    config = SegmenterConfig.from_dict(meta["segmenter"])
    model = build_dense_model(lambda: build_segmenter(config, deploy=meta["deploy"]), state_dict, path, "segmenter")
    return model, meta


def segmenter_metadata(fields: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The metadata of a segmenter file, each field checked by type and range (safetensors, ``seg-train``
    checkpoints, exported ONNX files): ``segmenter`` a [`SegmenterConfig`][repvgg.segmentation.pspnet.SegmenterConfig],
    ``deploy`` a bool, ``classes`` ``None`` or one distinct name per class, ``data`` ``None`` or ``{"data": FOLDER or
    None, "synthetic": generated-scene settings or None, "val_size": N or None}``
    ([`check_dense_metadata`][repvgg.dense.weights.check_dense_metadata]).

    Raises:
        ValueError: a field is missing or malformed; the message names ``source`` and the field.
    """
    return check_dense_metadata(fields, source, kind="segmenter", config=SegmenterConfig.from_dict,
                                data_keys=("data", "synthetic", "val_size"))

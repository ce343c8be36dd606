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

from repvgg.dense.weights import load_dense_state, read_dense_model, save_dense_model
from repvgg.segmentation.pspnet import PSPNet, SegmenterConfig, build_segmenter

__all__ = ["SEGMENTER_FORMAT", "save_segmenter", "load_segmenter"]

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
    config = SegmenterConfig.from_dict(dict(meta["segmenter"]))
    model = build_segmenter(config, deploy=bool(meta["deploy"]))
    load_dense_state(model, state_dict, path, "segmenter")
    return model, meta

"""Detector files ([`repvgg.dense.weights`][repvgg.dense.weights]'s format): safetensors whose metadata hold the
[`DetectorConfig`][repvgg.detection.detector.DetectorConfig], the class names and the training data, and reading
``det-train`` checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from repvgg.dense.weights import load_dense_state, read_dense_model, save_dense_model
from repvgg.detection.detector import Detector, DetectorConfig, build_detector

__all__ = ["load_detector", "save_detector"]


def save_detector(model: Detector, path: str | os.PathLike[str], *, classes: Sequence[str] | None = None,
                  data: Mapping[str, Any] | None = None) -> Path:
    """Write a detector built by [`build_detector`][repvgg.detection.detector.build_detector] (either form) as
    safetensors, atomically, with what rebuilds it."""
    return save_dense_model(model, path, kind="detector", config=model.config, classes=classes, data=data)


def load_detector(path: str | os.PathLike[str]) -> tuple[Detector, dict[str, Any]]:
    """Rebuild a detector from a [`save_detector`][repvgg.detection.weights.save_detector] file or a ``det-train``
    checkpoint: the model (CPU, eval mode) and the file's metadata (``detector``, ``deploy``, ``classes``,
    ``data``)."""
    state_dict, meta = read_dense_model(path, kind="detector", command="det-train")
    config = DetectorConfig.from_dict(dict(meta["detector"]))
    model = build_detector(config, deploy=bool(meta["deploy"]))
    load_dense_state(model, state_dict, path, "detector")
    return model, meta

"""Detector files ([`repvgg.dense.weights`][repvgg.dense.weights]'s format): safetensors whose metadata hold the
[`DetectorConfig`][repvgg.detection.detector.DetectorConfig], the class names and the training data, and reading
``det-train`` checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from repvgg.dense.backbones import RESNET_DEPTHS
from repvgg.dense.weights import build_dense_model, check_dense_metadata, read_dense_model, save_dense_model
from repvgg.detection.detector import Detector, DetectorConfig, build_detector
from repvgg.nn.registry import get_spec

__all__ = ["detector_metadata", "load_detector", "save_detector"]


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
    meta = detector_metadata(meta, os.fspath(path))
    config = DetectorConfig.from_dict(meta["detector"])
    model = build_dense_model(lambda: build_detector(config, deploy=meta["deploy"]), state_dict, path, "detector")
    return model, meta


def detector_metadata(fields: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The metadata of a detector file, each field checked by type and range: the one check every reader of detector
    files goes through (safetensors, ``det-train`` checkpoints, exported ONNX files), with their JSON fields decoded.

    ``detector`` is a [`DetectorConfig`][repvgg.detection.detector.DetectorConfig] of a known backbone, ``deploy`` a
    bool, ``classes`` ``None`` or one distinct name per class, ``data`` ``None`` or ``{"data": FOLDER or None,
    "synthetic": generated-scene settings or None}``
    ([`check_dense_metadata`][repvgg.dense.weights.check_dense_metadata]).

    Raises:
        ValueError: a field is missing or malformed; the message names ``source`` and the field.
    """
    return check_dense_metadata(fields, source, kind="detector", config=_config, data_keys=("data", "synthetic"))


def _config(raw: Mapping[str, Any]) -> DetectorConfig:
    config = DetectorConfig.from_dict(raw)
    if config.backbone not in RESNET_DEPTHS:
        get_spec(config.backbone)
    return config

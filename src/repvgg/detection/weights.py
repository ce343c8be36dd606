"""Detector files ([`repvgg.dense.weights`][repvgg.dense.weights]'s format): safetensors whose metadata hold the
[`DetectorConfig`][repvgg.detection.detector.DetectorConfig], the class names and the training data, and reading
``det-train`` checkpoints."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from repvgg.dense.backbones import RESNET_DEPTHS
from repvgg.dense.scenes import SyntheticConfig
from repvgg.dense.weights import load_dense_state, read_dense_model, save_dense_model
from repvgg.detection.detector import Detector, DetectorConfig, build_detector
from repvgg.io.card import check_class_names
from repvgg.limits import brief
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
    model = build_detector(config, deploy=meta["deploy"])
    load_dense_state(model, state_dict, path, "detector")
    return model, meta


def detector_metadata(fields: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The metadata of a detector file, each field checked by type and range: the one check every reader of detector
    files goes through (safetensors, ``det-train`` checkpoints, exported ONNX files), with their JSON fields decoded.

    ``detector`` is a [`DetectorConfig`][repvgg.detection.detector.DetectorConfig] of a known backbone, ``deploy`` a
    bool, ``classes`` ``None`` or one distinct name per class, ``data`` ``None`` or ``{"data": FOLDER or None,
    "synthetic": generated-scene settings or None}``. Returns them as plain data (the configuration as a dict).

    Raises:
        ValueError: a field is missing or malformed; the message names ``source`` and the field.
    """
    def field(name: str) -> str:
        return f"{source}: metadata field {name!r}"

    raw = fields.get("detector")
    if not isinstance(raw, Mapping):
        raise ValueError(f"{field('detector')} must be a detector configuration (a JSON object), got {brief(raw)}")
    try:
        config = DetectorConfig.from_dict(raw)
        if config.backbone not in RESNET_DEPTHS:
            get_spec(config.backbone)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{field('detector')} is not a valid detector configuration: {err}") from None
    deploy = fields.get("deploy", False)
    if not isinstance(deploy, bool):
        raise ValueError(f"{field('deploy')} must be true or false, got {brief(deploy)}")
    classes = fields.get("classes")
    if classes is not None:
        classes = check_class_names(classes, field("classes"), config.num_classes, model="the detector")
    return {"detector": config.to_dict(), "deploy": deploy, "classes": classes,
            "data": _training_data(fields.get("data"), field("data"))}


def _training_data(value: Any, name: str) -> dict[str, Any] | None:
    """The ``data`` field: where the detector was trained (a folder, or generated scenes and their settings)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not set(value) <= {"data", "synthetic"}:
        raise ValueError(f"{name} must be null or an object with 'data' and 'synthetic', got {brief(value)}")
    folder, synthetic = value.get("data"), value.get("synthetic")
    if folder is not None and (not isinstance(folder, str) or not folder or "\x00" in folder):
        raise ValueError(f"{name}: 'data' must be a folder name or null, got {brief(folder)}")
    if synthetic is not None:
        known = {f.name for f in dataclasses.fields(SyntheticConfig)}
        if not isinstance(synthetic, Mapping) or not set(synthetic) <= known:
            raise ValueError(f"{name}: 'synthetic' must be an object of generated-scene settings ({sorted(known)}), "
                             f"got {brief(synthetic)}")
        settings = dict(synthetic)
        if isinstance(settings.get("size_range"), list):
            settings["size_range"] = tuple(settings["size_range"])
        try:
            settings = dataclasses.asdict(SyntheticConfig(**settings))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: 'synthetic' is not a valid setting of the generated scenes: {err}") from None
        synthetic = settings | {"size_range": list(settings["size_range"])}
    return {"data": folder, "synthetic": synthetic}

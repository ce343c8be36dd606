"""Segmenter files: safetensors with the architecture in the metadata, and reading seg-train checkpoints.

A file written by [`save_segmenter`][repvgg.segmentation.weights.save_segmenter] rebuilds the segmenter from the file
alone: its metadata holds ``format`` (``"repvgg-segmenter"``), ``arch``, ``deploy``, the
[`SegmenterConfig`][repvgg.segmentation.pspnet.SegmenterConfig] as JSON, the class names and a description of the data
it was trained on (so ``repvgg seg-eval`` can rebuild the validation set).
[`load_segmenter`][repvgg.segmentation.weights.load_segmenter] reads those files and ``seg-train``'s ``best.pt`` /
``last.pt``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from repvgg.io.formats import require_kind
from repvgg.io.safe_load import safe_load
from repvgg.limits import parse_json
from repvgg.io.weights import read_safetensors, write_safetensors
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
    metadata = {
        "format": SEGMENTER_FORMAT,
        "arch": model.name,
        "deploy": "true" if model.deploy else "false",
        "segmenter": json.dumps(model.config.to_dict()),
        "classes": json.dumps(list(classes) if classes is not None else None),
        "data": json.dumps(dict(data) if data is not None else None),
    }
    return write_safetensors(model.state_dict(), path, metadata)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    not_ours = (f"{path} is not a segmenter file written by `repvgg seg-train` (no segmenter configuration "
                "inside); pass its deploy.safetensors, best.pt or last.pt")
    if require_kind(path, ("safetensors", "torch"), "a segmenter file") == "safetensors":
        state_dict, raw = read_safetensors(path)
        if raw.get("format") != SEGMENTER_FORMAT or "segmenter" not in raw:
            raise ValueError(not_ours)
        meta = {
            "segmenter": parse_json(raw["segmenter"], f"{path}: metadata field 'segmenter'"),
            "deploy": raw.get("deploy") == "true",
            "classes": parse_json(raw.get("classes", "null"), f"{path}: metadata field 'classes'"),
            "data": parse_json(raw.get("data", "null"), f"{path}: metadata field 'data'"),
        }
        return state_dict, meta
    payload = safe_load(path, what="a seg-train checkpoint")
    if not isinstance(payload, dict) or "segmenter" not in payload or "model" not in payload:
        raise ValueError(not_ours)
    meta = {"segmenter": payload["segmenter"], "deploy": False, "classes": payload.get("classes"),
            "data": payload.get("data")}
    return payload["model"], meta


def load_segmenter(path: str | os.PathLike[str]) -> tuple[PSPNet, dict[str, Any]]:
    """Rebuild a segmenter from a [`save_segmenter`][repvgg.segmentation.weights.save_segmenter] file or a ``seg-train``
    checkpoint.

    Returns the model (on the CPU, eval mode) and the file's metadata: ``segmenter`` (config dict),
    ``deploy``, ``classes`` and ``data`` (``None`` where unknown).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, not a segmenter file, or its weights do not fit its configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmenter weights not found: {path}")
    state_dict, meta = _read(path)
    config = SegmenterConfig.from_dict(dict(meta["segmenter"]))
    model = build_segmenter(config, deploy=bool(meta["deploy"]))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(f"the weights in {path} do not fit the segmenter configuration stored with them "
                         f"(edited or mixed files?): {err}") from err
    return model.eval(), meta

"""Files of dense-task models (segmenters, detectors): safetensors whose metadata rebuild the model from the file alone,
and reading the training checkpoints of ``seg-train`` and ``det-train``.

The metadata hold ``format`` (``"repvgg-<kind>"``), ``arch``, ``deploy``, the model's configuration as JSON under the
kind's name (``segmenter``, ``detector``), the class names and a description of the data it was trained on, so that
``repvgg seg-eval`` / ``det-eval`` can rebuild the validation set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from repvgg.io.formats import require_kind
from repvgg.io.safe_load import safe_load
from repvgg.io.weights import declared_task, read_safetensors, safetensors_metadata, write_safetensors
from repvgg.limits import parse_json
from repvgg.nn.convert import is_converted

__all__ = ["DENSE_KINDS", "dense_artifact", "dense_kind", "load_dense_state", "read_dense_model", "save_dense_model"]

#: The dense models' files, by the kind their metadata name.
DENSE_KINDS = ("segmenter", "detector")


def dense_kind(path: str | os.PathLike[str]) -> str | None:
    """``"segmenter"`` or ``"detector"`` for a file of a dense model (its safetensors metadata, or the configuration
    a ``seg-train`` / ``det-train`` checkpoint holds), else ``None``; only the header of a safetensors file is read."""
    path = Path(path)
    if not path.is_file():
        return None
    kind = require_kind(path, ("safetensors", "torch", "onnx", "image"), "a model file")
    if kind == "safetensors":
        return declared_task(safetensors_metadata(path))
    if kind == "torch":
        return declared_task(safe_load(path, what="a checkpoint"))
    return None


def dense_artifact(artifact: str | os.PathLike[str], kind: str,
                   onnx_metadata: Callable[[Path], Any]) -> Path | None:
    """The ``kind`` file ``artifact`` names (a run folder gives its ``deploy.safetensors``), or ``None`` when it is not
    one: a file of that kind, or an ONNX file ``onnx_metadata`` (the kind's checked metadata, ``None`` for another
    task's file) takes as exported from one; told by content."""
    path = Path(artifact)
    if path.is_dir():
        path = path / "deploy.safetensors"
    if not path.is_file():
        return None
    if require_kind(path, ("safetensors", "torch", "onnx", "image"), "a model file") == "onnx":
        return path if onnx_metadata(path) is not None else None
    return path if dense_kind(path) == kind else None


def save_dense_model(model: nn.Module, path: str | os.PathLike[str], *, kind: str, config: Any,
                     classes: Sequence[str] | None = None, data: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights as safetensors, atomically, with what rebuilds it: its ``name``, whether it is
    converted, ``config.to_dict()`` under ``kind``, the class names and ``data``."""
    metadata = {
        "format": f"repvgg-{kind}",
        "arch": str(model.name),
        "deploy": "true" if is_converted(model) else "false",
        kind: json.dumps(config.to_dict()),
        "classes": json.dumps(list(classes) if classes is not None else None),
        "data": json.dumps(dict(data) if data is not None else None),
    }
    return write_safetensors(model.state_dict(), path, metadata)


def read_dense_model(path: str | os.PathLike[str], *, kind: str,
                     command: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and metadata of a [`save_dense_model`][repvgg.dense.weights.save_dense_model] file or of a
    ``command`` checkpoint (``best.pt``, ``last.pt``): ``meta`` holds ``kind`` (the configuration dict), ``deploy``,
    ``classes`` and ``data`` (``None`` where unknown).

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is unreadable or not a ``kind`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} weights not found: {path}")
    not_ours = (f"{path} is not a {kind} file written by `repvgg {command}` (no {kind} configuration inside); pass "
                "its deploy.safetensors, best.pt or last.pt")
    if require_kind(path, ("safetensors", "torch"), f"a {kind} file") == "safetensors":
        state_dict, raw = read_safetensors(path)
        if raw.get("format") != f"repvgg-{kind}" or kind not in raw:
            raise ValueError(not_ours)
        meta = {kind: parse_json(raw[kind], f"{path}: metadata field {kind!r}"), "deploy": raw.get("deploy") == "true",
                "classes": parse_json(raw.get("classes", "null"), f"{path}: metadata field 'classes'"),
                "data": parse_json(raw.get("data", "null"), f"{path}: metadata field 'data'")}
        return state_dict, meta
    payload = safe_load(path, what=f"a {command} checkpoint")
    if not isinstance(payload, dict) or kind not in payload or "model" not in payload:
        raise ValueError(not_ours)
    return payload["model"], {kind: payload[kind], "deploy": False, "classes": payload.get("classes"),
                              "data": payload.get("data")}


def load_dense_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                     kind: str) -> nn.Module:
    """Load ``state_dict`` into ``model`` built from the file's own configuration; eval mode."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(f"the weights in {path} do not fit the {kind} configuration stored with them (edited or "
                         f"mixed files?): {str(err).splitlines()[0]}") from err
    return model.eval()

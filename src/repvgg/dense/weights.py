"""Files of dense-task models (segmenters, detectors): safetensors whose metadata rebuild the model from the file alone,
and reading the training checkpoints of ``seg-train`` and ``det-train``.

The metadata hold ``format`` (``"repvgg-<kind>"``), ``arch``, ``deploy``, the model's configuration as JSON under the
kind's name (``segmenter``, ``detector``), the class names and a description of the data it was trained on, so that
``repvgg seg-eval`` / ``det-eval`` can rebuild the validation set.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
from torch import nn

from repvgg.dense.scenes import SyntheticConfig
from repvgg.io.card import check_class_names
from repvgg.io.formats import require_kind
from repvgg.io.hub import HUB_PREFIX
from repvgg.io.safe_load import safe_load
from repvgg.io.weights import (declared_task, read_safetensors, run_weights, safetensors_metadata, state_dict_problems,
                               weights_file, write_safetensors)
from repvgg.limits import brief, parse_json
from repvgg.nn.convert import is_converted

__all__ = ["DENSE_KINDS", "build_dense_model", "check_dense_metadata", "dense_artifact", "dense_kind",
           "read_dense_model", "save_dense_model", "trained_data_folder"]

M = TypeVar("M", bound=nn.Module)

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
    task's file) takes as exported from one; told by content (an ``hf-hub:`` reference by the file it names)."""
    if isinstance(artifact, str) and artifact.startswith(HUB_PREFIX):
        from repvgg.io.hub import hub_file

        artifact = hub_file(artifact)
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
    path = weights_file(path, f"{kind} weights")
    not_ours = (f"{path} is not a {kind} file written by `repvgg {command}` (no {kind} configuration inside); pass "
                "its deploy.safetensors, best.pt or last.pt")
    if require_kind(path, ("safetensors", "torch"), f"a {kind} file") == "safetensors":
        state_dict, raw = read_safetensors(path)
        if raw.get("format") != f"repvgg-{kind}" or kind not in raw:
            raise ValueError(not_ours)
        if raw.get("deploy", "false") not in ("true", "false"):
            raise ValueError(f"{path}: metadata field 'deploy' must be 'true' or 'false', got {brief(raw['deploy'])}")
        meta = {kind: parse_json(raw[kind], f"{path}: metadata field {kind!r}"), "deploy": raw.get("deploy") == "true",
                "classes": parse_json(raw.get("classes", "null"), f"{path}: metadata field 'classes'"),
                "data": parse_json(raw.get("data", "null"), f"{path}: metadata field 'data'")}
        return state_dict, meta
    payload = safe_load(path, what=f"a {command} checkpoint")
    if not isinstance(payload, dict) or kind not in payload or "model" not in payload:
        raise ValueError(not_ours)
    return run_weights(payload, str(path)), {kind: payload[kind], "deploy": False, "classes": payload.get("classes"),
                              "data": payload.get("data")}


def check_dense_metadata(fields: Mapping[str, Any], source: str, *, kind: str, config: Callable[[Mapping], Any],
                         data_keys: Sequence[str]) -> dict[str, Any]:
    """The metadata of a ``kind`` file, each field checked by type and range: the one check every reader of the
    kind's files goes through (safetensors, training checkpoints, exported ONNX files).

    ``fields[kind]`` is the model's configuration, a JSON object that ``config`` turns into the configuration (raising
    TypeError or ValueError when it cannot); ``deploy`` a bool; ``classes`` ``None`` or one distinct name per class;
    ``data`` ``None`` or an object of ``data_keys``: ``data`` (a folder or ``None``), ``synthetic`` (generated-scene
    settings or ``None``), ``val_size`` (a count or ``None``). Returns them as plain data (the configuration as a
    dict).

    Raises:
        ValueError: a field is missing or malformed; the message names ``source`` and the field.
    """
    def field(name: str) -> str:
        return f"{source}: metadata field {name!r}"

    raw = fields.get(kind)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{field(kind)} must be a {kind} configuration (a JSON object), got {brief(raw)}")
    try:
        checked = config(raw)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{field(kind)} is not a valid {kind} configuration: {err}") from None
    deploy = fields.get("deploy", False)
    if not isinstance(deploy, bool):
        raise ValueError(f"{field('deploy')} must be true or false, got {brief(deploy)}")
    classes = fields.get("classes")
    if classes is not None:
        classes = check_class_names(classes, field("classes"), checked.num_classes, model=f"the {kind}")
    return {kind: checked.to_dict(), "deploy": deploy, "classes": classes,
            "data": _training_data(fields.get("data"), field("data"), data_keys)}


def trained_data_folder(meta: Mapping[str, Any]) -> str | None:
    """The data folder a dense model's checked metadata record it was trained on (``None``: generated scenes).
    Outputs never go inside it: a file written there would be taken for data by the next reader."""
    return (meta.get("data") or {}).get("data")


def _training_data(value: Any, name: str, keys: Sequence[str]) -> dict[str, Any] | None:
    """The ``data`` field: where the model was trained (a folder, or generated scenes and their settings)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not set(value) <= set(keys):
        raise ValueError(f"{name} must be null or an object of {', '.join(map(repr, keys))}, got {brief(value)}")
    folder, synthetic, size = value.get("data"), value.get("synthetic"), value.get("val_size")
    if folder is not None and (not isinstance(folder, str) or not folder or "\x00" in folder):
        raise ValueError(f"{name}: 'data' must be a folder name or null, got {brief(folder)}")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ValueError(f"{name}: 'val_size' must be a positive count or null, got {brief(size)}")
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
    values = {"data": folder, "synthetic": synthetic, "val_size": size}
    return {key: values[key] for key in keys}


def build_dense_model(build: Callable[[], M], state_dict: Any, path: str | os.PathLike[str], kind: str) -> M:
    """The model ``build`` makes from a file's configuration, holding the file's ``state_dict``; eval mode. The
    configuration is first built on the meta device and checked against the file's tensors, names and shapes: a
    small file whose metadata declare a huge network is refused before anything is allocated.

    Raises:
        ValueError: the weights do not fit the configuration stored with them.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state_dict.items()):
        raise ValueError(f"{path}: the {kind}'s weights are not a mapping of names to tensors (an edited or foreign "
                         "file?)")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    problems = state_dict_problems(expected, state_dict)
    if problems:
        raise ValueError(f"the weights in {path} do not fit the {kind} configuration stored with them (edited or "
                         f"mixed files?): {'; '.join(problems)}")
    model = build()
    model.load_state_dict(state_dict)
    return model.eval()

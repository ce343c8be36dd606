"""Weights file formats: reading, checking, loading into a model and saving (official, timm and own formats).

The model's own state-dict keys are those of the official RepVGG release (``stage0.rbr_dense.conv.weight``,
``stage1.0.rbr_1x1.bn.running_mean``, ``stage1.0.rbr_reparam.weight``, ``linear.weight``, ...), so official
``RepVGG-*-train.pth`` / ``-deploy.pth`` files load unchanged; timm's, mmpretrain's and RepVGGplus's key names are
translated on reading (``repvgg.io.key_names``).

Files are never unpickled with code execution: [`safe_load`][repvgg.io.safe_load.safe_load] or safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import copy
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from torch import Tensor, nn

from repvgg.io.formats import require_kind
from repvgg.io.key_names import (is_mmpretrain_format, is_repvggplus_format, is_timm_format, mmpretrain_to_official,
                                 official_to_timm, repvggplus_to_official, timm_to_official)
from repvgg.limits import brief, parse_json
from repvgg.io.safe_load import safe_load
from repvgg.nn.block import RepVGGBlock
from repvgg.nn.model import RepVGG
from repvgg.nn.registry import spec_overrides
from repvgg.serialization import atomic_write

__all__ = ["TASK_FILES", "declared_task", "read_checkpoint", "run_weights", "weights_file", "read_safetensors",
           "safetensors_metadata", "write_safetensors", "checkpoint_num_classes", "expand_fused_state_dict",
           "is_deploy_state_dict", "check_state_dict", "state_dict_problems", "load_state_dict_into", "load_weights",
           "save_weights", "stem_in_chans", "HEAD_PREFIX", "timm_to_official", "official_to_timm",
           "mmpretrain_to_official", "repvggplus_to_official", "is_head_key"]

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
HEAD_PREFIX = "linear."
_AUX_CLASSIFIER = re.compile(r"^stage\w*_aux\.3\.")
#: Any key of RepVGGplus's training-only auxiliary heads.
_AUX_HEAD = re.compile(r"^stage\w*_aux\.")


def is_head_key(key: str) -> bool:
    """A key whose shape follows the number of classes: the classifier's, or an auxiliary head's linear layer."""
    return key.startswith(HEAD_PREFIX) or bool(_AUX_CLASSIFIER.match(key))

def _unwrap(obj: Any, source: str) -> tuple[StateDict, dict[str, Any]]:
    """Find the tensor mapping inside a checkpoint dict; everything else is metadata. A checkpoint of this package's
    run with an EMA gives its EMA weights: the ones the run evaluated, chose ``best.pt`` by and deployed."""
    metadata: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "task" in obj:
        obj = {**obj, "model": run_weights(obj, source)}
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            if not all(isinstance(k, str) for k in obj):
                raise ValueError(f"{source} holds tensors under keys that are not parameter names, e.g. "
                                 f"{brief(next(k for k in obj if not isinstance(k, str)))}; it is not a state dict")
            return dict(obj), metadata
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        metadata.update({k: v for k, v in obj.items() if k != inner and not isinstance(v, (Tensor, Mapping))})
        for key in ("arch", "spec", "spec_overrides", "deploy", "num_classes", "in_chans", "classes",
                    "preprocessing"):
            if key in obj and key not in metadata:  # whatever their type: a wrong one is refused by field
                metadata[key] = obj[key]
        obj = obj[inner]
    raise ValueError(
        f"{source} does not hold a state dict: expected a mapping of parameter names to tensors, "
        f"optionally wrapped under one of {list(_WRAPPER_KEYS)}."
    )


def run_weights(checkpoint: Mapping[str, Any], source: str) -> Any:
    """The weights a checkpoint of this package's run (``best.pt``, ``last.pt``) stands for: its EMA's where the run
    kept one (the weights it evaluated, chose ``best.pt`` by and deployed), else its model's. A resume reads both,
    through [`load_checkpoint`][repvgg.io.checkpoint.load_checkpoint]."""
    ema = checkpoint.get("ema")
    if isinstance(ema, Mapping) and ema:
        logger.info("%s: the EMA weights (as its run evaluated and deployed them)", source)
        return ema
    return checkpoint.get("model")


def weights_file(path: str | os.PathLike[str], what: str = "weights") -> Path:
    """``path``, a ``what`` file to read (a folder is refused, naming a run folder's files).

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name a {what} file (of a run folder: {path / 'deploy.safetensors'} "
                         f"or {path / 'best.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return path


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[StateDict, dict[str, Any]]:
    """Read a weights file into an official-format state dict and its metadata.

    Accepts safetensors and torch files, told apart by their content
    ([`require_kind`][repvgg.io.formats.require_kind]; torch files are read with ``weights_only=True``); unwraps
    ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints (a run's with an EMA: its EMA weights, which the run
    evaluated and deployed), strips a DDP ``module.`` prefix and translates timm and mmpretrain key names.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is truncated, of another kind (an ONNX model, an image), or holds no state dict.
    """
    path = weights_file(path)
    metadata: dict[str, Any] = {}
    if require_kind(path, ("safetensors", "torch"), "a weights file") == "safetensors":
        state_dict, raw_meta = read_safetensors(path)
        _refuse_other_task(path, declared_task(raw_meta))
        metadata = _decode_metadata(raw_meta, path)
    else:
        payload = safe_load(path)
        _refuse_other_task(path, declared_task(payload))
        state_dict, metadata = _unwrap(payload, str(path))
    if any(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if is_timm_format(list(state_dict)):
        state_dict = timm_to_official(state_dict)
    elif is_mmpretrain_format(list(state_dict)):
        state_dict = mmpretrain_to_official(state_dict)
    elif is_repvggplus_format(list(state_dict)):
        state_dict = repvggplus_to_official(state_dict)
    return state_dict, metadata


#: The files of the other tasks' models: what their metadata declare, the command that writes them and those that
#: take them.
TASK_FILES = {"detector": ("det-train", "det-eval, predict, export, quantize or serve"),
              "segmenter": ("seg-train", "seg-eval, predict, export, quantize or serve")}


def declared_task(metadata: Any) -> str | None:
    """The task a file's metadata (a safetensors header's, or a PyTorch file's top level) declare: ``"detector"`` or
    ``"segmenter"`` (see ``TASK_FILES``), ``None`` for a classifier's or an unknown
    file: the one rule that tells a file's task."""
    if not isinstance(metadata, Mapping):
        return None
    declared = metadata.get("format")
    return next((task for task in TASK_FILES if declared == f"repvgg-{task}" or task in metadata), None)


def _refuse_other_task(path: Path, task: str | None) -> None:
    if task is not None:
        writer, users = TASK_FILES[task]
        raise ValueError(f"{path} is a {task} file (written by `repvgg {writer}`), not a classifier's weights; use it "
                         f"with `repvgg {users}`")


def read_safetensors(path: str | os.PathLike[str]) -> tuple[StateDict, dict[str, str]]:
    """Tensors (on the CPU) and the string metadata of a safetensors file.

    Raises:
        ValueError: the file is truncated or not safetensors.
    """
    from safetensors.torch import load_file

    with _safetensors_errors(path):
        return load_file(str(path), device="cpu"), safetensors_metadata(path)


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors file, from its header alone (the tensors are not read).

    Raises:
        ValueError: the file is truncated or not safetensors.
    """
    from safetensors import safe_open

    with _safetensors_errors(path), safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


@contextlib.contextmanager
def _safetensors_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """The one way a safetensors reader fails: a ValueError naming the file."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"could not read {path} as safetensors (truncated or corrupt?): {err}") from err


def _decode_metadata(raw: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The typed metadata of one of this package's safetensors files; a malformed field is an error naming the
    file and the field."""
    out: dict[str, Any] = dict(raw)

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{path}: metadata field {key!r} must be {expected}, got {raw[key][:80]!r}")

    objects = (("spec", "a JSON object"), ("spec_overrides", "a JSON object"), ("out_indices", "a JSON list"))
    for key, expected in objects:
        if key in out:
            out[key] = parse_json(raw[key], f"{path}: metadata field {key!r}")
            if not isinstance(out[key], list if key == "out_indices" else dict):
                raise bad(key, expected)
    for key in ("deploy", "features_only"):
        if key in out:
            if raw[key] not in ("true", "false"):
                raise bad(key, "'true' or 'false'")
            out[key] = raw[key] == "true"
    for key in ("num_classes", "in_chans"):
        if key in out:
            if not re.fullmatch("[0-9]{1,9}", raw[key]):  # str.isdigit() takes '³', which int() refuses
                raise bad(key, "a non-negative integer")
            out[key] = int(raw[key])
    return out


def checkpoint_num_classes(state_dict: Mapping[str, Tensor]) -> int | None:
    """Classifier outputs stored in a state dict (``None`` when it has no head)."""
    weight = state_dict.get(HEAD_PREFIX + "weight")
    return None if weight is None else int(weight.shape[0])


def is_deploy_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """True when the state dict holds fused (``rbr_reparam``) blocks only."""
    keys = list(state_dict)
    return any(".rbr_reparam." in k for k in keys) and not any(".rbr_dense." in k for k in keys)


def _deploy_mismatch(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> str | None:
    model_keys = model.state_dict().keys()
    file_fused = any(".rbr_reparam." in k for k in state_dict)
    file_branches = any(".rbr_dense." in k for k in state_dict)
    model_fused = any(".rbr_reparam." in k for k in model_keys)
    model_branches = any(".rbr_dense." in k for k in model_keys)
    if file_branches and not file_fused and model_fused and not model_branches:
        return (
            f"{source} holds training-time (multi-branch) weights but the model is fused (deploy=True). "
            "Load them into a training-time model (deploy=False) and call repvgg.reparameterize_model, "
            "or convert the file with `repvgg convert`."
        )
    return None


def _is_expansion(model: nn.Module, state_dict: Mapping[str, Tensor]) -> bool:
    """A fused (deploy) file offered to a training-time model."""
    model_keys = model.state_dict().keys()
    return is_deploy_state_dict(state_dict) and any(".rbr_dense." in k for k in model_keys)


def expand_fused_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> StateDict:
    """The training-time state dict of ``model`` that computes what the fused ``state_dict`` does: each block's fused
    kernel and bias set into its branches ([`RepVGGBlock.load_fused`][repvgg.nn.block.RepVGGBlock.load_fused]), the
    other tensors (SE, the head) as they are. ``model`` is left unchanged; on the meta device only shapes are checked.

    Raises:
        ValueError: a block's fused kernel or bias is missing from the file, or shaped for another block.
    """
    twin = copy.deepcopy(model)
    for name, block in twin.named_modules():
        if not isinstance(block, RepVGGBlock) or block.deploy:
            continue
        kernel, bias = state_dict.get(f"{name}.rbr_reparam.weight"), state_dict.get(f"{name}.rbr_reparam.bias")
        shape = (block.out_channels, block.in_channels // block.groups, 3, 3)
        if kernel is None or bias is None or tuple(kernel.shape) != shape or tuple(bias.shape) != shape[:1]:
            found = None if kernel is None else tuple(kernel.shape)
            raise ValueError(f"{source} does not match the architecture of {getattr(model, 'name', 'the model')}: "
                             f"block {name} needs a fused kernel of shape {shape} and a bias, the file has {found}. "
                             "Check that the model name (and groups/SE options) match the file.")
        device = next(block.parameters()).device  # the meta device when only shapes are checked
        block.load_fused(kernel.to(device), bias.to(device))
    expanded = dict(twin.state_dict())
    expanded.update({k: v for k, v in state_dict.items() if ".rbr_reparam." not in k})
    return expanded


def check_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str = "state dict",
    skip_head: bool = False,
) -> StateDict:
    """Check a state dict against ``model`` completely (names and shapes) and return what would be loaded.

    Only shapes are compared, so ``model`` may live on the ``meta`` device: a file can be checked
    before any memory is allocated for the model it describes.

    Raises:
        ValueError: training-time weights for a fused model, wrong number of classes, missing or unexpected
            keys, or shape mismatches; the message says what to do.

    Fused (deploy) weights for a training-time model are expanded into its branches
    ([`expand_fused_state_dict`][repvgg.io.weights.expand_fused_state_dict]).
    """
    mismatch = _deploy_mismatch(model, state_dict, source)
    if mismatch:
        raise ValueError(mismatch)
    if _is_expansion(model, state_dict):
        state_dict = expand_fused_state_dict(model, state_dict, source)
        logger.info("%s holds converted weights: expanded into training-time blocks that compute the same "
                    "function (the 3x3 branches hold the fused kernels, the 1x1 and identity branches start at zero)",
                    source)
    target = model.state_dict()
    has_head = any(k.startswith(HEAD_PREFIX) for k in target)
    has_aux = any(_AUX_HEAD.match(k) for k in target)  # a backbone, a headless or a fused model has none
    incoming = {k: v for k, v in state_dict.items()
                if not (is_head_key(k) and (skip_head or not has_head or k not in target))
                and not (_AUX_HEAD.match(k) and not has_aux)}
    if skip_head:
        target_check = {k: v for k, v in target.items() if not is_head_key(k)}
    else:
        target_check = target

    file_classes = checkpoint_num_classes(incoming)
    model_classes = checkpoint_num_classes(target_check)
    if file_classes is not None and model_classes is not None and file_classes != model_classes:
        raise ValueError(
            f"{source} has a {file_classes}-class head but the model has {model_classes} classes. "
            f"Build the model with num_classes={file_classes}, or keep a fresh head for fine-tuning: "
            f"repvgg.load_weights(model, path, skip_head=True)."
        )
    problems = state_dict_problems({k: tuple(v.shape) for k, v in target_check.items()}, incoming,
                                   optional=("num_batches_tracked",))
    if problems:
        name = getattr(model, "name", type(model).__name__)
        raise ValueError(
            f"{source} does not match the architecture of {name}: {'; '.join(problems)}. "
            "Check that the model name (and groups/SE options) match the file."
        )
    return incoming


def state_dict_problems(expected: Mapping[str, tuple[int, ...]], incoming: Mapping[str, Tensor], *,
                        optional: tuple[str, ...] = ()) -> list[str]:
    """How ``incoming`` differs from the tensor shapes a model ``expected`` (names ending in ``optional`` may be
    missing): its missing and unexpected keys and its shape mismatches, a few of each named; empty where it fits."""
    missing = [k for k in expected if k not in incoming and not k.endswith(optional)]
    unexpected = [k for k in incoming if k not in expected]
    wrong_shape = [f"{k}: file {tuple(incoming[k].shape)} vs model {shape}" for k, shape in expected.items()
                   if k in incoming and tuple(incoming[k].shape) != tuple(shape)]
    return [f"{len(found)} {what}, e.g. {found[:3]}" for found, what in
            ((missing, "missing key(s)"), (unexpected, "unexpected key(s)"), (wrong_shape, "shape mismatch(es)"))
            if found]


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str = "state dict",
    skip_head: bool = False,
) -> None:
    """Check a state dict against ``model`` completely (`check_state_dict`), then load it; on any
    mismatch nothing changes.

    ``skip_head`` keeps the model's own classifier (fine-tuning on a new number of classes). A model
    built with ``features_only`` ignores the file's head. A missing ``num_batches_tracked`` is allowed.
    """
    model.load_state_dict(check_state_dict(model, state_dict, source=source, skip_head=skip_head), strict=False)


def load_weights(model: nn.Module, path: str | os.PathLike[str], *, skip_head: bool = False) -> dict[str, Any]:
    """Load a weights file (any supported format) into ``model``; returns the file's metadata."""
    state_dict, metadata = read_checkpoint(path)
    load_state_dict_into(getattr(model, "_orig_mod", model), state_dict, source=str(path), skip_head=skip_head)
    return metadata


def save_weights(model: RepVGG, path: str | os.PathLike[str], *, extra: Mapping[str, str] | None = None) -> Path:
    """Write the model's weights as safetensors with metadata to rebuild it from the file alone.

    Metadata: ``format``, ``arch`` (registry name), ``deploy`` (``"true"``/``"false"``), ``spec`` (JSON) and
    ``spec_overrides`` (JSON: where it differs from ``arch``'s registered spec), ``num_classes``, ``in_chans``,
    ``global_pool``, for a backbone ``features_only`` and ``out_indices``; the class names and preprocessing of a
    model loaded from a file that declared them (its ``card``); plus ``extra``. A ``torch.compile``d model is saved
    as the model it compiles. The file is written atomically (temp file + rename).
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: its keys would carry "_orig_mod."
    spec = model.spec
    if not model.deploy and model.num_classes and not model.features_only and \
            list(model.aux_positions) != list(spec.aux_heads):  # RepVGGplus whose training-only heads were dropped
        spec = dataclasses.replace(spec, aux_heads=tuple(model.aux_positions))
    card: Any = getattr(model, "card", None)  # a repvgg.io.card.ModelCard (which imports this module)
    declared = card.metadata() if hasattr(card, "metadata") and len(card.classes) == model.num_classes else {}
    metadata = {
        "format": "repvgg",
        "arch": model.name,
        "deploy": "true" if model.deploy else "false",
        "spec": json.dumps(spec.to_dict()),
        "spec_overrides": json.dumps(spec_overrides(model.name, spec)),
        "num_classes": str(model.num_classes),
        "in_chans": str(model.in_chans),
        "global_pool": str(model.global_pool),
        **({"features_only": "true", "out_indices": json.dumps(list(model.out_indices))}
           if model.features_only else {}),
        **declared,
        **(dict(extra) if extra else {}),
    }
    return write_safetensors(model.state_dict(), path, metadata)


def write_safetensors(state_dict: Mapping[str, Tensor], path: str | os.PathLike[str],
                      metadata: Mapping[str, str]) -> Path:
    """Write ``state_dict`` (moved to the CPU, contiguous) with string ``metadata`` as safetensors, atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_write(path, errors=(OSError, SafetensorError)) as tmp:  # a short write: WriteFailed
        save_file(tensors, str(tmp), metadata=dict(metadata))
    return Path(path)


def stem_in_chans(state_dict: Mapping[str, Tensor]) -> int:
    for key in ("stage0.rbr_dense.conv.weight", "stage0.rbr_reparam.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[1])
    return 3

"""Models from files: ``create_model`` with weights, ``load_model`` from a file alone, checkpoint conversion.

This sits above both the registry (`repvgg.nn.registry`, which builds networks from names) and the
file formats (`repvgg.io.weights`, which know nothing of the registry), so imports point one way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from repvgg.limits import check_batch_memory, check_img_size, check_int
from repvgg.serialization import check_output_path
from repvgg.io.card import ModelCard, Preprocessing, resolve_card
from repvgg.io.weights import (check_state_dict, is_head_key, checkpoint_num_classes, is_deploy_state_dict,
                               load_state_dict_into, read_checkpoint, save_weights, stem_in_chans)
from repvgg.nn.convert import OutputDeviation, check_conversion, reparameterize_model
from repvgg.nn.model import RepVGG
from repvgg.nn.spec import RepVGGSpec
from repvgg.io.hub import HUB_PREFIX, hub_file, pretrained_file
from repvgg.nn.registry import build_model, canonical_name, check_arch, list_models

__all__ = ["create_model", "load_model", "infer_architecture", "convert_checkpoint", "model_card", "resolve_weights"]

logger = logging.getLogger(__name__)


def create_model(
    name: str | RepVGGSpec,
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_chans: int = 3,
    deploy: bool = False,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3, 4),
    global_pool: str = "avg",
    **overrides: Any,
) -> RepVGG:
    """Build a RepVGG by name (or from a spec), optionally loading weights.

    Args:
        name: a registered name (see [`repvgg.list_models`][repvgg.nn.registry.list_models]) or a
            [`RepVGGSpec`][repvgg.nn.spec.RepVGGSpec].
        weights: a checkpoint file in the official, timm, mmpretrain or this package's format
            (``.pth``/``.pt`` read with ``weights_only=True``, or ``.safetensors``), or a Hugging Face
            hub reference ``hf-hub:ORG/REPO[/FILE]`` (e.g. ``hf-hub:timm/repvgg_a0.rvgg_in1k``).
        pretrained: load the model's ImageNet weights (timm's, from the hub or its cache; see
            `repvgg.io.hub.PRETRAINED`); another ``num_classes`` keeps a fresh classifier.
        num_classes: classifier outputs; defaults to the checkpoint's when ``weights`` is given,
            else 1000; 0 gives pooled features.
        in_chans: input image channels.
        deploy: build the fused inference-time network (load ``-deploy`` files into this).
        features_only: no head; ``forward`` returns the stage feature maps in ``out_indices``.
        out_indices: which stages (0-4) ``features_only`` returns.
        global_pool: ``"avg"``, or ``""`` to return the last stage's unpooled map (with ``num_classes=0``).
        **overrides: any [`RepVGGSpec`][repvgg.nn.spec.RepVGGSpec] field, e.g. ``depths=(1, 2, 2, 2, 1)`` or
            ``use_identity=False``, for a custom architecture in one call.
    """
    if not isinstance(pretrained, bool):
        hint = (f"; for a hub reference pass weights={pretrained!r}" if isinstance(pretrained, str)
                and pretrained.startswith("hf-hub:") else "")
        raise TypeError(f"pretrained is True or False, got {pretrained!r}{hint}")
    if pretrained:
        if weights is not None:
            raise ValueError("pass either pretrained=True or weights=..., not both")
        if not isinstance(name, str):
            raise ValueError("pretrained=True needs a registered model name")
        weights = pretrained_file(canonical_name(name))
    state_dict: dict[str, Tensor] | None = None
    metadata: dict[str, Any] = {}
    skip_head = False
    if weights is not None:
        path = resolve_weights(weights)
        state_dict, metadata = read_checkpoint(path)
        file_classes = checkpoint_num_classes(state_dict)
        if num_classes is None:
            num_classes = file_classes
        skip_head = pretrained and file_classes is not None and num_classes != file_classes
    model = build_model(name, num_classes=1000 if num_classes is None else num_classes, in_chans=in_chans,
                        deploy=deploy, features_only=features_only, out_indices=out_indices,
                        global_pool=global_pool, **overrides)
    if state_dict is not None:
        load_state_dict_into(model, state_dict, source=str(weights), skip_head=skip_head)
        if not skip_head:
            attach_card(model, metadata, str(weights))
    return model


def model_card(model: torch.nn.Module) -> ModelCard:
    """What ``model`` knows of its classes and preprocessing: the card of the file it was loaded from
    ([`load_model`][repvgg.io.loading.load_model], [`create_model`][repvgg.io.loading.create_model] with weights), else
    numbered classes and its default data configuration (``pretrained_cfg``), with notes saying so."""
    card = getattr(model, "card", None)
    if isinstance(card, ModelCard):
        return card
    name = getattr(model, "name", type(model).__name__)
    return resolve_card({}, f"the model {name}", int(getattr(model, "num_classes", 0) or 0) or 1,
                        default=_default_preprocessing(model))


def _default_preprocessing(model: torch.nn.Module) -> Preprocessing:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    return Preprocessing.from_data_config(cfg, int(size))


def attach_card(model: torch.nn.Module, metadata: Mapping[str, Any] | ModelCard, source: str) -> None:
    """Set ``model.card`` from a file's metadata (validated against the head), or to a card already resolved, and
    make ``model.pretrained_cfg`` (what timm's data helpers read) say the same preprocessing. A model without a
    head gets no card."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes < 1 or getattr(model, "features_only", False):
        return
    card = metadata if isinstance(metadata, ModelCard) else \
        resolve_card(metadata, source, num_classes, default=_default_preprocessing(model))
    setattr(model, "card", card)  # plain data: nn.Module types attribute assignment as Tensor | Module
    p = card.preprocessing
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        cfg.update(input_size=(cfg.get("input_size", (3,))[0], p.img_size, p.img_size), crop_pct=p.crop_pct,
                   interpolation=p.interpolation, mean=p.mean, std=p.std)


def resolve_weights(weights: str | os.PathLike[str]) -> Path:
    """A local weights file: ``weights`` itself, or the cached download of an ``hf-hub:`` reference."""
    if isinstance(weights, str) and weights.startswith(HUB_PREFIX):
        return hub_file(weights)
    return Path(weights)


def infer_architecture(state_dict: Mapping[str, Tensor]) -> str:
    """Find the registered model whose parameter names and shapes match ``state_dict``.

    Used for official files, which carry no architecture name. Models are built on the ``meta``
    device, so this allocates no weight memory.
    """

    deploy = is_deploy_state_dict(state_dict)
    in_chans = stem_in_chans(state_dict)
    wanted = {k: tuple(v.shape) for k, v in state_dict.items()
              if not k.endswith("num_batches_tracked") and not is_head_key(k)}
    # Fused networks of a RepVGG and its quantization-friendly twin are identical: name the RepVGG one.
    for name in sorted(list_models(), key=lambda n: (n.startswith("qarepvgg_"), n)):
        with torch.device("meta"):
            candidate = build_model(name, deploy=deploy, num_classes=1, in_chans=in_chans)
        have = {k: tuple(v.shape) for k, v in candidate.state_dict().items()
                if not k.endswith("num_batches_tracked") and not is_head_key(k)}
        if have == wanted:
            return name
    raise ValueError(
        "the state dict matches no registered architecture; pass the model name explicitly "
        "(or register a custom spec with repvgg.register_model)."
    )


def _metadata_field(metadata: Mapping[str, Any], key: str, kind: type, path: Any, default: Any) -> Any:
    """``metadata[key]`` if it has type ``kind`` (``default`` when absent); else an error naming file and field."""
    if key not in metadata:
        return default
    value = metadata[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{path}: metadata field {key!r} must be {kind.__name__}, got {value!r:.80}")
    return value


def _file_architecture(metadata: Mapping[str, Any], state_dict: Mapping[str, Tensor], path: Any) -> str | RepVGGSpec:
    """The architecture a weights file describes: its ``spec`` (checked against its tensors from the metadata
    alone, before anything is built), else its ``arch`` name, else the registered model its shapes match."""
    if "spec" in metadata:
        fields = _metadata_field(metadata, "spec", dict, path, None)
        try:
            spec = RepVGGSpec.from_dict(fields)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: metadata field 'spec' does not describe a RepVGG: {err}") from None
        for stage in range(1, len(spec.depths)):
            blocks = {k.split(".")[1] for k in state_dict if k.startswith(f"stage{stage}.")}
            if len(blocks) != spec.depths[stage]:
                raise ValueError(f"{path}: metadata field 'spec' declares {spec.depths[stage]} layers in stage "
                                 f"{stage}, but the file holds weights for {len(blocks)}; the file is inconsistent")
        if "arch" in metadata:  # the name must be what the spec describes (a report names the model by it)
            check_arch(str(_metadata_field(metadata, "arch", str, path, None)), spec,
                       _metadata_field(metadata, "spec_overrides", dict, path, {}), str(path))
        return spec
    if "arch" in metadata:
        return str(_metadata_field(metadata, "arch", str, path, None))
    name = infer_architecture(state_dict)
    logger.info("%s: inferred architecture %s from parameter shapes", path, name)
    return name


def load_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    deploy: bool | None = None,
    num_classes: int | None = None,
) -> RepVGG:
    """Rebuild a model from a weights file alone.

    The architecture comes from ``arch``, else the file's metadata (this package's files), else by
    matching the parameter shapes against the registry (official and timm files). Training-time or
    deploy form follows the file unless ``deploy`` says otherwise: ``deploy=False`` on a fused file expands it into
    training-time blocks that compute the same function (to train it further).
    """

    state_dict, metadata = read_checkpoint(resolve_weights(path))
    file_deploy = is_deploy_state_dict(state_dict)
    spec_or_name = arch if arch is not None else _file_architecture(metadata, state_dict, path)
    if num_classes is None:  # the head's outputs, else the file's word (0: a headless backbone), else ImageNet's
        num_classes = checkpoint_num_classes(state_dict)
        if num_classes is None:
            num_classes = _metadata_field(metadata, "num_classes", int, path, 1000)
    options = dict(num_classes=num_classes, in_chans=_metadata_field(metadata, "in_chans", int, path,
                                                                     stem_in_chans(state_dict)),
                   deploy=file_deploy and deploy is not False,
                   features_only=_metadata_field(metadata, "features_only", bool, path, False),
                   global_pool=_metadata_field(metadata, "global_pool", str, path, "avg"),
                   out_indices=tuple(_metadata_field(metadata, "out_indices", list, path, [0, 1, 2, 3, 4])))
    try:
        # The file's description is checked against its tensors on the meta device first: a small file
        # whose metadata declares a huge network allocates nothing before it is refused.
        with torch.device("meta"):
            probe = build_model(spec_or_name, **options)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: the file's metadata does not describe a model this package can build: {err}") \
            from err
    named = str(metadata["arch"]) if isinstance(spec_or_name, RepVGGSpec) and "arch" in metadata else None
    if named:  # a model built from the file's spec is the file's architecture (errors name it too)
        probe.name = named
    check_state_dict(probe, state_dict, source=str(path))
    attach_card(probe, metadata, str(path))  # bad class names or preprocessing are refused before allocating
    model = build_model(spec_or_name, **options)
    if named:
        model.name = model.pretrained_cfg["architecture"] = named
    load_state_dict_into(model, state_dict, source=str(path))
    attach_card(model, getattr(probe, "card", metadata), str(path))  # the card the probe's check resolved
    if deploy and not file_deploy:
        model = reparameterize_model(model, inplace=True)
    return model




@torch.no_grad()
def convert_checkpoint(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    arch: str | None = None,
    img_size: int = 224,
    batch_size: int = 2,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert a training-time weights file (official, timm or own) into a deploy ``.safetensors`` file.

    The two models are compared on a batch of ``batch_size`` random images before anything is written;
    above a relative deviation of [`CONVERSION_TOLERANCE`][repvgg.nn.convert.CONVERSION_TOLERANCE] (or with any NaN or
    infinite output) nothing is written. The report gives the largest absolute and the relative output
    difference. An existing ``destination`` is only replaced with ``overwrite``; the source never is.

    Raises:
        ValueError: bad arguments, an unreadable or already fused source, a destination that is the
            source, a folder, or an existing file without ``overwrite``.
        ConversionMismatch: the converted model does not compute what the source does.
    """
    source, destination = Path(source), Path(destination)
    check_img_size(img_size, "img_size")
    check_int(batch_size, "batch_size", low=1)
    check_output_path(destination, reads=[source], overwrite=overwrite, suffixes=(".safetensors",))
    model = load_model(source, arch=arch).eval()
    if model.deploy:
        raise ValueError(f"{source} is already fused (deploy weights); there is nothing to convert")
    check_batch_memory(2 * batch_size, (model.in_chans, img_size, img_size), "the check batch (--img-size)")
    plain = reparameterize_model(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, model.in_chans, img_size, img_size, generator=gen)
    deviation = OutputDeviation()
    deviation.update(model(x), plain(x))
    check_conversion(deviation.relative, f"the converted {model.name}")
    save_weights(plain, destination, extra={"converted_from": source.name, **model_card(model).metadata()})
    return {
        "input": str(source),
        "output": str(destination),
        "model": model.name,
        "params_train": sum(p.numel() for p in model.parameters()),
        "params_deploy": sum(p.numel() for p in plain.parameters()),
        "check_input": [batch_size, model.in_chans, img_size, img_size],
        "max_abs_diff": deviation.max_abs_diff,
        "relative_error": deviation.relative,
    }

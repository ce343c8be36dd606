"""The model zoo: one table of named [`RepVGGSpec`][repvgg.nn.spec.RepVGGSpec] entries and ``build_model``.

Building from a name knows nothing of files; [`repvgg.io.loading.create_model`][repvgg.io.loading.create_model] adds
weights on top.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Mapping, Sequence

import torch

from repvgg.limits import MAX_CHANNELS, MAX_CLASSES, brief, check_int, check_parameter_memory
from repvgg.nn.model import RepVGG
from repvgg.nn.spec import AUX_POSITIONS, RepVGGSpec

__all__ = ["MODEL_SPECS", "canonical_name", "check_arch", "list_models", "get_spec", "register_model", "build_model",
           "spec_overrides", "spec_parameter_count", "spec_with"]

_A = (1, 2, 4, 14, 1)
_B = (1, 4, 6, 16, 1)
_D = (1, 8, 14, 24, 1)

#: Paper Table 2 multipliers; g2/g4 make every second layer from the 3rd groupwise; D2se is the
#: official release's SE variant.
MODEL_SPECS: dict[str, RepVGGSpec] = {
    "repvgg_a0": RepVGGSpec(_A, (0.75, 2.5)),
    "repvgg_a1": RepVGGSpec(_A, (1.0, 2.5)),
    "repvgg_a2": RepVGGSpec(_A, (1.5, 2.75)),
    "repvgg_b0": RepVGGSpec(_B, (1.0, 2.5)),
    "repvgg_b1": RepVGGSpec(_B, (2.0, 4.0)),
    "repvgg_b1g2": RepVGGSpec(_B, (2.0, 4.0), groups=2),
    "repvgg_b1g4": RepVGGSpec(_B, (2.0, 4.0), groups=4),
    "repvgg_b2": RepVGGSpec(_B, (2.5, 5.0)),
    "repvgg_b2g2": RepVGGSpec(_B, (2.5, 5.0), groups=2),
    "repvgg_b2g4": RepVGGSpec(_B, (2.5, 5.0), groups=4),
    "repvgg_b3": RepVGGSpec(_B, (3.0, 5.0)),
    "repvgg_b3g2": RepVGGSpec(_B, (3.0, 5.0), groups=2),
    "repvgg_b3g4": RepVGGSpec(_B, (3.0, 5.0), groups=4),
    "repvgg_d2se": RepVGGSpec(_D, (2.5, 5.0), use_se=True),
    # Small members for CPU-sized data (the default training job and the tests).
    "repvgg_tiny": RepVGGSpec((1, 2, 2, 4, 1), (0.5, 1.0)),
    "repvgg_tiny_b": RepVGGSpec((1, 4, 6, 16, 1), (0.25, 0.5)),
}
#: QARepVGG (Chu et al., AAAI 2024): every A/B member, and the small ones, with the quantization-friendly block.
MODEL_SPECS.update({
    "qa" + name: dataclasses.replace(spec, quant_friendly=True)
    for name, spec in list(MODEL_SPECS.items()) if name[len("repvgg_")] in "ab" or name.startswith("repvgg_tiny")
})
#: EfficientRep (YOLOv6's backbone, Li et al. 2022/2023): a stride-2 RepVGG block and then a RepBlock of n more per
#: stage, which is a RepVGG of its own widths and depths. ``n`` and ``s`` have YOLOv6's widths (0.25 and 0.5 of 64 to
#: 1024) and its depths (1, 6, 12, 18, 6 at 0.33: 1 + 2, 4, 6, 2 blocks); ``t`` (the detector's default, sized for a
#: small CPU: docs/detection.md) has YOLOv6-N's widths and a stride-2 block alone in its first and last stages, one
#: more in the two between. The ``qa`` members use QARepVGG's block.
_EFFICIENTREP = {
    "efficientrep_t": RepVGGSpec((1, 1, 2, 2, 1), (1.0, 1.0), base_widths=(16, 32, 64, 128, 256)),
    "efficientrep_n": RepVGGSpec((1, 3, 5, 7, 3), (1.0, 1.0), base_widths=(16, 32, 64, 128, 256)),
    "efficientrep_s": RepVGGSpec((1, 3, 5, 7, 3), (1.0, 1.0), base_widths=(32, 64, 128, 256, 512)),
}
MODEL_SPECS.update(_EFFICIENTREP)
MODEL_SPECS.update({"qa" + name: dataclasses.replace(spec, quant_friendly=True)
                    for name, spec in _EFFICIENTREP.items()})
#: RepVGGplus (the official release, not in the paper): deeper, a post-ReLU SE in every block, and training-only
#: auxiliary classifiers after stages 1 and 2 and after the first half of stage 3.
MODEL_SPECS.update({
    "repvggplus_l2pse": RepVGGSpec(_D, (2.5, 5.0), post_se=True, aux_heads=AUX_POSITIONS),
    "repvggplus_tiny": RepVGGSpec((1, 2, 2, 4, 1), (0.5, 1.0), post_se=True, aux_heads=AUX_POSITIONS),
})


def canonical_name(name: str) -> str:
    """The registry key for ``name``: lower case, ``_`` for ``-``, a ``repvgg_`` (or ``qarepvgg_``, ``repvggplus_``,
    ``efficientrep_``, ``qaefficientrep_``) prefix ("RepVGG-A0" -> "repvgg_a0", "a0" -> "repvgg_a0", "QARepVGG-A0" ->
    "qarepvgg_a0", "RepVGGplus-L2pse" and "plus_l2pse" -> "repvggplus_l2pse", "EfficientRep-N" -> "efficientrep_n")."""
    key = name.strip().lower().replace("-", "_")
    if key.startswith("plus_"):  # "plus_l2pse" -> "repvggplus_l2pse"
        key = "repvggplus" + key[len("plus"):]
    for family in ("qaefficientrep", "efficientrep", "qarepvgg", "repvggplus", "repvgg"):
        if key.startswith(family):
            return f"{family}_{key.removeprefix(family).lstrip('_')}"
    return f"repvgg_{key}"


def list_models(pattern: str = "*") -> list[str]:
    """The registered model names matching the shell-style ``pattern`` (``"repvgg_b*"``, ``"*g4"``), sorted.

    A pattern in the paper's spelling works too (``"RepVGG-B*"``).
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    wanted = pattern.strip().lower().replace("-", "_")
    return sorted(name for name in MODEL_SPECS if fnmatch.fnmatchcase(name, wanted))


def get_spec(name: str) -> RepVGGSpec:
    """The spec registered under ``name`` (``"repvgg_a0"``, ``"RepVGG-A0"`` and ``"a0"`` all work).

    Raises:
        ValueError: for an unknown name, listing the closest registered names.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    key = canonical_name(name)
    if key in MODEL_SPECS:
        return MODEL_SPECS[key]
    close = difflib.get_close_matches(key, MODEL_SPECS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {brief(name)}.{hint} Registered models: {', '.join(list_models())}.")


def spec_overrides(name: str, spec: RepVGGSpec) -> dict[str, Any]:
    """The fields in which ``spec`` differs from the spec registered as ``name`` (what ``create_model(name,
    **overrides)`` changed); ``{}`` for a name that is not registered. Files record them beside ``arch``."""
    key = canonical_name(name)
    if key not in MODEL_SPECS:
        return {}
    registered, mine = MODEL_SPECS[key].to_dict(), spec.to_dict()
    return {field: value for field, value in mine.items() if registered.get(field) != value}


def check_arch(name: str, spec: RepVGGSpec, overrides: Mapping[str, Any], source: str) -> None:
    """Refuse a file whose architecture name ``name`` is not what its ``spec`` describes: a registered name's spec
    with ``overrides`` applied must be ``spec`` (an unregistered name is the spec's own).

    Raises:
        ValueError: naming the fields that differ.
    """
    key = canonical_name(name)
    if key not in MODEL_SPECS:
        return
    try:
        expected = dataclasses.replace(MODEL_SPECS[key], **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: metadata field 'spec_overrides' does not describe {name}'s options: {err}") \
            from None
    if expected != spec:
        differ = [f.name for f in dataclasses.fields(RepVGGSpec) if getattr(expected, f.name) != getattr(spec, f.name)]
        raise ValueError(f"{source}: metadata field 'arch' says {name}, but field 'spec' describes another network "
                         f"(it differs in {', '.join(differ)}); the file is inconsistent (edited or mixed up?)")


def register_model(name: str, spec: RepVGGSpec, *, overwrite: bool = False) -> None:
    """Add a custom architecture to the registry so ``create_model(name)`` and the CLI can build it."""
    if not isinstance(spec, RepVGGSpec):  # a dict would break create_model, and every later registration with timm
        raise TypeError(f"register_model takes a RepVGGSpec (RepVGGSpec.from_dict(d) for a dict), got "
                        f"{type(spec).__name__}")
    key = canonical_name(name)
    if key in MODEL_SPECS and not overwrite:
        raise ValueError(f"model {key!r} is already registered; pass overwrite=True to replace it")
    MODEL_SPECS[key] = spec


def spec_parameter_count(spec: RepVGGSpec, in_chans: int = 3, num_classes: int = 1000) -> int:
    """About how many parameters the training-time network of ``spec`` has (3x3 and 1x1 kernels, their norms, SE,
    the heads), known before anything is built."""
    total, channels = 0, in_chans
    for layer in spec.layer_configs():
        out = layer["out_channels"]
        total += out * (channels // layer["groups"]) * 10 + 6 * out
        total += 2 * out * max(1, out // 16) + out if spec.use_se or spec.post_se else 0
        channels = out
    aux = sum(spec.widths[int(h[5])] ** 2 * 9 + spec.widths[int(h[5])] * num_classes for h in spec.aux_heads)
    return total + aux + channels * num_classes + num_classes


def spec_with(name: str | RepVGGSpec, overrides: Mapping[str, Any]) -> RepVGGSpec:
    """The spec of ``name`` (a registered name or a spec) with ``overrides`` applied, each checked.

    Raises:
        TypeError: an override that is not a [`RepVGGSpec`][repvgg.nn.spec.RepVGGSpec] field.
        ValueError: an unknown name, or a value of the wrong type or out of bounds.
    """
    spec = name if isinstance(name, RepVGGSpec) else get_spec(name)
    if not overrides:
        return spec
    known = {f.name for f in dataclasses.fields(RepVGGSpec)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown argument(s) {brief(unknown)} for create_model; RepVGGSpec fields are {sorted(known)}")
    return dataclasses.replace(spec, **overrides)


def build_model(
    name: str | RepVGGSpec,
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    deploy: bool = False,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3, 4),
    global_pool: str = "avg",
    frozen_stages: int = -1,
    norm_eval: bool = False,
    **overrides: Any,
) -> RepVGG:
    """Build a RepVGG with fresh weights by registered name (or from a spec): the package's internal builder.

    Users call [`repvgg.create_model`][repvgg.io.loading.create_model], which takes the same arguments and loads weights
    on top.

    Args:
        name: a registered name (see [`list_models`][repvgg.nn.registry.list_models]) or a
            [`RepVGGSpec`][repvgg.nn.spec.RepVGGSpec].
        num_classes: classifier outputs.
        in_chans: input image channels.
        deploy: build the fused inference-time network (load ``-deploy`` files into this).
        features_only: no head; ``forward`` returns the stage feature maps in ``out_indices``.
        out_indices: which stages (0-4) ``features_only`` returns.
        global_pool: ``"avg"``, or ``""`` to return the last stage's unpooled map (with ``num_classes=0``).
        frozen_stages: stages kept frozen when fine-tuning a backbone (see [`RepVGG`][repvgg.nn.model.RepVGG]).
        norm_eval: keep every BatchNorm in eval mode while training (see [`RepVGG`][repvgg.nn.model.RepVGG]).
        **overrides: any [`RepVGGSpec`][repvgg.nn.spec.RepVGGSpec] field, e.g. ``depths=(1, 2, 2, 2, 1)`` or
            ``use_identity=False``, for a custom architecture in one call.
    """
    spec = spec_with(name, overrides)
    arch_name = "repvgg_custom" if isinstance(name, RepVGGSpec) else canonical_name(name)
    check_int(num_classes, "num_classes", low=0, high=MAX_CLASSES)
    check_int(in_chans, "in_chans", low=1, high=MAX_CHANNELS)
    if torch.get_default_device().type != "meta":  # a meta model allocates nothing: files are checked on one first
        check_parameter_memory(spec_parameter_count(spec, in_chans, num_classes), arch_name)
    return RepVGG(spec, num_classes=num_classes, in_chans=in_chans, deploy=deploy, features_only=features_only,
                  out_indices=out_indices, global_pool=global_pool, name=arch_name, frozen_stages=frozen_stages,
                  norm_eval=norm_eval)

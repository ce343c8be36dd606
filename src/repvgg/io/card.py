"""What a model file says about its use: the class names and the evaluation preprocessing (a
[`ModelCard`][repvgg.io.card.ModelCard]).

Every file this package writes carries both, as two string fields: ``classes`` (a JSON list of names, one per
output of the head) and ``preprocessing`` (a JSON object, [`Preprocessing`][repvgg.io.card.Preprocessing]). They live in
the safetensors metadata of deploy files, in training checkpoints (``best.pt``, ``last.pt``) beside the weights, and in
the ``metadata_props`` of ONNX files (FP32, FP16 and INT8). On load they are validated: malformed JSON, an unknown
or ill-typed field, or a class count other than the head's is an error naming the file and the field.

Files without them (official, timm, mmpretrain or older files) still work: `resolve_card` fills in
numbered classes and the model's default data configuration, and says so in `ModelCard.notes`.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from repvgg.io.formats import require_kind
from repvgg.limits import MAX_CLASSES, MAX_RESIZE, LimitExceeded, brief, check_img_size, parse_json
from repvgg.serialization import DictMixin, input_file

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "ModelCard", "Preprocessing", "check_class_names",
           "read_card", "read_class_names", "read_onnx_metadata", "resized_size", "resolve_card", "write_onnx_metadata"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """The size an image of ``width`` x ``height`` is resized to with its short side made ``short_side``."""
    short = max(1, min(width, height))
    return short_side * width // short, short_side * height // short


@dataclass(frozen=True)
class Preprocessing(DictMixin):
    """How an image becomes the model's input at evaluation: the short side resized (``interpolation``) to
    ``img_size / crop_pct`` and the centre ``img_size`` x ``img_size`` cropped, then scaled to 0..1 and normalised
    with ``mean`` and ``std`` per channel. ``grayscale`` images are read as grey and repeated to three channels
    (the digits). The default is the official RepVGG evaluation (timm's too)."""

    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    grayscale: bool = False

    def __post_init__(self) -> None:
        check_img_size(self.img_size, "img_size")
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)) \
                or not 0.05 <= self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be a number between 0.05 and 1, got {brief(self.crop_pct)}")
        if self.resize > MAX_RESIZE:  # what the fields imply: every image is resized to this short side
            raise LimitExceeded(f"img_size {self.img_size} with crop_pct {self.crop_pct} resizes every image to a "
                                f"short side of {self.resize:,} pixels, more than {MAX_RESIZE:,} "
                                "(repvgg.limits.MAX_IMAGE_PIXELS)")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                             f"{brief(self.interpolation)}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if (not isinstance(values, (list, tuple)) or len(values) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in values)):
                raise ValueError(f"{name} must be three finite numbers (one per RGB channel), got {brief(values)}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if not isinstance(self.grayscale, bool):
            raise ValueError(f"grayscale must be true or false, got {brief(self.grayscale)}")

    @property
    def resize(self) -> int:
        """The short side before the centre crop (timm's rule: ``floor(img_size / crop_pct)``)."""
        return math.floor(self.img_size / self.crop_pct)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The size an image of ``width`` x ``height`` is resized to before the centre crop (its short side made
        [`resize`][repvgg.io.card.Preprocessing.resize]): what the resize allocates, known from the header."""
        return resized_size(width, height, self.resize)

    @classmethod
    def from_data_config(cls, config: Mapping[str, Any], img_size: int) -> Preprocessing:
        """From timm's data configuration (``resolve_data_config``: interpolation, crop_pct, mean, std)."""
        default = cls()
        return cls(img_size=img_size, crop_pct=float(config.get("crop_pct", default.crop_pct)),
                   interpolation=str(config.get("interpolation", default.interpolation)),
                   mean=tuple(config.get("mean", default.mean)), std=tuple(config.get("std", default.std)))


@dataclass(frozen=True)
class ModelCard:
    """A model's class names (one per output) and evaluation preprocessing, and how they were found.

    ``declared`` names the fields that came from a file or the training data (``"classes"``,
    ``"preprocessing"``); the others were filled in (numbered classes, the default preprocessing), which
    ``notes`` says, and are not written into files made from this one.
    """

    classes: tuple[str, ...]
    preprocessing: Preprocessing
    notes: tuple[str, ...] = field(default=(), compare=False)
    declared: tuple[str, ...] = ("classes", "preprocessing")

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))

    @property
    def recorded_preprocessing(self) -> Preprocessing | None:
        """The preprocessing a file or the training data declared (``None`` where it was filled in)."""
        return self.preprocessing if "preprocessing" in self.declared else None

    def metadata(self) -> dict[str, str]:
        """The string fields a file made from this model carries (the declared ones)."""
        fields = {"classes": json.dumps(list(self.classes)),
                  "preprocessing": json.dumps(self.preprocessing.to_dict())}
        return {k: v for k, v in fields.items() if k in self.declared}

    def with_classes(self, classes: Sequence[str], source: str) -> ModelCard:
        """The card with ``classes`` (e.g. from ``--classes FILE``) in place of the file's, checked against
        its count."""
        classes = check_class_names(list(classes), source, len(self.classes))
        return replace(self, classes=tuple(classes), notes=tuple(n for n in self.notes if "names no classes" not in n),
                       declared=tuple(sorted({*self.declared, "classes"})))


    def label_map(self, data_classes: Sequence[str], data: str) -> list[int] | None:
        """How the labels of data whose classes are ``data_classes`` (in their order) become this model's outputs:
        ``None`` when they are the same classes in the same order (or the card names none, so position decides),
        else the model's index of each data class, matched by name.

        Raises:
            ValueError: the names differ; the message names both lists.
        """
        data_classes = list(data_classes)
        if "classes" not in self.declared or list(self.classes) == data_classes:
            if len(data_classes) != len(self.classes):
                raise ValueError(f"the model has {len(self.classes)} classes but {data} has {len(data_classes)}; "
                                 "evaluate it on the data it was trained for")
            return None
        if sorted(self.classes) != sorted(data_classes):
            only_model = sorted(set(self.classes) - set(data_classes))
            only_data = sorted(set(data_classes) - set(self.classes))
            raise ValueError(f"the classes of {data} are not the model's: {len(data_classes)} classes "
                             f"{brief(data_classes)} in the data, {len(self.classes)} {brief(list(self.classes))} in "
                             f"the model (only in the data: {brief(only_data)}; only in the model: "
                             f"{brief(only_model)}); use the data the model was trained on")
        index = {name: i for i, name in enumerate(self.classes)}
        return [index[name] for name in data_classes]


def _check_classes(value: Any, source: str) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > MAX_CLASSES:
        raise ValueError(f"{source} must be a non-empty list of at most {MAX_CLASSES} class names")
    bad = next((v for v in value if not isinstance(v, str) or not v.strip() or _hidden_character(v)), None)
    if bad is not None or len(value) != len(set(value)):
        what = "names repeat" if bad is None else f"{bad!r:.80} is not a name" if not isinstance(bad, str) or \
            not bad.strip() else f"{bad!r:.80} holds {_hidden_character(bad)}"
        raise ValueError(f"{source} must hold distinct, non-empty class names ({what})")
    return value


#: Unicode categories no class name holds: control, format and separator characters break a name over lines
#: (``str.splitlines`` breaks on ``\r``, ``\x0b``, ``\x1c``, ``\x85``, ``\u2028``, ...) or hide in it, and a lone
#: surrogate (an undecodable file-name byte) cannot be written as text.
_HIDDEN_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")
#: Format characters that scripts need inside words (Persian, Indic scripts, emoji sequences).
_JOINERS = ("\u200c", "\u200d")


def _hidden_character(name: str) -> str:
    """The first character of ``name`` that a class name may not hold, described (``""`` when there is none)."""
    for char in name:
        if unicodedata.category(char) in _HIDDEN_CATEGORIES and char not in _JOINERS:
            return f"U+{ord(char):04X} ({unicodedata.name(char, 'a control character')}), which breaks or hides in a " \
                "line of text; remove it"
    return ""


def check_class_names(value: Any, source: str, num_classes: int | None = None, *,
                      model: str = "the model") -> list[str]:
    """``value`` as class names (distinct, non-empty), one per output of ``model`` when ``num_classes`` is given: the
    rule for the names a file records and for the names ``--classes FILE`` gives, whatever the task.

    Raises:
        ValueError: naming ``source``, and the counts where they differ.
    """
    classes = _check_classes(value, source)
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"{source} holds {len(classes)} class names but {model} has {num_classes} outputs; give one "
                         "name per line, one per class")
    return classes


def card_from_metadata(metadata: Mapping[str, Any], source: str | os.PathLike[str],
                       num_classes: int | None) -> tuple[list[str] | None, Preprocessing | None]:
    """The ``classes`` and ``preprocessing`` a file declares (``None`` where absent), validated: a malformed
    field, or a class count other than ``num_classes``, is a ValueError naming the file and the field."""
    classes = preprocessing = None
    if "classes" in metadata:
        field_name = f"{source}: metadata field 'classes'"
        classes = _check_classes(_json_field(metadata["classes"], field_name, list), field_name)
        if num_classes is not None and len(classes) != num_classes:
            raise ValueError(f"{field_name} names {len(classes)} classes but the model has {num_classes} outputs; "
                             "the file is inconsistent (pass --classes FILE to name them yourself)")
    if "preprocessing" in metadata:
        field_name = f"{source}: metadata field 'preprocessing'"
        fields = _json_field(metadata["preprocessing"], field_name, dict)
        try:
            preprocessing = Preprocessing.from_dict(fields)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{field_name} is not a valid preprocessing: {err}") from None
    return classes, preprocessing


def _json_field(raw: Any, field_name: str, kind: type) -> Any:
    expected = "a JSON list" if kind is list else "a JSON object"
    if not isinstance(raw, str):
        raise ValueError(f"{field_name} must be {expected} in a string, got a {type(raw).__name__}: {brief(raw)}")
    value = parse_json(raw, field_name)
    if not isinstance(value, kind):
        raise ValueError(f"{field_name} must be {expected}, got {brief(raw)}")
    return value


def resolve_card(metadata: Mapping[str, Any], source: str | os.PathLike[str], num_classes: int,
                 default: Preprocessing | None = None) -> ModelCard:
    """The card of a file whose head has ``num_classes`` outputs: what its metadata declares (validated), numbered
    classes and ``default`` preprocessing (the official evaluation) where it declares nothing, with a note."""
    classes, preprocessing = card_from_metadata(metadata, source, num_classes)
    declared = tuple(name for name, value in (("classes", classes), ("preprocessing", preprocessing)) if value)
    notes = []
    if classes is None:
        classes = [str(i) for i in range(num_classes)]
        notes.append(f"{source} names no classes: they are numbered 0..{num_classes - 1} "
                     "(pass --classes FILE to name them)")
    if preprocessing is None:
        preprocessing = default or Preprocessing()
        notes.append(f"{source} records no preprocessing: using the default ({_describe(preprocessing)})")
    return ModelCard(tuple(classes), preprocessing, tuple(notes), declared)


def _describe(p: Preprocessing) -> str:
    return (f"{p.img_size}x{p.img_size}, short side {p.resize} {p.interpolation}, centre crop, "
            f"mean {list(p.mean)}, std {list(p.std)}")


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (the weights are not loaded).

    Raises:
        ValueError: the file is not an ONNX model (by its content), or does not parse as one.
    """
    return {prop.key: prop.value for prop in load_onnx_proto(path).metadata_props}


def load_onnx_proto(path: str | os.PathLike[str]) -> Any:
    """The ONNX ``ModelProto`` of ``path`` without external weights, checked to be one: a file of another kind
    ([`require_kind`][repvgg.io.formats.require_kind]), one that does not parse, or one without a graph input is
    refused."""
    import onnx
    from google.protobuf.message import DecodeError

    require_kind(path, ("onnx",), "an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RecursionError, ValueError, OSError) as err:
        raise ValueError(f"{path} does not parse as an ONNX model (truncated or corrupt?): "
                         f"{str(err).strip()[:120] or type(err).__name__}") from None
    if not proto.graph.input or not proto.graph.output:
        raise ValueError(f"{path} is not an ONNX model: it has no graph with inputs and outputs")
    return proto


def write_onnx_metadata(path: str | os.PathLike[str], metadata: Mapping[str, str]) -> None:
    """Add (or replace) ``metadata`` in the ``metadata_props`` of the ONNX file at ``path``, in place.

    Meant for a file this package is still writing (in its staging folder); the weights stay where they are.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def read_card(path: str | os.PathLike[str], num_classes: int | None = None) -> tuple[list[str] | None,
                                                                                    Preprocessing | None]:
    """The class names and preprocessing recorded in any file this package reads (``.safetensors``, a torch
    checkpoint or ``.onnx``), validated; ``None`` where the file records none."""
    path = Path(path)
    if require_kind(path, ("onnx", "safetensors", "torch"), "a model file") == "onnx":
        return card_from_metadata(read_onnx_metadata(path), path, num_classes)
    from repvgg.io.weights import read_checkpoint

    _, metadata = read_checkpoint(path)
    return card_from_metadata(metadata, path, num_classes)


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file, one a line (blank lines at the end ignored), as ``--classes`` reads them."""
    path = input_file(path, "class names file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of a name
    except (UnicodeDecodeError, OSError) as err:
        raise ValueError(f"cannot read class names from {path}: {err}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return _check_classes([line.strip() for line in lines], f"class names file {path}")

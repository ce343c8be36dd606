"""Configurations as typed data: fields that carry their command-line help and bounds, checked on creation.

A [`RunConfig`][repvgg.options.RunConfig] dataclass is built from defaults, files and flags alike
([`from_dict`][repvgg.serialization.DictMixin.from_dict]: values are passed as they are, nothing is evaluated) and
checks every field's type and bounds, so a config file, a checkpoint or a flag cannot smuggle in a value the code does
not expect. The command line makes its flags from the fields (`repvgg.cli.flags`), so ``--help`` and behaviour cannot
drift.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from repvgg.limits import (MAX_CONFIG_BYTES, MAX_NESTING, LimitExceeded, brief, check_float, check_int,
                           parse_json)
from repvgg.serialization import DictMixin, input_file, option_names, write_text

__all__ = ["RunConfig", "check_device_name", "check_field_types", "load_config_file", "option"]

_DEVICE_NAME = re.compile(r"(auto|cpu|cuda(:\d{1,4})?)")


def check_device_name(name: Any, option_name: str = "device") -> str:
    """``name`` if it names a device this package runs on (``auto``, ``cpu``, ``cuda`` or ``cuda:N``); whether
    it is there is checked when the device is used (`repvgg.training.distributed.resolve_device`)."""
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise ValueError(f"{option_name} must be auto, cpu, cuda or cuda:N (N >= 0), got {brief(name)}: this package "
                         "runs on CPUs and CUDA GPUs")
    return name

C = TypeVar("C", bound="RunConfig")


def option(default: Any = None, help: str = "", *, choices: Sequence[Any] | None = None,
           default_help: str | None = None, cli: bool = True, factory: Callable[[], Any] | None = None,
           low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Any:
    """A config field with what the command line needs: its help text, choices, and how to show its default.

    ``default_help`` describes a default that is derived at run time (``None`` meaning "derive it");
    ``cli=False`` keeps a field off the command line (set it in a config file); ``low`` and ``high`` bound
    a number (``low_open`` and ``high_open`` exclude the ends), checked by the flag and by the config alike. A float
    field is always finite.
    """
    metadata = {"help": help, "choices": choices, "default_help": default_help, "cli": cli, "low": low,
                "high": high, "low_open": low_open, "high_open": high_open}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _has_type(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]
        return isinstance(value, (tuple, list)) and all(_has_type(v, args[0]) for v in value)
    if origin is tuple:
        return (isinstance(value, (tuple, list)) and len(value) == len(args)
                and all(_has_type(v, a) for v, a in zip(value, args)))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _describe(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_describe(args[0])}s"
    if typing.get_origin(annotation) is tuple:
        return f"{len(args)} numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _check_bounds(f: dataclasses.Field, value: Any, *, real: bool) -> None:
    """``value`` within field ``f``'s bounds; a number of a field that holds floats (``real``) is finite too."""
    meta = f.metadata
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if real:
        check_float(value, f.name, low=meta.get("low"), high=meta.get("high"), low_open=meta.get("low_open", False),
                    high_open=meta.get("high_open", False))
    elif isinstance(value, int) and meta.get("low") is not None:
        check_int(value, f.name, low=int(meta["low"]), high=None if meta.get("high") is None else int(meta["high"]))
    elif isinstance(value, int) and meta.get("high") is not None:
        check_int(value, f.name, low=-2**63, high=int(meta["high"]))


def check_field_types(instance: Any) -> None:
    """Every field of the dataclass ``instance`` holds a value of its declared type (``true``, not ``"no"``, for a
    flag; an int, not a float, for a count); files and flags are not trusted. A ValueError names the field."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if not _has_type(value, hints[f.name]):
            raise ValueError(f"invalid {type(instance).__name__}: {f.name} must be {_describe(hints[f.name])}, got "
                             f"{brief(value)}")


class RunConfig(DictMixin):
    """A run configuration: dict round trips plus overrides and a YAML copy in the run folder."""

    def updated(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied, ``None`` included (re-validated)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the config as YAML, atomically."""
        return write_text(path, self.to_yaml())

    def to_yaml(self) -> str:
        """The config as YAML, in field order (what ``--print-config`` shows and ``config.yaml`` holds)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def _check_types(self) -> None:
        """Every field holds a value of its declared type and within its bounds (config files and checkpoints
        are not trusted); a float is finite."""
        check_field_types(self)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                _check_bounds(f, value, real=_has_type(0.5, hints[f.name]))
            except ValueError as err:
                raise ValueError(f"invalid {type(self).__name__}: {err}") from None

    def _check(self, checks: Sequence[tuple[bool, str]]) -> None:
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid {type(self).__name__}: {message}")


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (keys checked later by
    [`TrainConfig.from_dict`][repvgg.serialization.DictMixin.from_dict]).

    The file is data, bounded before it is walked: at most [`MAX_CONFIG_BYTES`][repvgg.limits.MAX_CONFIG_BYTES], nested
    at most [`MAX_NESTING`][repvgg.limits.MAX_NESTING] levels, and without YAML aliases (``*name``), whose expansion is
    unbounded (a few hundred bytes of nested aliases make gigabytes). Python tags (``!!python/object``) are refused too.
    """
    path = input_file(path, "config file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise LimitExceeded(f"config file {path} holds {path.stat().st_size:,} bytes, more than the "
                            f"{MAX_CONFIG_BYTES:,} a config may have")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as err:
        raise ValueError(f"could not read config file {path}: {err}") from None
    if path.suffix.lower() == ".json":
        data = parse_json(text, f"config file {path}")
    else:
        data = _load_yaml(text, path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values, got {type(data).__name__}")
    return option_names(data, f"config file {path}")


#: The plain scalars a config's YAML reads as numbers and booleans: YAML 1.2's core schema with decimal numbers only.
#: YAML 1.1's other forms (``1:30`` is 90, ``0x10`` is 16, ``010`` is 8, ``yes``/``no``/``on``/``off`` are
#: booleans, ``2024-01-01`` is a date) stay text, which the field's type check then refuses or keeps as written.
_YAML_SCALARS = (
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("tag:yaml.org,2002:int", r"[-+]?[0-9]+", "-+0123456789"),
    ("tag:yaml.org,2002:float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                                r"|\.(?:nan|NaN|NAN)", "-+.0123456789"),
)


def _load_yaml(text: str, path: Path) -> Any:
    import yaml

    class DataLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` without aliases, with a nesting bound and text keys (a config is plain data), and
        reading numbers and booleans by ``_YAML_SCALARS``."""

        depth = 0
        yaml_implicit_resolvers = {
            first: [(tag, pattern) for tag, pattern in resolvers if tag.endswith((":null", ":merge", ":yaml"))]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:  # a key given twice is a mistake, not "the last one wins"
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise yaml.constructor.ConstructorError(None, None, f"the key {brief(key)} is not a name (keys "
                                                            "are option names; quote a key that is text)",
                                                            key_node.start_mark)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config file",
                                                  self.peek_event().start_mark)
            self.depth += 1
            try:
                if self.depth > MAX_NESTING:
                    raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_NESTING} levels deep",
                                                      self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    for tag, pattern, first in _YAML_SCALARS:
        DataLoader.add_implicit_resolver(tag, re.compile(f"^(?:{pattern})$"), list(first))
    # decimal only: the safe loader's own reads a leading 0 as octal and 0x as hexadecimal, even under an !!int tag
    DataLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))
    try:
        return yaml.load(text, Loader=DataLoader)  # noqa: S506 - a SafeLoader, aliases refused
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer of thousands of digits
        # The safe loader refuses Python tags (!!python/object ...) too: a config is data, never code.
        raise ValueError(f"could not read config file {path}: {' '.join(str(err).split())[:300]}") from None

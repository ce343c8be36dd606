"""Command-line flags generated from a config dataclass, so ``--help`` and behaviour cannot drift.

Each field of a [`RunConfig`][repvgg.options.RunConfig] made with
`option` becomes ``--field-name`` with the field's type, choices and
help, and its default shown as the dataclass holds it. The parser's own default is ``None`` ("not
given"), so the precedence defaults < resumed run < ``--config`` file < flags is decided in one place
(`resolve_run_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, NoReturn

from repvgg.limits import MAX_IMG_SIZE, check_float, check_int

__all__ = ["HelpFormatter", "Parser", "UsageError", "add_config_flags", "add_guard_flags", "add_overwrite_flag",
           "bounded_float", "bounded_int",
           "config_command", "config_flag_values", "image_size", "parse_list", "refuse_flags", "shown_default"]


class UsageError(ValueError):
    """A command line argparse refused; the message ends with the usage line."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are raised (exit status 2, and a JSON document with ``--json``)
    instead of printed and exited on the spot."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


def bounded_int(low: int, high: int | None = None, *, why: str = "") -> Any:
    """An argparse ``type`` for an integer in ``[low, high]``: anything else is refused with the range (and
    ``why``, when the range needs a reason)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            return check_int(value, "the value", low=low, high=high)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{err}{f' ({why})' if why else ''}") from None

    parse.__name__ = "integer"
    return parse


def parse_list(text: str | None) -> tuple[str, ...]:
    """``"a,b, c"`` -> ``("a", "b", "c")``; empty or ``"none"`` -> ``()`` (a comma-separated flag)."""
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


#: An input side in pixels (``--img-size`` and friends): 8 to [`MAX_IMG_SIZE`][repvgg.limits.MAX_IMG_SIZE].
image_size = bounded_int(8, MAX_IMG_SIZE)


def add_guard_flags(parser: argparse.ArgumentParser) -> None:
    """``--min-agreement`` and ``--max-top1-drop``: the accuracy guard's thresholds
    ([`repvgg.quant.guard`][repvgg.quant.guard]), as ``repvgg quantize`` takes them."""
    from repvgg.quant.config import QuantizeConfig

    fields = {f.name: f for f in dataclasses.fields(QuantizeConfig)}
    for name in ("min_agreement", "max_top1_drop"):
        f = fields[name]
        parser.add_argument("--" + name.replace("_", "-"), type=bounded_float(f.metadata["low"], f.metadata["high"]),
                            default=f.default, help=f"{f.metadata['help']} (default: {f.default})")


def bounded_float(low: float, high: float) -> Any:
    """An argparse ``type`` for a finite number in ``[low, high]``."""

    def parse(text: str) -> float:
        try:
            return check_float(float(text), "the value", low=low, high=high)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err) if "must be" in str(err) else f"expected a number, got "
                                                                                    f"{text!r}") from None

    parse.__name__ = "number"
    return parse


def refuse_flags(given: Iterable[tuple[str, Any]], why: str) -> None:
    """The rule for flags a command takes but cannot apply to this input: those given (a value other than ``None`` or
    ``False``) are refused, named with ``why`` they do not apply, rather than accepted and ignored.

    Raises:
        ValueError: ``"--a, --b apply to ..."``.
    """
    named = [flag for flag, value in given if value is not None and value is not False]
    if named:
        raise ValueError(f"{', '.join(named)} {'applies' if len(named) == 1 else 'apply'} {why}")


def add_overwrite_flag(parser: argparse.ArgumentParser, what: str = "an existing output file") -> None:
    """``--overwrite``: replace ``what`` (never a file the command reads)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} (a file the command reads is never replaced)")


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose parser default is the one the command uses."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.default in (None, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)"


def _value_type(annotation: Any) -> Any:
    """``int`` for ``int | None``, ``tuple[float, float]`` stays a tuple type, and so on."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def shown_default(f: dataclasses.Field) -> str:
    """How ``--help`` shows the default of config field ``f``."""
    if f.metadata.get("default_help"):
        return str(f.metadata["default_help"])
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return "required"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):  # a comma-separated list, or a fixed number of values
        return ",".join(default) if all(isinstance(v, str) for v in default) else " ".join(str(v) for v in default)
    return "none" if default is None else str(default)


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type, *, exclude: tuple[str, ...] = ()) -> None:
    """Add a flag for every command-line field of ``config_cls`` (a dataclass made with ``option``)."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        kind = _value_type(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {shown_default(f)})".replace("%", "%%")
        kwargs: dict[str, Any] = {"default": None, "dest": f.name, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple and typing.get_args(kind)[-1] is Ellipsis:
            kwargs.update(type=parse_list, metavar="A,B,...")  # a comma-separated list
        elif typing.get_origin(kind) is tuple:
            items = typing.get_args(kind)
            kwargs.update(type=items[0], nargs=len(items))
        else:
            kwargs["type"] = kind
            if kind is int and f.metadata.get("low") is not None:
                kwargs["type"] = bounded_int(f.metadata["low"], f.metadata.get("high"))
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def config_flag_values(args: argparse.Namespace, config_cls: type) -> dict[str, Any]:
    """The flags the user gave, by config field name (fields without a flag, or not given, are left out)."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def config_command(sub: argparse._SubParsersAction, name: str, config_cls: type, run: Any, *, help: str,
                   description: str, positionals: tuple[tuple[str, str], ...] = (),
                   exclude: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The parser of a subcommand whose options are ``config_cls``'s fields: ``positionals`` as
    ``(dest, metavar)``, then a flag per field (but ``exclude``), each showing the default the command uses."""
    parser = sub.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
    for dest, metavar in positionals:
        parser.add_argument(dest, metavar=metavar)
    add_config_flags(parser, config_cls, exclude=exclude)
    parser.set_defaults(func=run, config_cls=config_cls)
    return parser

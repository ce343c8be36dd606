"""What a subcommand prints and writes: one JSON document with ``--json`` (every subcommand), else its tables and
prose; ``--json-out`` files under the output rule."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from typing import Any

from repvgg.serialization import check_output_path, write_json

__all__ = ["add_json_flag", "add_json_out_flag", "check_json_out", "emit", "emit_error", "error_text", "write_json_out"]

#: How PyTorch re-raises an error of a data-loading process: the type, then the process's whole traceback.
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout (machine-readable) instead of tables and prose")


def emit(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    """Print ``data`` as JSON when ``--json`` was given or there is no human form, else ``text``."""
    if getattr(args, "json", False) or text is None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def error_text(err: BaseException) -> str:
    """What the user reads of ``err``: its message, and of an error raised in a data-loading process the original
    message alone, without the traceback PyTorch puts around it (a bad image read by ``--workers 2`` reads as one
    read in the main process)."""
    text = str(err)
    caught = _WORKER_ERROR.match(text)
    if caught is None:
        return text
    last = None
    for last in re.finditer(rf"^(?:[\w.]+\.)?{caught.group(1)}: ", text, re.MULTILINE):
        pass
    return text[last.end():].strip() if last is not None else text


def emit_error(args: argparse.Namespace, message: str, status: int) -> None:
    """With ``--json``, a failed command's one JSON document: ``{"error": ..., "exit_status": ...}``."""
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps({"error": message, "exit_status": status}) + "\n")


def add_json_out_flag(parser: argparse.ArgumentParser) -> None:
    """``--json-out PATH`` and the ``--overwrite`` that lets it replace an existing file."""
    parser.add_argument("--json-out", default=None, metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --json-out file (a file the command reads is never replaced)")


def check_json_out(args: argparse.Namespace, reads: list[Any]) -> None:
    """Refuse ``--json-out`` before any work if it would replace a file without ``--overwrite`` or an input."""
    if args.json_out:
        check_output_path(args.json_out, reads=local_reads(reads), overwrite=args.overwrite, option="--json-out")


def local_reads(reads: Iterable[Any]) -> list[Any]:
    """``reads`` for the output rule, each ``hf-hub:`` reference as the cached file it reads (if cached)."""
    from repvgg.io.hub import HUB_PREFIX, cached_file

    return [cached_file(r) if isinstance(r, str) and r.startswith(HUB_PREFIX) else r for r in reads]


def write_json_out(args: argparse.Namespace, data: Any, reads: list[Any]) -> None:
    """Write ``data`` to ``--json-out``, checked again against ``reads`` (inputs found while the command ran)."""
    if args.json_out:
        check_json_out(args, reads)
        write_json(args.json_out, data)

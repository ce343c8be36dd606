"""What a subcommand prints: one JSON document with ``--json`` (every subcommand), else its tables and prose."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_json_flag", "emit", "emit_error"]


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout (machine-readable) instead of tables and prose")


def emit(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    """Print ``data`` as JSON when ``--json`` was given or there is no human form, else ``text``."""
    if getattr(args, "json", False) or text is None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def emit_error(args: argparse.Namespace, message: str, status: int) -> None:
    """With ``--json``, a failed command's one JSON document: ``{"error": ..., "exit_status": ...}``."""
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps({"error": message, "exit_status": status}) + "\n")

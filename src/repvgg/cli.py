"""The ``repvgg`` command line: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="table of every registered model: parameters and multiply-adds")
    p.add_argument("--img-size", type=int, default=224, help="input resolution for multiply-adds (default 224)")
    p.add_argument("--models", default=None, help="comma-separated model names (default: all registered)")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from repvgg.complexity import model_complexity
    from repvgg.registry import get_spec, list_models
    from repvgg.report import markdown_table

    names = args.models.split(",") if args.models else list_models()
    rows = []
    for name in names:
        get_spec(name)  # unknown names fail with close matches before any work
        c = model_complexity(name, img_size=args.img_size)
        spec = get_spec(name)
        rows.append([
            c.name,
            "-".join(str(d) for d in spec.depths),
            "/".join(f"{m:g}" for m in spec.width_multipliers),
            spec.groups,
            f"{c.params_train / 1e6:.2f}",
            f"{c.params_deploy / 1e6:.2f}",
            f"{c.macs_train / 1e9:.2f}",
            f"{c.macs_deploy / 1e9:.2f}",
        ])
    header = ["model", "depths", "a/b", "groups", "params train (M)", "params deploy (M)",
              f"GMACs train @{args.img_size}", f"GMACs deploy @{args.img_size}"]
    print(markdown_table(header, rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repvgg",
        description="RepVGG: train multi-branch, deploy a plain stack of 3x3 convs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_info(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"repvgg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"repvgg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

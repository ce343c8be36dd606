"""The ``repvgg`` command line: one module per subcommand, each parsing arguments and calling the library.

Each subcommand module defines ``add_parser(subparsers)``, which registers its parser and sets
``func`` to a function ``(args) -> exit code``. Exit statuses: 0 success, 1 the run failed
([`repvgg.errors.RunFailed`][repvgg.errors.RunFailed]: diverged, a conversion that does not match), 2 bad input or
usage, 130 interrupted (a resumable checkpoint was saved).
"""

from __future__ import annotations

import argparse
import gc
import functools
import importlib
import logging
import sys
import traceback
from typing import Sequence, cast

from repvgg import __version__
from repvgg.cli.flags import HelpFormatter, Parser, UsageError
from repvgg.cli.output import add_json_flag, emit_error, error_text
from repvgg.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_FAILED, RunFailed
from repvgg.limits import out_of_memory

__all__ = ["main", "run_and_exit", "build_parser", "EXIT_OK", "EXIT_RUN_FAILED", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED"]

#: Optional dependencies and the extra that installs each (the core needs torch, torchvision, safetensors,
#: pyyaml and tqdm only).
OPTIONAL_MODULES = {"timm": "train", "sklearn": "train", "matplotlib": "train", "pycocotools": "train",
                    "onnx": "deploy", "onnxruntime": "deploy", "onnxscript": "deploy", "openvino": "deploy",
                    "huggingface_hub": "hub", "tensorboard": "track", "fastapi": "serve", "uvicorn": "serve",
                    "prometheus_client": "serve", "multipart": "serve", "python_multipart": "serve",
                    "ray": "scale"}

#: Subcommand modules under ``repvgg.cli``, in the order ``--help`` lists them.
_COMMANDS = ["train", "evaluate", "predict", "convert", "quantize", "ablate", "info", "bench", "export", "seg_train",
             "seg_eval", "det_train", "det_eval", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="repvgg",
        description="RepVGG: train multi-branch, deploy a plain stack of 3x3 convs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--version", action="version", version=f"repvgg {__version__}")
    # argparse only calls parser_class(**kwargs): a partial fixing the formatter is as good as a subclass
    command_parser = cast("type[Parser]", functools.partial(Parser, formatter_class=HelpFormatter))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=command_parser)
    for name in _COMMANDS:
        importlib.import_module(f"repvgg.cli.{name}").add_parser(sub)
    for subparser in sub.choices.values():
        add_json_flag(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        command = next((a for a in argv if not a.startswith("-")), None)
        return _fail(argparse.Namespace(command=command, verbose=False, json="--json" in argv), err, EXIT_BAD_INPUT)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except RunFailed as err:
        return _fail(args, err, EXIT_RUN_FAILED)
    except (MemoryError, RuntimeError) as err:  # an allocator's failure is the machine's limit, not a bug
        if (oom := out_of_memory(err)) is None:
            raise
        return _fail(args, oom, EXIT_RUN_FAILED)
    except (ValueError, OSError) as err:  # bad input, or a file the user named that cannot be read
        return _fail(args, err, EXIT_BAD_INPUT)
    except ModuleNotFoundError as err:
        extra = OPTIONAL_MODULES.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        return _fail(args, ValueError(f"{err.name} is not installed; `repvgg {args.command}` needs "
                                      f"pip install 'repvgg[{extra}]'"), EXIT_BAD_INPUT)
    except KeyboardInterrupt as err:
        print(f"repvgg {args.command}: interrupted", file=sys.stderr)
        emit_error(args, str(err) or "interrupted", EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED


def run_and_exit() -> None:
    """The ``repvgg`` command (and ``python -m repvgg``): [`main`][repvgg.cli.main], then exit with its status. The
    objects left are frozen out of the garbage collector first: the process ends next, and the final collection over
    everything PyTorch created would add about a second to every command."""
    status = main()
    gc.freeze()
    sys.exit(status)


def _fail(args: argparse.Namespace, err: BaseException, status: int) -> int:
    """One line for the user (and with ``--json`` one JSON document on stdout); the traceback too with ``-v``.
    Other exceptions are bugs and keep their traceback."""
    if args.verbose:
        traceback.print_exception(err, file=sys.stderr)
    message = error_text(err)
    print(f"repvgg {args.command or ''}: error: {message}".replace("repvgg : ", "repvgg: "), file=sys.stderr)
    emit_error(args, message, status)
    return status

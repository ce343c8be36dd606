"""The one way this package reads a PyTorch file: ``torch.load(weights_only=True)``, errors in plain words.

Only tensors and plain data are unpickled; a file that needs code to unpickle (a pickled class or
function, the classic payload) is refused, and the message never suggests ``weights_only=False``.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from repvgg.io.formats import require_kind

__all__ = ["safe_load"]

_UNSUPPORTED = re.compile(r"Unsupported (?:global|operand)[^.\n]*?(?:GLOBAL )?([\w.]+)")


def safe_load(path: str | os.PathLike[str], *, what: str = "a PyTorch weights file", mmap: bool = False) -> Any:
    """The contents of the torch file ``path`` (on the CPU), read without running any pickled code; with ``mmap``
    its tensors are mapped from the file instead of read (to look at the rest).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not a PyTorch file ([`require_kind`][repvgg.io.formats.require_kind]: an ONNX model, an
            image, safetensors, random bytes), needs code to unpickle (refused), or is truncated or nested beyond
            what can be read; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    require_kind(path, ("torch",), what)
    try:
        return _load_by_content(path, mmap)
    except pickle.UnpicklingError as err:
        found = _UNSUPPORTED.search(str(err))
        detail = f" (it pickles {found[1]})" if found else ""
        raise ValueError(f"{path} needs code to unpickle{detail}, which is refused: only tensors and plain data "
                         "are read. Re-save its state dict (or safetensors) where the file was made.") from None
    except RecursionError:
        raise ValueError(f"{path} nests its data too deeply to be read as {what}") from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not read {path} as {what} (truncated or corrupt?): {first}") from None


def _load_by_content(path: Path, mmap: bool) -> Any:
    """``torch.load`` of what the file holds: given a name, torch decides by its suffix (a ``.safetensors`` name is
    read as safetensors), so it gets the open file; ``mmap``, which needs the name, is used where the name cannot
    mislead it."""
    if mmap and not path.name.endswith(".safetensors"):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    with open(path, "rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=True)

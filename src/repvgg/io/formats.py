"""What a file is, decided by its content: the one check every reader of model files goes through.

A file's name says what its writer meant, not what it holds: an ``.ONNX`` written by ``export``, a ``model.pt``
that is really safetensors, a ``last.pt`` of random bytes and a PNG passed as the model are all told apart by
their first bytes ([`identify_file`][repvgg.io.formats.identify_file]), and
[`require_kind`][repvgg.io.formats.require_kind] turns a file of the wrong kind into a message that says what it is and
what was expected.

* ``safetensors``: an 8-byte little-endian header length, then that many bytes of a JSON object;
* ``torch``: a zip archive (``torch.save`` since PyTorch 1.6) or a legacy pickle stream;
* ``onnx``: a protocol-buffer ``ModelProto``, which starts with one of its fields (``ir_version`` first, as every
  exporter writes it); the parser confirms it (`repvgg.io.card.read_onnx_metadata`);
* ``image``: PNG, JPEG, GIF, BMP, TIFF or WebP, named so a mix-up of arguments is clear;
* ``empty`` and ``unknown``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

__all__ = ["FileKind", "MODEL_KINDS", "identify_file", "require_kind"]

FileKind = Literal["safetensors", "torch", "onnx", "image", "empty", "unknown"]

#: The kinds of model file this package reads.
MODEL_KINDS: tuple[FileKind, ...] = ("safetensors", "torch", "onnx")

_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
#: The first byte of a ModelProto field as exporters write them: ir_version (1), producer_name (2), graph (7),
#: opset_import (8).
_ONNX_FIRST_BYTES = (0x08, 0x12, 0x3A, 0x42)
_DESCRIPTIONS = {"safetensors": "a safetensors file", "torch": "a PyTorch file", "onnx": "an ONNX model",
                 "image": "an image", "empty": "an empty file",
                 "unknown": "not a file this package reads (neither safetensors, PyTorch nor ONNX; truncated or "
                            "corrupt?)"}


def identify_file(path: str | os.PathLike[str]) -> FileKind:
    """The kind of the file at ``path``, from its first bytes (the name plays no part).

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(16)
        size = os.fstat(handle.fileno()).st_size
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04") or (head[0] == 0x80 and 2 <= head[1] <= 5):
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(_IMAGE_MAGIC) or (head.startswith(b"RIFF") and head[8:12] == b"WEBP"):
        return "image"
    if head[0] in _ONNX_FIRST_BYTES:
        return "onnx"
    return "unknown"


def require_kind(path: str | os.PathLike[str], allowed: tuple[FileKind, ...], what: str) -> FileKind:
    """The kind of ``path`` if it is one of ``allowed``; otherwise a ValueError saying what the file is and what
    ``what`` (e.g. ``"a weights file"``) must be.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is of another kind.
    """
    kind = identify_file(path)
    if kind not in allowed:
        expected = " or ".join(_DESCRIPTIONS[k] for k in allowed)
        hint = " (use it with `repvgg predict`, which runs ONNX files)" if kind == "onnx" else ""
        raise ValueError(f"{path} is {_DESCRIPTIONS[kind]}{hint}; {what} must be {expected}")
    return kind

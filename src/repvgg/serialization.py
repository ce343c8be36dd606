"""Serialisation helpers every layer uses: dataclass <-> dict round trips and the one atomic file write.

Nothing here imports the rest of the package, so the model spec, the run configs and the file formats
can all build on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping, TypeVar

__all__ = ["DictMixin", "atomic_write", "write_json", "write_text"]

D = TypeVar("D", bound="DictMixin")


class DictMixin:
    """JSON-friendly dict round trips for dataclasses (specs and configs stored in checkpoints)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[D], data: Mapping[str, Any]) -> D:
        """Build from a mapping (``-`` or ``_`` in keys); unknown keys are an error naming the known ones.

        Nothing is evaluated: values are passed to the dataclass as they are.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
        return cls(**normalised)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A failure or an interrupt while writing removes the temporary file and leaves ``path`` as it was
    (the previous checkpoint, weights file or metrics stay intact). The parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")

"""Files every layer writes: dataclass <-> dict round trips, the one output rule and the one atomic write.

Nothing here imports the rest of the package (but its errors and limits), so the model spec, the run configs and the
file formats can all build on it.

* [`check_output_path`][repvgg.serialization.check_output_path] is the output rule of every command: an existing file is
  replaced only when the user asked (``--overwrite``), and a file the command reads is never replaced, not even then.
* [`atomic_write`][repvgg.serialization.atomic_write] writes beside the target and renames: an interrupt or a failure
  (no space left, a file-size limit, a permission) leaves the previous file as it was and raises
  [`WriteFailed`][repvgg.errors.WriteFailed] naming the file and the cause. New files get the user's umask, like any
  other program's.
* An output that is a symbolic link is written through: its target gets the new content and the link stays
  ([`output_target`][repvgg.serialization.output_target]), as a shell redirection does; the rule above applies to the
  target.
* [`write_csv`][repvgg.serialization.write_csv] writes spreadsheet-safe CSV: a cell that a spreadsheet would run as a
  formula (starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) is written with a leading ``'``
  (OWASP's advice).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

from repvgg.errors import WriteFailed
from repvgg.limits import brief

__all__ = ["DictMixin", "atomic_write", "check_output_path", "commit_staged", "csv_cell", "csv_text", "image_outputs",
           "input_file", "make_folder", "option_names", "output_target", "readable_text", "scratch_folder",
           "staging_folder", "write_csv", "write_failed", "write_json", "write_text"]

D = TypeVar("D", bound="DictMixin")

PathLike = str | os.PathLike[str]


class DictMixin:
    """JSON-friendly dict round trips for dataclasses (specs and configs stored in checkpoints)."""

    # Every user is a dataclass: declared so type checkers accept it where a dataclass is expected.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[D], data: Mapping[str, Any]) -> D:
        """Build from a mapping (``-`` or ``_`` in keys); unknown keys are an error naming the known ones.

        Nothing is evaluated: values are passed to the dataclass as they are.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        normalised = option_names(data, cls.__name__)
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {brief(unknown)}; known fields: {sorted(known)}")
        return cls(**normalised)


def option_names(data: Mapping[Any, Any], what: str) -> dict[str, Any]:
    """``data`` with its keys as field names (``batch-size`` is ``batch_size``). A key that is not text, or one field
    given twice in two spellings, is a ValueError naming ``what``: which one should win is the user's to say."""
    names: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ValueError(f"{what}: the key {brief(key)} is not a name; keys are option names such as "
                             "batch_size (quote a key that should be text)")
        name = key.replace("-", "_")
        if name in names:
            raise ValueError(f"{what} gives {name} twice, as {spelled[name]!r} and {key!r}; keep one")
        names[name], spelled[name] = value, key
    return names


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def output_target(path: PathLike) -> Path:
    """Where writing ``path`` puts the bytes: the file itself, or the target of a symbolic link (links are written
    through, never replaced by a file)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_output_path(path: PathLike, *, reads: Iterable[PathLike | None] = (), overwrite: bool = False,
                      option: str = "the output", suffixes: tuple[str, ...] = (),
                      writes: Iterable[PathLike] = ()) -> Path:
    """The output rule of every command, checked before any work: return ``path`` if it may be written.

    ``reads`` are the files and folders the command reads (weights, a config file, a data folder). A path
    that is one of those files, or lies inside one of those folders, is refused even with ``overwrite``;
    an existing file is replaced only with ``overwrite``; a folder is never an output file. A symbolic link is
    judged by its target, which is what gets written ([`output_target`][repvgg.serialization.output_target]).
    ``suffixes`` (e.g. ``(".onnx",)``) are the names the output may end with, in any case, so a file is named for what
    it holds. ``writes`` are the command's other outputs: two outputs of one command never land on one file.

    Raises:
        ValueError: naming ``option`` (e.g. ``--json-out``) and what to do instead.
    """
    path = Path(path)
    resolved = Path(os.path.realpath(path))  # realpath: a link loop among the inputs is no error here
    for other in writes:
        if Path(os.path.realpath(other)) == resolved:
            raise ValueError(f"{option} {path} is also {other}, another output of this command; give each output "
                             "its own file")
    for read in reads:
        if read is None:
            continue
        source = Path(os.path.realpath(read))
        if source.is_dir() and _inside(resolved, source):
            raise ValueError(f"{option} {path} is inside {read}, which this command reads; write it somewhere "
                             "else (inputs are never written to, not even with --overwrite)")
        if resolved == source:
            raise ValueError(f"{option} {path} is the input file {read} of this command; write to another file "
                             "(inputs are never replaced, not even with --overwrite)")
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; name a file")
    _refuse_special(path, f"{option} {path}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {path} must end in {' or '.join(suffixes)} (a file is named for what it holds)")
    if path.exists() and not overwrite:
        link = f" (a link to {output_target(path)})" if path.is_symlink() else ""
        raise ValueError(f"{option} {path}{link} already exists; pass --overwrite to replace it, or choose another "
                         "name")
    return path


def image_outputs(paths: Sequence[str], folder: PathLike, *, option: str, overwrite: bool = False,
                  reads: Iterable[PathLike | None] = (), writes: Iterable[PathLike] = ()) -> dict[str, Path]:
    """Where a command writes one PNG per input image into ``folder`` (``--draw DIR``, ``--masks DIR``):
    ``FOLDER/<stem>.png`` (``<stem>-2.png``, ... when two inputs share a stem), every one checked by the output rule
    before anything is written: never one of ``paths``, nor inside a folder of ``reads`` (the command's input folders,
    whose next reading would take the PNGs for images), nor another output in ``writes``.

    Raises:
        ValueError: ``folder`` is a file, or a target may not be written; naming ``option``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file; name a folder for the PNG files")
    targets: dict[str, Path] = {}
    taken: set[str] = set()
    others = list(writes)
    for path in paths:
        stem, n = Path(path).stem or "image", 1
        name = f"{stem}.png"
        while name in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name)
        targets[path] = check_output_path(folder / name, reads=[*paths, *reads], overwrite=overwrite, option=option,
                                          writes=others)
    return targets


def input_file(path: PathLike, what: str) -> Path:
    """``path`` if it is a file to read ``what`` from: a missing one is a FileNotFoundError, a folder, a pipe, a
    device or a socket a ValueError saying which (a pipe would block the read, a device would never end)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what} {path} is a folder; name a file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {path} is not a regular file (a pipe, a device or a socket); name a file")
    return path


def make_folder(path: PathLike) -> Path:
    """Create the folder ``path`` and its parents where missing, and return it. A dangling symbolic link or a file in
    the way is a ValueError saying so (the operating system says only "File exists").
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        blocker = Path(err.filename) if err.filename else path
        if blocker.is_symlink():
            raise ValueError(f"{blocker} is a dangling symbolic link (to {os.readlink(blocker)}, which does not "
                             "exist); remove the link, or create the folder it points to") from None
        raise ValueError(f"{blocker} is a file, not a folder; move it, or choose another place") from None
    return path


def _refuse_special(path: Path, what: str) -> None:
    """A device, a pipe or a socket (or a link to one) is never an output: replacing it with a file (``/dev/null``
    under ``--overwrite``) would break whatever uses it."""
    try:
        mode = path.stat().st_mode  # follows links: /dev/stdout is judged by what it leads to
    except OSError:  # not there (or not reachable): a new file
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ValueError(f"{what} is not a regular file (a device, a pipe or a socket), which is never written or "
                         "replaced; name a file")


def _user_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_size_limit() -> int | None:
    """This process's file-size limit in bytes (``ulimit -f``), ``None`` when there is none."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else int(limit)


def write_failed(path: PathLike, err: BaseException) -> WriteFailed:
    """The error for a file that could not be written: the file, the cause in words, and what is left."""
    path = Path(path)
    code = getattr(err, "errno", None)
    limit = _file_size_limit()
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    except OSError:
        free = None
    if code == errno.ENOSPC or (code is None and free is not None and free < 64 * 2**20):
        cause = f"no space left on the device ({'?' if free is None else f'{free / 2**20:.0f} MiB'} free)"
    elif code == errno.EFBIG or (code is None and limit is not None):
        cause = f"the file-size limit of this process (ulimit -f: {limit} bytes)"
    elif code in (errno.EACCES, errno.EPERM):
        cause = "permission denied"
    elif code == errno.EROFS:
        cause = "read-only file system"
    else:
        cause = str(err) or type(err).__name__
    return WriteFailed(f"could not write {path}: {cause}; any previous {path.name} is left as it was")


@contextlib.contextmanager
def atomic_write(path: PathLike, *, errors: tuple[type[BaseException], ...] = (OSError,)) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A failure or an interrupt while writing removes the temporary file and leaves ``path`` as it was
    (the previous checkpoint, weights file or metrics stay intact). ``errors`` raised while writing (by
    default ``OSError``: no space, a file-size limit, permissions) become [`WriteFailed`][repvgg.errors.WriteFailed]
    naming the file and the cause. The parent folder is created; the file gets the user's umask.
    """
    _refuse_special(Path(path), "the output")
    path = output_target(path)
    tmp: Path | None = None
    try:
        make_folder(path.parent)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        _take_mode(tmp, path)
        os.replace(tmp, path)
    except errors as err:
        raise write_failed(path, err) from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _take_mode(new: Path, path: Path) -> None:
    """Give ``new`` the mode it will have as ``path``: a replaced file keeps its own (a private 0600 file stays
    private), a new one gets the user's umask (not the 0600 of a temporary file)."""
    os.chmod(new, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_user_umask())


@contextlib.contextmanager
def staging_folder(path: PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` for files that are checked before they are moved into place (with
    ``os.replace``, inside the block, through [`commit_staged`][repvgg.serialization.commit_staged]); removed on the way
    out. A write failing in it is a [`WriteFailed`][repvgg.errors.WriteFailed] naming ``path``."""
    path = output_target(path)
    try:
        make_folder(path.parent)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging:
            yield Path(staging)
    except OSError as err:
        raise write_failed(path, err) from err


def scratch_folder(staging: PathLike) -> Path:
    """A folder inside a [`staging_folder`][repvgg.serialization.staging_folder] for the files a check makes besides
    the one to be written (a float32 reference, a file timed at another size): named at random, so that no name the
    written file may have (``fp32.onnx``) is one of theirs, and none of them is moved into place for it."""
    return Path(tempfile.mkdtemp(dir=staging, prefix=".scratch-"))


def commit_staged(staged: PathLike, path: PathLike) -> Path:
    """Move a file checked in a [`staging_folder`][repvgg.serialization.staging_folder] into place as ``path`` (through
    a link to its target), in one rename; a side file (an ONNX model's external weights) goes beside it under its own
    name."""
    staged, target = Path(staged), output_target(path)
    destination = target if staged.name == Path(path).name else target.parent / staged.name
    try:
        _take_mode(staged, destination)
        os.replace(staged, destination)
    except OSError as err:
        raise write_failed(destination, err) from err
    return destination


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def readable_text(text: str) -> str:
    """``text`` as valid Unicode: bytes of a file name that are not UTF-8 (decoded by Python as lone surrogates) are
    written as escapes (``\\xff``), so the name can be printed and saved as text."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def csv_cell(value: Any) -> str:
    """``value`` as a CSV cell a spreadsheet shows as text: a leading ``'`` before ``=``, ``+``, ``-``, ``@``, a tab
    or a carriage return (OWASP's defence against formula injection), numbers left as they are, file-name bytes that
    are not UTF-8 escaped ([`readable_text`][repvgg.serialization.readable_text])."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    text = readable_text(str(value))
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """``header`` and ``rows`` as CSV text, every text cell spreadsheet-safe
    ([`csv_cell`][repvgg.serialization.csv_cell])."""
    out = io.StringIO()
    writer = csv.writer(out)
    for row in [header, *rows]:
        writer.writerow([csv_cell(v) for v in row])
    return out.getvalue()


def write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write ``header`` and ``rows`` as CSV ([`csv_text`][repvgg.serialization.csv_text]), atomically."""
    return write_text(path, csv_text(header, rows))

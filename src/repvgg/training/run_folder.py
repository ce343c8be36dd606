"""The run folder: where a run writes, what it may replace, and what a resume must keep.

A run folder is self-locating: ``--resume DIR`` continues in ``DIR``, wherever it is now and whatever the
working directory; the checkpoint never decides where to write. The data and weights a run reads are
stored resolved (absolute) in its config, with what the user typed kept beside them, so a resume from
anywhere finds them; a resume needs no initial weights file (``last.pt`` holds the training state), and
a moved data folder is named again with ``--data``: it must be the same data (class names and image
counts), not the same string.

Resume is a continuation: a setting may change on resume only where the run can honour it from the step it
reached (the task's `changeable_on_resume`: the learning rate, the epochs, gradient
clipping, ...); the change is applied, logged and recorded in the config with that step (``resume_changes``, the
earlier value kept). Any other change (model, batch size, seed, recipe, augmentation, image size) is refused before
anything is written. ``--epochs`` may extend a run (the learning-rate schedule is then recomputed for the new total),
but never undo finished epochs or "continue" a finished run with nothing to do.

While a run works in its folder it holds the folder's lock (`lock_run_folder`): a second process aiming at the
same folder is refused, naming the holder; a lock left by a process that was killed is taken over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from repvgg.limits import brief
from repvgg.options import load_config_file
from repvgg.serialization import check_output_path, make_folder, write_failed

__all__ = ["RUN_FILES", "RUN_FOLDERS", "TENSORBOARD_FOLDER", "HUB_PREFIX", "LOCK_FILE", "LOOP_CHANGEABLE",
           "PER_INVOCATION", "check_checkpoint_belongs", "check_resumed_files", "check_continuation",
           "check_data_is_there", "check_run_folder", "check_same_data", "changed_fields", "data_identity",
           "locate_run", "lock_run_folder", "open_run_folder", "resolve_inputs", "resumable_file"]

logger = logging.getLogger(__name__)

#: The files a run writes into its folder; a folder holding any of them holds a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "deploy.safetensors",
             "curves.png", "predictions.png", "int8.onnx")
#: Where ``--tensorboard`` writes a run's logs, in its folder.
TENSORBOARD_FOLDER = "tensorboard"
#: The folders a run writes into its folder: replaced with the run's files.
RUN_FOLDERS = (TENSORBOARD_FOLDER,)
#: Config fields that concern one invocation only: never compared with the run's, never recorded.
PER_INVOCATION = ("output", "resume", "overwrite", "stop_after_steps", "config_file", "workers", "log_interval",
                  "tensorboard", "run_id", "resume_changes")
#: Config fields of every training job that a resume may change (applied and recorded); a task adds its own.
LOOP_CHANGEABLE = ("epochs", "lr", "momentum", "weight_decay", "clip_grad", "accumulation_steps", "device", "amp",
                   "deploy_from")
#: The lock file a running run holds in its folder.
LOCK_FILE = ".lock"
#: The most bytes a lock file holds (the holder's pid, host, command and start time): no more is ever read from it.
LOCK_SIZE = 400
#: Weights references that are not local paths.
HUB_PREFIX = "hf-hub:"


def new_run_from(command: str, path: str | Path | None = None) -> str:
    """How a refused resume may start a new run from a checkpoint's weights instead: ``repvgg train --weights``;
    the dense tasks' commands start from backbone weights only."""
    if command == "train":
        return f"start a new run from its weights with --weights {path or 'CHECKPOINT'} --output NEW"
    return f"start a new run with --output NEW (`repvgg {command}` starts from backbone weights only, not a whole " \
           "model's)"


def resumable_file(resume: str | Path, command: str = "train") -> Path:
    """The checkpoint ``--resume`` names: a run folder's ``last.pt``, or the file itself.

    Raises:
        FileNotFoundError: no checkpoint there, with what to do instead.
        ValueError: a checkpoint other than the folder's ``last.pt`` while that exists (resuming it would
            replace the newer state in ``last.pt``).
    """
    path = Path(resume)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        held = [name for name in RUN_FILES if (folder / name).exists()] if folder.is_dir() else []
        if held:
            raise FileNotFoundError(f"{folder} holds no last.pt: its run stopped before its first checkpoint, so "
                                    f"there is nothing to resume; start it again with --output {folder} --overwrite")
        raise FileNotFoundError(f"checkpoint not found: {path} (pass a run folder or its last.pt)")
    last = folder / "last.pt"
    if path.name != "last.pt" and last.is_file():
        raise ValueError(f"{path} is not the run's training state: a resume continues {last} and would replace it "
                         f"with an older state. To continue the run, resume from last.pt (--resume {folder}); or "
                         f"{new_run_from(command, path)}")
    return path


def locate_run(output: str | None, resume: str | None, default: Callable[[], Path], command: str = "train") -> Path:
    """The run folder: the resumed run's own folder, else ``output``, else ``default()``.

    Raises:
        ValueError: ``output`` names another folder than the resumed run's.
    """
    if resume:
        folder = resumable_file(resume, command).parent
        if output and Path(output).resolve() != folder.resolve():
            raise ValueError(f"--resume continues in the run's own folder {folder}, not in --output {output}; drop "
                             f"--output, or {new_run_from(command)}")
        return folder
    return Path(output) if output else default()


def check_run_folder(output: Path, *, resume: bool, overwrite: bool,
                     reads: Iterable[str | Path | None] = ()) -> list[Path]:
    """Refuse a run folder that would lose or mix up someone's files; return the files ``overwrite`` replaces.

    A folder holding a run is only written to when that run is resumed or the user asked to replace it
    (``overwrite``); a path that is a file is never a run folder; no file the run reads (``reads``: its
    data folder, initial weights, config file) is ever replaced or written into.
    """
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder; choose a folder for the run")
    existing = [output / name for name in (*RUN_FILES, *RUN_FOLDERS) if (output / name).exists()]
    if resume:  # the run's own files (e.g. its config.yaml given as --config) are continued, not replaced
        reads = [r for r in reads if r is not None and output.resolve() not in Path(r).resolve().parents]
    for name in RUN_FILES:  # every file the run writes: never an input, nor inside an input folder
        check_output_path(output / name, reads=reads, overwrite=True, option="the run file")
    if not existing or resume:
        return []
    if not overwrite:
        if not (output / "last.pt").exists():
            raise ValueError(f"{output} holds a run that stopped before its first checkpoint "
                             f"({', '.join(p.name for p in existing)}): there is nothing to resume. Replace it with "
                             "--overwrite, or choose another --output")
        holds = "a finished run" if (output / "summary.json").exists() else "a run"
        raise ValueError(f"{output} already holds {holds} ({', '.join(p.name for p in existing)}); continue it with "
                         f"--resume {output}, replace it with --overwrite, or choose another --output")
    return existing


@contextlib.contextmanager
def lock_run_folder(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock for the block: a second run aiming at the folder is refused, naming the holder.

    The lock is the operating system's (``flock`` on `LOCK_FILE`), so a process that is killed releases it
    with its last breath: its stale lock file is taken over, and the log says whose it was. A folder this call
    creates is removed again if the block leaves nothing but the lock in it (a run refused before its first write).

    Raises:
        ValueError: another process holds the folder's lock; its ``.lock`` is not a lock file (a link, a pipe, a
            folder, a file with other names or contents); the folder is a dangling link.
        WriteFailed: the folder or its lock file cannot be created.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: runs are not locked
        yield
        return
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file, not a folder; choose a folder for the run")
    created = not folder.exists()
    lock = folder / LOCK_FILE
    try:
        make_folder(folder)
        fd = _locked(lock, fcntl)
    except OSError as err:
        raise write_failed(lock, err) from err
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # before unlocking: a process that opens the path now gets a new file, and the lock
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if the run wrote nothing


def _locked(lock: Path, fcntl: Any) -> int:
    """An open descriptor of ``lock`` holding its exclusive lock, with this process named in it."""
    while True:
        fd = _open_lock(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, LOCK_SIZE).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ValueError(f"{lock.parent} is in use by another run ({holder}); wait until it ends, or choose "
                             "another --output") from None
        try:
            same = os.fstat(fd).st_ino == os.lstat(lock).st_ino  # not a file its last holder has just removed
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        stale = os.read(fd, LOCK_SIZE).decode("utf-8", "replace").strip()
        if stale:
            logger.info("%s: taking over the lock of %s, which is no longer running", lock.parent, stale)
        os.ftruncate(fd, 0)
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:3]))
        text = f"pid {os.getpid()} on {socket.gethostname()}, `{command}`, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.pwrite(fd, text.encode()[:LOCK_SIZE - 1] + b"\n", 0)
        return fd


def _open_lock(lock: Path) -> int:
    """``lock`` opened for reading and writing, created if missing; only a regular file of this folder that no other
    name shares and that is no larger than a lock is taken: a link (to a file elsewhere, or dangling), a pipe, a
    folder or someone's file named ``.lock`` is refused, never followed, read or truncated."""
    try:  # O_NONBLOCK: a pipe named .lock would block the open (and the read) forever
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError:
        if lock.is_symlink():
            raise ValueError(f"{lock} is a symbolic link (to {os.readlink(lock)}), not a lock file; remove it "
                             "(the lock is never followed to another file)") from None
        if lock.is_dir():
            raise ValueError(f"{lock} is a folder, not a lock file; remove it, or choose another --output") from None
        raise
    info = os.fstat(fd)
    problem = ("is not a regular file (a pipe, a device or a socket)" if not stat.S_ISREG(info.st_mode) else
               f"has {info.st_nlink} names (a hard link to another file)" if info.st_nlink > 1 else
               f"holds {info.st_size} bytes, more than a lock does" if info.st_size > LOCK_SIZE else "")
    if problem:
        os.close(fd)
        raise ValueError(f"{lock} {problem}, so it is not this folder's lock file; remove it, or choose another "
                         "--output")
    return fd


def check_resumed_files(checkpoint: Mapping[str, Any], folder: Path, source: str, deploy_from: str) -> None:
    """Refuse a resume whose folder holds another run's files: ``config.yaml`` and ``best.pt`` must be the run of
    ``checkpoint`` (its ``run_id``), and ``--deploy-from best`` needs the run's ``best.pt`` once an epoch is done."""
    from repvgg.io.safe_load import safe_load

    if (folder / "config.yaml").is_file():
        check_checkpoint_belongs(checkpoint, load_config_file(folder / "config.yaml"), folder, source)
    best = folder / "best.pt"
    if best.is_file():  # its weights are mapped, not read: only its config is looked at
        check_checkpoint_belongs(safe_load(best, what="a training checkpoint", mmap=True), checkpoint["config"],
                                 folder, str(best))
    elif deploy_from == "best" and int(checkpoint["epoch"]) >= 1:
        raise ValueError(f"--deploy-from best converts the run's best.pt, which {folder} no longer holds; resume with "
                         "--deploy-from last, or put the run's best.pt back")


def check_checkpoint_belongs(checkpoint: Mapping[str, Any], recorded: Mapping[str, Any], folder: Path,
                             source: str) -> None:
    """Refuse to resume a checkpoint that is not the training state of the run in ``folder`` (another run's
    ``last.pt`` copied in): it must carry the ``run_id`` of the folder's ``config.yaml`` (``recorded``; for runs
    older than run ids: its model, seed and batch size)."""
    saved = checkpoint.get("config") or {}
    if recorded.get("run_id") and saved.get("run_id"):
        keys: tuple[str, ...] = ("run_id",)
    else:
        keys = tuple(k for k in ("model", "backbone", "seed", "batch_size") if k in recorded or k in saved)
    differ = [k for k in keys if recorded.get(k) != saved.get(k)]
    if differ:
        shown = ", ".join(f"{k} {brief(saved.get(k), 40)} (config.yaml: {brief(recorded.get(k), 40)})"
                          for k in differ)
        raise ValueError(f"{source} is not the training state of the run in {folder}: it has {shown}. Put the run's "
                         f"own last.pt back, or {new_run_from(str(checkpoint.get('task') or 'train'), source)}")


def open_run_folder(output: Path, replaced: Iterable[Path], config: Any) -> None:
    """Create the run folder, remove the files ``--overwrite`` replaces, and write ``config.yaml`` (the first write
    of a run, once everything is checked)."""
    try:
        make_folder(output)
        for path in replaced:
            logger.info("--overwrite: removing %s", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # the replaced run's TensorBoard logs: kept, they would mix with this run's
            else:
                path.unlink()
    except OSError as err:
        raise write_failed(output, err) from err
    config.save(output / "config.yaml")


def _is_local(value: Any) -> bool:
    """A path on this machine (not a hub reference, nor the generated segmentation data)."""
    return isinstance(value, str) and not value.startswith(HUB_PREFIX) and value != "synthetic"


def _resolved(value: str) -> str:
    return str(Path(value).expanduser().resolve())


def resolve_inputs(config: Any, fields: Iterable[str]) -> tuple[Any, dict[str, str]]:
    """``config`` with the input paths in ``fields`` made absolute, and what was typed for each.

    A resolved path that no longer exists is left for the task to report (a resume does not need its
    initial weights).
    """
    given = {f: getattr(config, f) for f in fields if _is_local(getattr(config, f))}
    resolved = {f: _resolved(v) for f, v in given.items()}
    return config.updated(**resolved), given


def check_data_is_there(config: Any, checkpoint: Mapping[str, Any]) -> None:
    """A resumed run's data folder, as the run recorded it, must still be there (or be named anew with --data)."""
    data = getattr(config, "data", None)
    if _is_local(data) and data == checkpoint["config"].get("data") and not Path(data).exists():
        raise FileNotFoundError(f"the run's data folder {data} is not there any more; if it moved, name its new "
                                "place with --data (it is checked to hold the same classes and images)")


def check_continuation(checkpoint: Mapping[str, Any], config: Any, *, changeable: Iterable[str],
                       paths: Iterable[str], output: Path, source: str) -> Any:
    """``config`` as the continuation of the run in ``checkpoint``, or a refusal (nothing is written yet).

    A field left ``None`` ("derive it") takes the run's value. A field that differs from the run's is applied if it
    is in ``changeable`` (logged, and recorded in ``resume_changes`` with the step it takes effect at and the earlier
    value); any other difference is refused, naming the fields (those in ``paths`` compared resolved; the data is
    compared by its identity, not its path). ``epochs`` may grow, but not undo finished epochs, and a finished run
    needs a larger ``epochs`` to have anything to continue.
    """
    saved, changeable = checkpoint["config"], set(changeable)
    config, changed = changed_fields(saved, config, paths=paths, skip=("data",))
    refused = [k for k in changed if k not in changeable]
    if refused:
        raise ValueError(f"{source} was trained with other "
                         + ", ".join(f"{k} ({brief(saved.get(k), 40)}, not {brief(getattr(config, k), 40)})"
                                     for k in refused)
                         + "; a resume continues the same run, where only "
                         + ", ".join(sorted(changeable)) + " may change: resume without changing the others, or "
                         + new_run_from(str(checkpoint.get("task") or "train")))
    _check_epochs(checkpoint, config, output)
    step, epoch = int(checkpoint["global_step"]), int(checkpoint["epoch"])
    # another data folder (a moved one) is checked by its identity (check_same_data), and recorded like a change
    data = getattr(config, "data", None)
    moved = ["data"] if saved.get("data") is not None and data is not None \
        and _comparable("data", saved["data"], paths) != _comparable("data", data, paths) else []
    changes = [{"field": k, "was": saved.get(k), "now": _comparable(k, getattr(config, k), paths), "epoch": epoch,
                "step": step} for k in [*changed, *moved]]
    for change in changes:
        logger.info("resume: %s changes from %s to %s at step %d (epoch %d)%s; config.yaml records the change",
                    change["field"], change["was"], change["now"], step, epoch,
                    " (it must hold the class names and image counts the run was trained on)"
                    if change["field"] in moved else "")
    return config.updated(run_id=saved.get("run_id"),
                          resume_changes=[*saved.get("resume_changes", []), *changes])


def changed_fields(saved: Mapping[str, Any], config: Any, *, paths: Iterable[str],
                   skip: Iterable[str] = ()) -> tuple[Any, list[str]]:
    """``config`` with the fields it leaves ``None`` ("derive it") taken from a run's ``saved`` configuration, and
    the fields in which it still differs from it: those that concern the run (not `PER_INVOCATION`, nor ``skip``),
    the ``paths`` compared resolved."""
    names = [f for f in config.to_dict() if f not in PER_INVOCATION and f not in set(skip)]
    config = config.updated(**{k: saved[k] for k in names if getattr(config, k) is None and saved.get(k) is not None})
    return config, [k for k in names
                    if k in saved and _comparable(k, saved[k], paths) != _comparable(k, getattr(config, k), paths)]


def _comparable(key: str, value: Any, paths: Iterable[str]) -> Any:
    if key in set(paths) and _is_local(value):
        return _resolved(value)
    return list(value) if isinstance(value, tuple) else value


def _check_epochs(checkpoint: Mapping[str, Any], config: Any, output: Path) -> None:
    saved = checkpoint["config"]
    done, mid_epoch = int(checkpoint["epoch"]), int(checkpoint["step_in_epoch"]) > 0
    finished = (output / "summary.json").is_file() and done >= int(saved.get("epochs", done))
    if finished and config.epochs <= done:
        raise ValueError(f"{output} already finished its {done} epoch(s); there is nothing to continue. To train "
                         f"longer, pass --epochs N with N > {done} (the learning-rate schedule is then recomputed "
                         "for N epochs)")
    if config.epochs < done or (config.epochs == done and mid_epoch):
        raise ValueError(f"{output} has trained {done} epoch(s){' and part of the next' if mid_epoch else ''}; "
                         f"--epochs {config.epochs} would leave them out: pass --epochs {done + 1} or more")


def data_identity(classes: Sequence[str], train_images: int, val_images: int) -> dict[str, Any]:
    """What makes data the same data wherever it lies (recorded in checkpoints): class names and image counts."""
    return {"classes": list(classes), "images": {"train": train_images, "val": val_images}}


def check_same_data(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], data: str | None,
                    source: str) -> None:
    """Refuse resuming on other data: class names and image counts must be those the run was trained on."""
    if recorded is None:  # a checkpoint from before data identities were recorded
        return
    if dict(recorded) != dict(current):
        def describe(identity: Mapping[str, Any]) -> str:
            classes = list(identity.get("classes", []))
            shown = f"{classes[:5]}{'...' if len(classes) > 5 else ''}"
            return f"{len(classes)} classes {shown}, images {identity.get('images')}"

        raise ValueError(f"{data or 'the data'} is not the data {source} was trained on: it has "
                         f"{describe(current)}, the run had {describe(recorded)}; name the run's data with --data")

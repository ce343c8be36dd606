"""The run folder: where a run writes, what it may replace, and what a resume must keep.

A run folder is self-locating: ``--resume DIR`` continues in ``DIR``, wherever it is now and whatever the
working directory; the checkpoint never decides where to write. The data and weights a run reads are
stored resolved (absolute) in its config, with what the user typed kept beside them, so a resume from
anywhere finds them; a resume needs no initial weights file (``last.pt`` holds the training state), and
a moved data folder is named again with ``--data``: it must be the same data (class names and image
counts), not the same string.

Resume is a continuation: what would break it (model, batch size, seed, data, image size) is refused
before anything is written; ``--epochs`` may extend a run (the learning-rate schedule is then recomputed
for the new total), but never undo finished epochs or "continue" a finished run with nothing to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

from repvgg.serialization import check_output_path

__all__ = ["RUN_FILES", "HUB_PREFIX", "locate_run", "check_run_folder", "resolve_inputs", "check_continuation",
           "check_data_is_there", "check_same_data", "data_identity", "resumable_file"]

logger = logging.getLogger(__name__)

#: The files a run writes into its folder; a folder holding any of them holds a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "deploy.safetensors",
             "curves.png", "predictions.png", "int8.onnx")
#: Config fields that run on every kind of job and decide the data order and the steps: never changed by a resume.
LOOP_FIXED = ("batch_size", "seed")
#: Weights references that are not local paths.
HUB_PREFIX = "hf-hub:"


def resumable_file(resume: str | Path) -> Path:
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
                         f"with an older state. To continue the run, resume from last.pt (--resume {folder}); to "
                         f"start a new run from {path.name}'s weights, use --weights {path}")
    return path


def locate_run(output: str | None, resume: str | None, default: Callable[[], Path]) -> Path:
    """The run folder: the resumed run's own folder, else ``output``, else ``default()``.

    Raises:
        ValueError: ``output`` names another folder than the resumed run's.
    """
    if resume:
        folder = resumable_file(resume).parent
        if output and Path(output).resolve() != folder.resolve():
            raise ValueError(f"--resume continues in the run's own folder {folder}, not in --output {output}; drop "
                             "--output, or start a new run from the checkpoint's weights with --weights")
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
    existing = [output / name for name in RUN_FILES if (output / name).exists()]
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


def check_continuation(checkpoint: Mapping[str, Any], config: Any, *, fixed: Iterable[str], paths: Iterable[str],
                       output: Path, source: str) -> Any:
    """``config`` as the continuation of the run in ``checkpoint``, or a refusal (nothing is written yet).

    ``fixed`` are the fields that may not change (those in ``paths`` compared resolved); a fixed field left
    ``None`` ("derive it") takes the run's value. ``epochs`` may grow, but not undo finished epochs, and a
    finished run needs a larger ``epochs`` to have anything to continue.
    """
    saved, paths, fixed = checkpoint["config"], set(paths), (*LOOP_FIXED, *fixed)
    config = config.updated(**{k: saved[k] for k in fixed if getattr(config, k) is None and saved.get(k) is not None})

    def comparable(key: str, value: Any) -> Any:
        if key in paths and _is_local(value):
            return _resolved(value)
        return list(value) if isinstance(value, tuple) else value

    changed = [k for k in fixed if comparable(k, saved.get(k)) != comparable(k, getattr(config, k))]
    if changed:
        raise ValueError(f"{source} was trained with other "
                         + ", ".join(f"{k} ({saved.get(k)!r}, not {getattr(config, k)!r})" for k in changed)
                         + "; a resume continues the same run: resume without changing them, or start a new run "
                           "(--weights takes the checkpoint's weights)")
    done, mid_epoch = int(checkpoint["epoch"]), int(checkpoint["step_in_epoch"]) > 0
    finished = (output / "summary.json").is_file() and done >= int(saved.get("epochs", done))
    if finished and config.epochs <= done:
        raise ValueError(f"{output} already finished its {done} epoch(s); there is nothing to continue. To train "
                         f"longer, pass --epochs N with N > {done} (the learning-rate schedule is then recomputed "
                         "for N epochs)")
    if config.epochs < done or (config.epochs == done and mid_epoch):
        raise ValueError(f"{output} has trained {done} epoch(s){' and part of the next' if mid_epoch else ''}; "
                         f"--epochs {config.epochs} would leave them out: pass --epochs {done + 1} or more")
    if config.epochs != saved.get("epochs"):
        logger.info("continuing with %d epochs instead of %s: the learning-rate schedule is recomputed for %d "
                    "epochs from the step the run reached", config.epochs, saved.get("epochs"), config.epochs)
    return config


def data_identity(classes: Sequence[str], train: Sized, val: Sized) -> dict[str, Any]:
    """What makes data the same data wherever it lies (recorded in checkpoints): class names and image counts."""
    return {"classes": list(classes), "images": {"train": len(train), "val": len(val)}}


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

"""What a run tells its user: progress bars, durations, ``metrics.jsonl`` and why a diverged run stopped."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from repvgg.errors import TrainingDiverged
from repvgg.serialization import write_text

__all__ = ["LONG_PREPARATION", "diverged_error", "duration", "non_finite_state", "preparing", "progress_bar",
           "write_metrics"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Items from which a preparation (checking a data set's images, generating scenes) is announced and shown.
LONG_PREPARATION = 500


def duration(seconds: float) -> str:
    """``42 s`` or ``3.5 min``."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def diverged_error(what: str, where: str, output: Path, lr: float) -> TrainingDiverged:
    """The message of a diverged run: what went non-finite, where, and what is left to resume from."""
    last = output / "last.pt"
    kept = f"{last} is the last good checkpoint" if last.is_file() else "no checkpoint had been written yet"
    return TrainingDiverged(f"training diverged: {what} ({where}, learning rate {lr:.3g}); the run stopped and "
                            f"{kept}. Lower --lr and start again, or resume from the last good checkpoint.")


def non_finite_state(model: Any, ema: Any = None) -> list[str]:
    """What of ``model``'s (and its ``ema``'s, a timm ``ModelEmaV3``) weights and statistics is not finite, as ``"N
    tensor(s) of the model (e.g. NAME)"``: a checkpoint holding them could never be resumed, so none is written."""
    told = []
    for label, module in (("the model", model), ("the EMA", ema.module if ema is not None else None)):
        if module is not None:
            names = [k for k, v in module.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
            if names:
                told.append(f"{len(names)} tensor(s) of {label} (e.g. {names[0]})")
    return told


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on an interactive stderr, else ``None`` (the loop then logs every few steps)."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    return None


def preparing(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """``items`` as they are, with the work on them shown when there are
    [`LONG_PREPARATION`][repvgg.training.progress.LONG_PREPARATION] or more: a bar on an interactive stderr, else one
    log line. Only a process that logs (rank 0 of a distributed run) shows it."""
    long = total >= LONG_PREPARATION and logger.isEnabledFor(logging.INFO)
    bar = progress_bar(total, desc, long)
    if long and bar is None:
        logger.info("%s: %d ...", desc, total)
    try:
        for item in items:
            yield item
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()


def write_metrics(output: Path, history: list[dict[str, Any]]) -> None:
    """Write ``history`` as ``output/metrics.jsonl``, one JSON row per epoch, atomically."""
    write_text(output / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))

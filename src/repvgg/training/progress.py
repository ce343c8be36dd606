"""What a run tells its user: progress bars, durations, ``metrics.jsonl`` and why a diverged run stopped."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from repvgg.errors import TrainingDiverged
from repvgg.serialization import write_text

__all__ = ["diverged_error", "duration", "progress_bar", "write_metrics"]


def duration(seconds: float) -> str:
    """``42 s`` or ``3.5 min``."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def diverged_error(what: str, where: str, output: Path, lr: float) -> TrainingDiverged:
    """The message of a diverged run: what went non-finite, where, and what is left to resume from."""
    last = output / "last.pt"
    kept = f"{last} is the last good checkpoint" if last.is_file() else "no checkpoint had been written yet"
    return TrainingDiverged(f"training diverged: {what} ({where}, learning rate {lr:.3g}); the run stopped and "
                            f"{kept}. Lower --lr and start again, or resume from the last good checkpoint.")


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on an interactive stderr, else ``None`` (the loop then logs every few steps)."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    return None


def write_metrics(output: Path, history: list[dict[str, Any]]) -> None:
    """Write ``history`` as ``output/metrics.jsonl``, one JSON row per epoch, atomically."""
    write_text(output / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))

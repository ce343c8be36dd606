"""Experiment trackers: where a run's scalars go besides ``metrics.jsonl``.

A tracker is any object with ``log_step``, ``log_epoch`` and ``close`` ([`Tracker`][repvgg.training.trackers.Tracker]);
pass your own (Weights & Biases, MLflow, ...) to [`repvgg.training.engine.fit`][repvgg.training.engine.fit].
``--tensorboard`` adds `TensorBoardTracker` (PyTorch's ``SummaryWriter``; the ``track`` extra installs TensorBoard).
Only the main process of a distributed run tracks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

__all__ = ["Tracker", "TensorBoardTracker"]


class Tracker(Protocol):
    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        """Scalars of the training step ``step`` (global optimizer step): loss, accuracy, learning rate."""

    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None:
        """The epoch's row of ``metrics.jsonl`` (training and validation metrics, time, throughput)."""

    def close(self) -> None:
        """The run ended (finished, stopped or failed)."""


class TensorBoardTracker:
    """Step scalars under ``step/``, epoch curves under ``epoch/``, in ``log_dir`` (run folder/tensorboard)."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"step/{key}", value, step)

    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None:
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

"""Machinery shared by the training jobs (classification and segmentation).

What every run needs around its own loss and metrics: one entry point under ``torchrun``, the run
folder, per-epoch seeding and a data order that makes resume exact, signal handling that stops after
the current step, a progress bar, and the metrics file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from repvgg.serialization import write_text
from repvgg.training.distributed import DistContext, EpochSampler, all_reduce, init_distributed, shutdown_distributed

__all__ = [
    "StopRequest",
    "epoch_loader",
    "progress_bar",
    "run_distributed",
    "run_folder",
    "seed_epoch",
    "should_stop",
    "training_memory_format",
    "write_metrics",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def run_distributed(job: Callable[[DistContext], T], device: str) -> T:
    """Run ``job`` in the process group ``torchrun`` describes (or alone); only rank 0 logs.

    On success every process waits for the others (rank 0 still writes files) before leaving the group.
    """
    ctx = init_distributed(device)
    if not ctx.is_main:
        logging.getLogger("repvgg").setLevel(logging.WARNING)
    finished = False
    try:
        result = job(ctx)
        finished = True
        return result
    finally:
        shutdown_distributed(wait=finished)


def run_folder(output: str | None, resume: str | None, default: Callable[[], Path]) -> Path:
    """The run folder: ``output`` if given, else the resumed run's folder, else ``default()``."""
    if output:
        return Path(output)
    if resume:
        return Path(resume).parent if Path(resume).is_file() else Path(resume)
    return default()


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed Python, NumPy and torch from ``(seed, epoch, rank)`` (each epoch's augmentation is reproducible)."""
    value = (seed * 1_000_003 + epoch * 7919 + rank) % (2**31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def epoch_loader(dataset: Dataset, *, seed: int, epoch: int, ctx: DistContext, local_batch: int,
                 skip_steps: int, workers: int) -> DataLoader:
    """The training batches of one epoch: an order fixed by ``(seed, epoch)``, this process's shard,
    without the first ``skip_steps`` batches (already trained on before a resume)."""
    sampler = EpochSampler(len(dataset), seed=seed, epoch=epoch, rank=ctx.rank, world_size=ctx.world_size,
                           skip=skip_steps * local_batch)
    # The loader's own generator (worker seeds) keeps it from drawing on the global RNG, whose state is
    # what makes a mid-epoch resume exact.
    return DataLoader(dataset, batch_size=local_batch, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=ctx.device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed * 7919 + epoch))


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second signal aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("received %s: saving a resumable checkpoint after this step", signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def should_stop(stopper: StopRequest, steps_this_run: int, stop_after_steps: int | None) -> bool:
    """True on every process once any process got a signal or the step budget is spent."""
    local = stopper.requested or (stop_after_steps is not None and steps_this_run >= stop_after_steps)
    return float(all_reduce(torch.tensor([float(local)]), "max")) > 0


def training_memory_format(channels_last: bool, device: torch.device) -> torch.memory_format:
    """The memory format to train in: channels-last only where it was asked for and the device is CUDA.

    On CPUs without AVX-512, oneDNN's channels-last backward of a 1x1 convolution with 3 input channels
    (the stem's 1x1 branch) can spin forever and ignores signals; on CPU the contiguous format is also
    as fast for training, so channels-last there is declined with a log line, as ``--sync-bn`` is.
    """
    if not channels_last:
        return torch.contiguous_format
    if device.type != "cuda":
        logger.info("--channels-last applies to CUDA only; training in the contiguous format on %s", device)
        return torch.contiguous_format
    return torch.channels_last


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on an interactive stderr, else ``None`` (the loop then logs every few steps)."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    return None


def write_metrics(output: Path, history: list[dict[str, Any]]) -> None:
    """Write ``history`` as ``output/metrics.jsonl``, one JSON row per epoch, atomically."""
    write_text(output / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))

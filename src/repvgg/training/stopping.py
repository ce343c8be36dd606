"""Stopping a run cleanly: SIGINT/SIGTERM become a flag the training loop checks, shared by every process."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from repvgg.training.distributed import all_reduce

__all__ = ["CHECK_INTERVAL", "StopRequest", "shared_flags"]

logger = logging.getLogger(__name__)

#: Steps between the checks for a stop request and a non-finite loss on CUDA or in a distributed run
#: (each is a host sync and a small collective); on one CPU process every step is checked.
CHECK_INTERVAL = 10


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second signal aborts)."""

    def __init__(self, action: str = "saving a resumable checkpoint after this step") -> None:
        self.requested = False
        self.action = action
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("received %s: %s", signal.Signals(signum).name, self.action)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """The handlers for the duration of the block (in the main thread; elsewhere signals stay as they are)."""
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


def shared_flags(stopper: StopRequest, sums: Tensor | None = None) -> tuple[bool, bool]:
    """``(stop requested, loss not finite)``, each true on every process if it is true on any: one collective.

    ``sums`` is the epoch's running sums (``sums[0]`` the summed loss), on any device.
    """
    flags = torch.tensor([float(stopper.requested), 0.0])
    if sums is not None:
        flags[1] = float(not bool(torch.isfinite(sums[0])))
    all_reduce(flags, "max")
    return bool(flags[0]), bool(flags[1])

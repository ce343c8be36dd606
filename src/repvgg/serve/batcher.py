"""Dynamic batching: concurrent requests' images run through the model together, up to a batch size or a wait.

A [`Batcher`][repvgg.serve.batcher.Batcher] lives on the server's event loop. Each request submits its decoded
images and awaits their outputs; one task gathers what is waiting into a batch of at most ``max_batch`` images
(the first request waits at most ``max_wait_s`` from its arrival for others to join) and runs it on a single worker
thread, off the event loop, so the model sees one batch at a time. The images waiting are bounded: beyond
``max_queue`` a request is refused at once ([`QueueFull`][repvgg.serve.batcher.QueueFull]) instead of waiting
without end. Images being decoded count against the same bound from before their decoding starts
([`admit`][repvgg.serve.batcher.Batcher.admit]): a flood of large images is refused, not decoded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["Admission", "Batcher", "QueueFull", "Stopping"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The images waiting for the model would exceed ``max_queue``; try again shortly."""


class Stopping(RuntimeError):
    """The server stopped before the request's batch ran; another server (or this one restarted) may answer it."""


@dataclass
class _Pending:
    images: Tensor | list  # a list of images, or a batch of them (a tensor, taken by rows)
    arrived: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Runs ``run`` (a list of N images -> N outputs) on batches gathered from concurrent
    [`submit`][repvgg.serve.batcher.Batcher.submit] calls. While a batch gathers, the loop is woken by a request only
    once the batch could be full, so that a request costs the event loop no more than its place in the queue.

    Args:
        run: the model, called on one worker thread, a batch at a time (it stacks the images if it takes a tensor).
        max_batch: most images in one call of ``run`` (a request of more images is refused by the caller).
        max_wait_s: longest the first waiting request waits for others before its batch runs.
        max_queue: most images waiting; a submit beyond it raises [`QueueFull`][repvgg.serve.batcher.QueueFull].
        on_batch: called with each batch's image count and seconds (metrics).
    """

    def __init__(self, run: Callable[[Any], Any], *, max_batch: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.run, self.max_batch, self.max_wait_s, self.max_queue = run, max_batch, max_wait_s, max_queue
        self.on_batch = on_batch
        self.waiting = 0  # images submitted and not yet running
        self.decoding = 0  # images admitted and being decoded: they will wait next
        self._queue: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._running: list[_Pending] = []  # the batch in the model
        self._gathering = False  # a batch is waiting for more requests, until max_wait_s or full
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repvgg-model")

    def start(self) -> None:
        """Start gathering batches on the running event loop."""
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="repvgg-batcher")
        self._task.add_done_callback(self._ended)

    @property
    def queued(self) -> int:
        """Images counted against ``max_queue``: waiting for the model, or admitted and being decoded."""
        return self.waiting + self.decoding

    @property
    def running(self) -> bool:
        """Whether batches are being gathered (not before ``start``, nor after ``stop`` or a failure)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Finish what is waiting, then stop (the server calls it after the requests in flight are answered)."""
        if self._task is not None:
            while self._queue and not self._task.done():  # a forced stop may have cancelled the loop already
                await asyncio.sleep(0.01)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def _ended(self, task: asyncio.Task) -> None:
        """The loop stopped (cancelled, or failed: a bug): every request still waiting, or in the batch it was
        running, is told instead of waiting for ever."""
        if not task.cancelled() and task.exception() is not None:
            log.error("the batcher stopped: %r", task.exception())
        left = [*self._running, *self._queue]
        self._queue.clear()
        self._running = []
        self.waiting = 0
        for pending in left:
            if not pending.future.done():
                pending.future.set_exception(Stopping("the server is stopping; try again shortly") if task.cancelled()
                                             else RuntimeError("the server stopped before this batch ran"))

    def admit(self, count: int) -> Admission:
        """Hold ``count`` places of the queue for images about to be decoded, until
        [`submit`][repvgg.serve.batcher.Batcher.submit] takes them or the admission is released (use it as a context
        manager, so a failed decoding gives its places back).

        Raises:
            QueueFull: the places are not free.
        """
        self._check_room(count)
        self.decoding += count
        return Admission(self, count)

    async def submit(self, images: Tensor | list, admission: Admission | None = None) -> Any:
        """The outputs for ``images`` (a list of N, or an ``(N, ...)`` tensor of them; N at most ``max_batch``), run
        with whatever else waits; ``admission``, if given, holds their places in the queue (see
        [`admit`][repvgg.serve.batcher.Batcher.admit]).

        Raises:
            QueueFull: more than ``max_queue`` images would be waiting.
            Stopping: the server is stopping.
            RuntimeError: the batcher is not running (not started, or failed).
        """
        if self._arrived is None or not self.running:
            if self._task is not None and self._task.cancelled():
                raise Stopping("the server is stopping; try again shortly")
            raise RuntimeError("the batcher is not running")
        if admission is not None:
            admission.release()  # its places become the images' own, below, with no await in between
        self._check_room(len(images))
        loop = asyncio.get_running_loop()
        pending = _Pending(images, loop.time(), loop.create_future())
        self._queue.append(pending)
        self.waiting += len(images)
        if not self._gathering or self.waiting >= self.max_batch:
            self._arrived.set()
        return await pending.future

    async def _loop(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._queue[0].arrived + self.max_wait_s  # a request that waited for a busy model waits no more
            self._gathering = True
            while not self._full() and loop.time() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            self._gathering = False
            self._running = self._take()
            await self._run(self._running, loop)
            self._running = []

    def _check_room(self, count: int) -> None:
        if self.queued + count > self.max_queue:
            raise QueueFull(f"{self.waiting} images are waiting for the model and {self.decoding} are being decoded "
                            f"(the limit is {self.max_queue}, --max-queue)")

    def _full(self) -> bool:
        """Whether the next batch can take no more: ``max_batch`` images, or a waiting request that does not fit."""
        count = self._count(self.max_batch)
        return count >= self.max_batch or sum(len(p.images) for p in self._queue) > count

    def _count(self, limit: int) -> int:
        """Images of the requests that would join the next batch (whole requests, up to ``limit``)."""
        total = 0
        for pending in self._queue:
            if total + len(pending.images) > limit:
                break
            total += len(pending.images)
        return total

    def _take(self) -> list[_Pending]:
        taken: list[_Pending] = []
        total = 0
        while self._queue and (not taken or total + len(self._queue[0].images) <= self.max_batch):
            pending = self._queue.popleft()
            taken.append(pending)
            total += len(pending.images)
        self.waiting -= total
        return taken

    async def _run(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        started = loop.time()
        try:
            images = [image for pending in batch for image in pending.images]
            outputs = await loop.run_in_executor(self._executor, self.run, images)
            if len(outputs) != len(images):
                raise RuntimeError(f"the model gave {len(outputs)} outputs for {len(images)} images")
        except Exception as err:  # every request of the batch is told; the server keeps serving
            log.warning("a batch of %d requests failed: %s", len(batch), err)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(err)
            return
        if self.on_batch is not None:
            self.on_batch(len(images), loop.time() - started)
        start = 0
        for pending in batch:
            n = len(pending.images)
            if not pending.future.done():  # a request whose client left is cancelled
                pending.future.set_result(outputs[start: start + n])
            start += n


class Admission:
    """Places held in a [`Batcher`][repvgg.serve.batcher.Batcher]'s queue for images being decoded (from
    [`admit`][repvgg.serve.batcher.Batcher.admit]); released once, by ``submit`` or on leaving a ``with`` block."""

    def __init__(self, batcher: Batcher, count: int) -> None:
        self.batcher, self.count = batcher, count

    def release(self) -> None:
        """Give the places back (again: nothing)."""
        self.batcher.decoding -= self.count
        self.count = 0

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

"""Peak memory of one forward pass: the CUDA allocator's peak, or live tensor bytes counted on the CPU.

The paper's memory argument (Ding et al., RepVGG, CVPR 2021, Sec. 3.1): a multi-branch block keeps its
input alive until every branch has read it and holds each branch's output until the sum, so its peak
is higher than that of a single conv that can drop its input as soon as it has run. On the GPU the
caching allocator reports this peak directly. The CPU allocator keeps no such statistics, so
`LiveTensorTracker` intercepts every operator (a ``TorchDispatchMode``), adds the bytes of each
newly allocated storage and subtracts them when the storage is freed (a weak reference's callback),
keeping the maximum. Parameters, buffers and the input are not counted: the figure is the working
memory of the forward pass.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorTracker", "peak_forward_memory"]

log = logging.getLogger(__name__)


class LiveTensorTracker(TorchDispatchMode):
    """Count the bytes of tensor storages created while the mode is active and still alive.

    ``current`` is the number of bytes alive now, ``peak`` the maximum it reached, ``allocations``
    the number of new storages seen. Storages that existed before (pass them to `ignore`,
    e.g. weights and the input) and storages an operator merely returns again (in-place ops, views)
    are not counted twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.allocations = 0
        # Storages seen so far, by identity; values are only kept to tell counted from ignored ones.
        self._seen: dict[int, weakref.ref[torch.UntypedStorage]] = {}

    def ignore(self, *tensors: Tensor) -> None:
        """Mark the storages of ``tensors`` as pre-existing (not counted, even if an op returns them)."""
        for t in tensors:
            storage = t.untyped_storage()
            self._seen[id(storage)] = weakref.ref(storage, self._forget(id(storage), 0))

    def _forget(self, key: int, nbytes: int) -> Callable[[Any], None]:
        def callback(_: Any) -> None:
            self._seen.pop(key, None)
            self.current -= nbytes

        return callback

    def _track(self, t: Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = id(storage)
        ref = self._seen.get(key)
        if ref is not None and ref() is storage:
            return
        nbytes = storage.nbytes()
        self._seen[key] = weakref.ref(storage, self._forget(key, nbytes))
        self.allocations += 1
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, Tensor):
                self._track(leaf)
        return out


@torch.no_grad()
def peak_forward_memory(model: Callable[[Tensor], Any], x: Tensor) -> int:
    """Peak working memory, in bytes, of one inference forward pass ``model(x)``.

    On CUDA: the caching allocator's peak above what was allocated before the call (weights and the
    input excluded). On the CPU: the peak of live tensor bytes created during the call, counted by
    `LiveTensorTracker` (operators outside PyTorch, e.g. ONNX Runtime, are invisible to it).
    """
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        out = model(x)
        torch.cuda.synchronize(x.device)
        peak = torch.cuda.max_memory_allocated(x.device) - before
        del out
        return int(peak)
    if x.device.type != "cpu":
        raise ValueError(f"peak memory is measured on 'cpu' and 'cuda' devices, got {x.device.type!r}")
    tracker = LiveTensorTracker()
    tracker.ignore(x)
    if isinstance(model, nn.Module):
        tracker.ignore(*model.parameters(), *model.buffers())
    with tracker:
        out = model(x)
    del out
    log.debug("CPU forward: %d new storages, peak %.1f MiB", tracker.allocations, tracker.peak / 2**20)
    return tracker.peak

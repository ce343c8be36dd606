"""One optimizer step's gradients, over micro-batches (``--accumulation-steps``) and clipped (``--clip-grad``).

A batch cut into N consecutive micro-batches, each one's mean loss weighted by its share of the images, gives the
gradient of the whole batch's mean loss (up to float rounding): the same optimizer steps with 1/N of the
activation memory. What is not the same: BatchNorm normalises each micro-batch by its own statistics in training
and updates its running statistics once per micro-batch, and mixup/cutmix pair images within a micro-batch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["accumulate_gradients", "clip_gradients", "micro_batches"]


def micro_batches(batch: Any, parts: int, least: int = 1) -> list[Any]:
    """``batch`` (tensors, or tuples and dicts of them, batch first) cut into ``parts`` consecutive micro-batches of
    at least ``least`` samples each: fewer parts where the batch is short (``--bad-images skip`` leaves a batch
    shorter), and a batch of fewer than ``least`` samples repeated up to it (BatchNorm needs two values per channel)."""
    leaves, spec = tree_flatten(batch)
    size = int(leaves[0].shape[0])
    if size < least:
        copies = -(-least // size)
        leaves = [torch.cat([leaf] * copies) if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        batch, size = tree_unflatten(leaves, spec), size * copies
    parts = max(1, min(parts, size // least))
    if parts == 1:
        return [batch]
    chunks = [leaf.tensor_split(parts) if isinstance(leaf, Tensor) else [leaf] * parts for leaf in leaves]
    return [tree_unflatten([chunk[i] for chunk in chunks], spec) for i in range(parts)]


def accumulate_gradients(task: Any, net: nn.Module, model: nn.Module, batch: Any, *, parts: int, scaler: Any,
                         amp_dtype: torch.dtype | None, distributed: bool) -> Tensor:
    """Back-propagate ``batch``'s mean loss through ``parts`` micro-batches (``task.training_step`` on each); the
    step's sums ``[loss * images, images, *the task's sums]``. Under DDP the gradients are averaged over the
    processes once, with the last micro-batch."""
    pieces = micro_batches(batch, parts, getattr(task, "min_local_batch", 1))
    images = sum(int(tree_flatten(piece)[0][0].shape[0]) for piece in pieces)
    counted = int(tree_flatten(batch)[0][0].shape[0]) / images  # a repeated short batch's images count once
    device_type = next(model.parameters()).device.type
    totals: Tensor | None = None
    for i, piece in enumerate(pieces):
        defer = distributed and i < len(pieces) - 1  # DDP averages the gradients once, with the last micro-batch
        sync = net.no_sync() if defer and isinstance(net, DistributedDataParallel) else contextlib.nullcontext()
        with sync:
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = task.training_step(net, model, piece)
            scaler.scale(out.loss * (out.images / images)).backward()
        loss = out.loss.detach().double().reshape(1)
        sums = torch.cat([loss * out.images, loss.new_tensor([out.images]),
                          out.sums.detach().to(loss.device, torch.float64).reshape(-1)])
        totals = sums if totals is None else totals + sums
    assert totals is not None
    return totals * counted if counted != 1 else totals


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, max_norm: float | None) -> None:
    """Scale the accumulated gradients down to a global L2 norm of at most ``max_norm`` (``None``: leave them)."""
    if max_norm is None:
        return
    scaler.unscale_(optimizer)  # clip the true gradients, not float16-scaled ones
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

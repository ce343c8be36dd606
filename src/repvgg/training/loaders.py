"""Data for the training loop: per-epoch seeding, the one persistent training loader of a run, validation shards.

Each sample's augmentation comes from its own seed (`SeededSamples`), so
neither the number of workers nor a resume changes what the model sees; every process reads a disjoint,
in-order validation shard, so sums over processes are exact.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from repvgg.limits import check_batch_memory
from repvgg.training.data import collate_readable
from repvgg.training.distributed import DistContext, EpochSampler, SeededSamples, ShardSampler, dataset_size

__all__ = ["batch_plan", "closing_loaders", "eval_loader", "seed_epoch", "train_loader"]


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed Python, NumPy and torch from ``(seed, epoch, rank)`` (each epoch's augmentation is reproducible)."""
    value = (seed * 1_000_003 + epoch * 7919 + rank) % (2**31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def batch_plan(task: Any, config: Any, ctx: DistContext, train_images: int) -> tuple[int, int]:
    """``(images per process per step, steps per epoch)`` of ``task`` (a [`Task`][repvgg.training.task.Task]) run as
    ``config`` says on ``ctx``'s processes, or a ValueError saying what to change."""
    local_batch = config.batch_size // ctx.world_size
    if config.batch_size % ctx.world_size or local_batch < task.min_local_batch:
        raise ValueError(f"batch size {config.batch_size} must be a multiple of the {ctx.world_size} processes "
                         f"with at least {task.min_local_batch} image(s) per process")
    steps = config.accumulation_steps
    if local_batch % steps or local_batch // steps < task.min_local_batch:
        raise ValueError(f"--accumulation-steps {steps} must divide the {local_batch} images each process takes per "
                         f"step into micro-batches of at least {task.min_local_batch}; change --batch-size or "
                         "--accumulation-steps")
    steps_per_epoch = train_images // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set ({train_images} images) is smaller than one batch "
                         f"({config.batch_size}); lower --batch-size")
    check_batch_memory(local_batch // steps, task.input_shape(), "--batch-size", per=" per micro-batch")
    return local_batch, steps_per_epoch


def train_loader(dataset: Dataset, *, seed: int, ctx: DistContext, local_batch: int,
                 workers: int) -> tuple[DataLoader, EpochSampler]:
    """One loader for the whole run and the sampler that moves it from epoch to epoch.

    Workers are persistent (started once, not every epoch); each sample's augmentation comes from its own
    seed (`SeededSamples`), so neither the workers nor a resume change what the model sees. Call
    ``sampler.set_epoch(epoch, skip)`` before iterating an epoch.
    """
    sampler = EpochSampler(dataset_size(dataset), seed=seed, rank=ctx.rank, world_size=ctx.world_size)
    # The loader's own generator keeps it from drawing on the global RNG, whose state a resume restores.
    loader = DataLoader(SeededSamples(dataset), batch_size=local_batch, sampler=sampler, drop_last=True,
                        collate_fn=collate_readable, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=ctx.device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def eval_loader(dataset: Dataset, *, batch_size: int, workers: int, ctx: DistContext) -> DataLoader:
    """This process's in-order, disjoint validation shard (shards summed over processes are exact)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_readable,
                      sampler=ShardSampler(dataset_size(dataset), ctx.rank, ctx.world_size),
                      pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0)


@contextlib.contextmanager
def closing_loaders(*loaders: DataLoader | None) -> Iterator[None]:
    """Stop the loaders' persistent worker processes when the block ends, however it ends.

    Left to the garbage collector (a run's loaders sit in reference cycles), the workers outlive the run, and the
    collection that finally ends them waits out PyTorch's 5 s status timeout for each worker before killing it:
    20 s after a run with ``--workers 2``.
    """
    try:
        yield
    finally:
        for loader in loaders:
            iterator = getattr(loader, "_iterator", None)  # where PyTorch keeps a persistent loader's workers
            if loader is not None and iterator is not None:
                loader._iterator = None
                shutdown = getattr(iterator, "_shutdown_workers", None)
                if callable(shutdown):
                    shutdown()

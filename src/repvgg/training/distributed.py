"""Process-group set-up for ``torchrun`` and the small collective helpers the training loop needs.

One process per device; on GPUs a group of NCCL for CUDA tensors and gloo for CPU ones, gloo alone on
CPU. Only rank 0 logs and writes files. The training sampler shards a seeded order over the processes and
gives every sample its own augmentation seed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler, get_worker_info

from repvgg.errors import PeerLost
from repvgg.options import check_device_name

__all__ = [
    "DistContext", "init_distributed", "shutdown_distributed", "all_reduce", "backend_device_types",
    "collective_device", "EpochSampler", "SeededSamples", "ShardSampler", "dataset_size", "sample_seed",
    "run_distributed",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    in_group: bool = False  # a process group is initialised (torchrun; world size 1 included)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``name`` names (``auto``, ``cpu``, ``cuda`` or ``cuda:N``), checked to be there: ``"auto"`` picks
    the local CUDA device when there is one, else the CPU.

    Raises:
        ValueError: another name (``mps``, ``tpu``, ``cuda:-1``), or a CUDA device this machine does not have.
    """
    check_device_name(name, "--device")
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was requested but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group ``torchrun`` describes in the environment (or run as a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    launched = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # torchrun, even with one process
    if launched and not dist.is_initialized():
        # CUDA tensors go through NCCL; the few CPU ones (counters, flags) through gloo.
        # REPVGG_DIST_BACKEND overrides it (e.g. "nccl" alone, as benchmarks/gpu_check.py does).
        default = "cpu:gloo,cuda:nccl" if resolved.type == "cuda" else "gloo"
        backend = os.environ.get("REPVGG_DIST_BACKEND", default)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend=backend)
        logger.info("process group: %s, world size %d", backend, world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved,
                       in_group=dist.is_initialized())


def shutdown_distributed(*, wait: bool = False) -> None:
    """Leave the process group; ``wait`` first lets every process (rank 0 writing files) catch up."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


#: Device types each backend takes tensors on (a group may mix them: "cpu:gloo,cuda:nccl").
_BACKEND_DEVICES = {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}, "mpi": {"cpu"}, "ucc": {"cpu", "cuda"}}


def _backend_description() -> str:
    """The default group's backend, per device where the group was created with a mixed description."""
    try:
        return str(dist.get_backend_config())
    except (AttributeError, RuntimeError, ValueError):
        return str(dist.get_backend())


def backend_device_types(description: str | None = None) -> set[str]:
    """Device types the default group's backend accepts ("nccl": cuda; "cpu:gloo,cuda:nccl": cpu and cuda)."""
    description = _backend_description() if description is None else description
    types: set[str] = set()
    for part in description.lower().split(","):
        device, _, backend = part.strip().rpartition(":")
        types |= {device} if device else _BACKEND_DEVICES.get(backend, {"cpu"})
    return types


def collective_device(device: torch.device, description: str | None = None) -> torch.device:
    """Where a collective must run for a tensor on ``device``: ``device`` itself when the backend takes it,
    else the backend's device (the current CUDA device for NCCL, the CPU otherwise)."""
    accepted = backend_device_types(description)
    if device.type in accepted:
        return device
    if "cuda" in accepted:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum or max over processes, in place, whatever device ``tensor`` is on (a no-op in a single process).

    The one collective every job uses: the tensor travels to the device the group's backend needs (a
    CPU tensor to the GPU under NCCL) and the result comes back into ``tensor``.
    """
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    device = collective_device(tensor.device)
    work = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(work, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


class EpochSampler(Sampler[tuple[int, int]]):
    """A shuffled order that depends only on ``(seed, epoch)``, sharded over processes.

    Every process gets the same number of indices (the tail is dropped so the global batch is
    constant). ``skip`` drops the first indices of this process's shard, so a run resumed in the
    middle of an epoch continues with exactly the samples it had not seen yet. One sampler serves a
    whole run: `set_epoch` moves it on (a persistent loader reads it afresh every epoch).

    It yields ``(index, seed)`` keys for `SeededSamples`: each sample's own augmentation seed, a
    function of ``(seed, epoch, index)`` only.
    """

    def __init__(self, length: int, *, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 skip: int = 0) -> None:
        self.length, self.seed, self.epoch = length, seed, epoch
        self.rank, self.world_size, self.skip = rank, world_size, skip

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The order of ``epoch``, without this shard's first ``skip`` indices."""
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=gen).tolist()
        per_rank = self.length // self.world_size
        shard = order[self.rank: per_rank * self.world_size: self.world_size]
        return shard[self.skip:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(index, sample_seed(self.seed, self.epoch, index)) for index in self._indices()])

    def __len__(self) -> int:
        return max(0, self.length // self.world_size - self.skip)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (a hash: neighbouring samples get unrelated streams)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dataset_size(dataset: Dataset) -> int:
    """The number of samples of a map-style ``dataset`` (torch's ``Dataset`` type declares no ``__len__``; the samplers
    here need one): a TypeError names a dataset without."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"{type(dataset).__name__} has no length: training and evaluation need a map-style dataset "
                        "(with __len__ and __getitem__)")
    return len(dataset)


class SeededSamples(Dataset):
    """A dataset read with ``(index, seed)`` keys (`EpochSampler`'s).

    Each sample is loaded with Python's, NumPy's and torch's generators seeded from its key, so its
    augmentation is the same whichever worker or process loads it and however many there are: a
    resumed run, mid-epoch or not, draws exactly what an uninterrupted one would. The loading
    process's own generator states are restored afterwards.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return dataset_size(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A batch of samples (the DataLoader asks for whole batches): the caller's generator states are saved
        and restored once per batch, not per sample."""
        if get_worker_info() is not None:  # a loader worker: no caller state to keep
            return [self._load(key) for key in keys]
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            return [self._load(key) for key in keys]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])

    def _load(self, key: tuple[int, int]) -> Any:
        index, seed = key
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed also seeds CUDA: slow)
        return self.dataset[index]


class ShardSampler(Sampler[int]):
    """In-order, non-overlapping evaluation shards (no padding, so counts summed over ranks are exact)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


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
    except RuntimeError as err:
        if ctx.world_size > 1 and _peer_lost(err):
            raise PeerLost(f"another process of this {ctx.world_size}-process run stopped ({_first_line(err)}); "
                           "the run folder keeps the last finished epoch's last.pt: start the run again with "
                           "--resume RUN") from err
        raise
    finally:
        shutdown_distributed(wait=finished)


def _peer_lost(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because a peer went away (gloo's and NCCL's errors)."""
    if isinstance(err, dist.DistError):
        return True
    message = str(err).lower()
    return any(word in message for word in ("gloo", "nccl", "connection reset by peer", "connection closed by peer"))


def _first_line(err: BaseException) -> str:
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return line if len(line) <= 200 else line[:200] + "..."

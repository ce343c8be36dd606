"""What a training job gives the engine ([`Task`][repvgg.training.task.Task],
[`StepOutput`][repvgg.training.task.StepOutput]) and what the engine keeps of a run
([`RunState`][repvgg.training.task.RunState], saved in every checkpoint); [`TaskSetup`][repvgg.training.task.TaskSetup]
holds what a task's ``setup`` resolves."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from repvgg.training.distributed import DistContext

__all__ = ["RunState", "StepOutput", "Task", "TaskSetup"]

logger = logging.getLogger(__name__)

#: The model a task builds, and gets back to checkpoint, compare and save.
M = TypeVar("M", bound=nn.Module)
ConfigT = TypeVar("ConfigT")
DataT = TypeVar("DataT")


@dataclass
class RunState:
    """Where the run is; saved in every checkpoint, the unfinished epoch's running sums included."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done inside the current epoch
    global_step: int = 0
    best_score: float = -float("inf")  # best value of the task's score metric so far
    history: list[dict[str, Any]] = field(default_factory=list)
    # The unfinished epoch so far (a resume continues its metrics exactly): its sums over every process,
    # and the time it took and waited for data, over every invocation.
    epoch_sums: Tensor | None = None
    epoch_time_s: float = 0.0
    epoch_data_wait_s: float = 0.0
    epoch_steps_timed: int = 0
    # Finished epochs, over every invocation.
    train_time_s: float = 0.0
    train_images: int = 0

    _PROGRESS = ("epoch_sums", "epoch_time_s", "epoch_data_wait_s", "epoch_steps_timed", "train_time_s",
                 "train_images")

    @property
    def sums(self) -> Tensor:
        """The unfinished epoch's sums, once a step of it has run (in this invocation, or on the main process before
        a resume)."""
        assert self.epoch_sums is not None, "no training step of this epoch has run"
        return self.epoch_sums

    def to_checkpoint(self) -> dict[str, Any]:
        progress = {k: getattr(self, k) for k in self._PROGRESS}
        if self.epoch_sums is not None:
            progress["epoch_sums"] = self.epoch_sums.detach().cpu()
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "best_score": self.best_score, "history": self.history, "progress": progress}

    @classmethod
    def from_checkpoint(cls, payload: Mapping[str, Any], *, device: torch.device, keep_sums: bool) -> RunState:
        """The state a checkpoint saved; ``keep_sums`` on one process only, since the sums are already totals."""
        progress = dict(payload.get("progress") or {})
        if payload["step_in_epoch"] and "epoch_sums" not in progress:
            logger.warning("this checkpoint predates exact resumed metrics: the interrupted epoch's train_loss "
                           "and accuracy will cover only the steps after the resume")
        sums = progress.pop("epoch_sums", None)
        return cls(payload["epoch"], payload["step_in_epoch"], payload["global_step"], payload["best_score"],
                   list(payload["history"]), sums.to(device) if keep_sums and sums is not None else None,
                   **{k: v for k, v in progress.items() if k in cls._PROGRESS})


@dataclass
class StepOutput:
    """What one training step reports: the loss to back-propagate, the batch's image count, and the
    task's own running sums for this batch (e.g. correct predictions), summed over the epoch."""

    loss: Tensor
    images: int
    sums: Tensor


class TaskSetup(Generic[ConfigT, DataT]):
    """What a task's ``setup`` resolves, its run's ``config`` and its data ``bundle``, for its other methods to read;
    reading either before ``setup`` is a RuntimeError."""

    def __init__(self) -> None:
        self._config: ConfigT | None = None
        self._bundle: DataT | None = None

    @property
    def config(self) -> ConfigT:
        if self._config is None:
            raise RuntimeError(f"{type(self).__name__} has no config before setup()")
        return self._config

    @config.setter
    def config(self, config: ConfigT) -> None:
        self._config = config

    @property
    def bundle(self) -> DataT:
        if self._bundle is None:
            raise RuntimeError(f"{type(self).__name__} has no data before setup()")
        return self._bundle

    @bundle.setter
    def bundle(self, bundle: DataT) -> None:
        self._bundle = bundle


class Task(Protocol[M]):
    """One kind of training job. The engine calls these in the order listed, rank 0 only for ``save``; ``M`` is the
    model it builds."""

    #: The ``repvgg`` subcommand that runs the task (used in messages and to tell checkpoints apart).
    command: str
    #: The validation metric (a key of [`evaluate`][repvgg.training.task.Task.evaluate]'s result) whose best value
    #: selects ``best.pt``.
    score: str
    #: Images each process needs per batch (BatchNorm on a 1x1 pooled map needs 2).
    min_local_batch: int
    #: Config fields a resumed run may change (applied from the step the run reached, and recorded); any other
    #: change is refused. Start from `LOOP_CHANGEABLE`. The data may move: it is
    #: compared by [`data_identity`][repvgg.training.task.Task.data_identity].
    changeable_on_resume: tuple[str, ...]
    #: Config fields that are paths the run reads (stored resolved, checked never to be written to).
    input_fields: tuple[str, ...]

    def default_output(self, config: Any) -> Path:
        """The run folder when neither ``output`` nor ``resume`` names one."""

    def setup(self, config: Any, ctx: DistContext, resumed: Mapping[str, Any] | None) -> tuple[Any, Dataset]:
        """Build and check the data; return the config with derived values resolved, and the training set.

        ``resumed`` is the checkpoint a resume continues (``None`` for a new run): the model then comes
        from it, and the initial weights file is not needed.
        """

    def data_identity(self) -> dict[str, Any]:
        """What makes the data the same data wherever it lies: class names and image counts."""

    def build_model(self, config: Any, device: torch.device) -> M:
        """The training-time model on ``device`` (initial weights loaded and checked for a new run)."""

    def input_shape(self) -> tuple[int, ...]:
        """One input image's shape ``(C, H, W)`` at the largest size the run uses (training or evaluation): what a
        batch's memory is bounded by."""

    def val_loader(self, local_batch: int, ctx: DistContext) -> DataLoader:
        """This process's validation shard."""

    def describe(self, model: nn.Module, config: Any, steps_per_epoch: int) -> str:
        """One log line: model, data, sizes."""

    def learning_rate(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """The schedule: learning rate at optimizer step ``step`` of ``total_steps``."""

    def training_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        """Forward one batch through ``net`` (``model`` wrapped for DDP) and return the loss."""

    def train_metrics(self, sums: Tensor) -> dict[str, float]:
        """Epoch metrics from ``[loss * images, images, *StepOutput.sums]`` summed over the epoch."""

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Validation metrics of ``model`` (summed over processes), including `score`."""

    def checkpoint_fields(self, model: M) -> dict[str, Any]:
        """What a checkpoint needs besides the weights to rebuild the model from the file alone."""

    def compare(self, model: M, plain: M, loader: DataLoader) -> dict[str, Any]:
        """Score the trained model and its converted copy on the same data; the summary's numbers."""

    def save(self, model: M, plain: M, summary: dict[str, Any], history: list[dict[str, Any]],
             output: Path) -> None:
        """Write the converted model and the task's figures; may add keys (e.g. speed) to ``summary``."""

"""What the dense tasks (segmentation, detection) share as tasks of the training engine: their setup, their data's
identity, where the backbone's initial weights come from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import torch

from repvgg.training.distributed import DistContext, dataset_size
from repvgg.training.run_folder import data_identity
from repvgg.training.task import TaskSetup

__all__ = ["DenseTask"]

ConfigT = TypeVar("ConfigT")
DataT = TypeVar("DataT")


class DenseTask(TaskSetup[ConfigT, DataT], Generic[ConfigT, DataT]):
    """A task whose data bundle has ``train``, ``val`` and ``classes``, and whose config names ``data`` and
    ``backbone_weights`` (its inputs) and resolves its learning rate."""

    min_local_batch = 2  # BatchNorm in the backbone (and in PSPNet's 1x1 pyramid bin)
    input_fields: tuple[str, ...] = ("data", "backbone_weights")

    def __init__(self) -> None:
        super().__init__()
        self.device = torch.device("cpu")
        self.resumed: Mapping[str, Any] | None = None

    def start(self, config: Any, ctx: DistContext, resumed: Mapping[str, Any] | None, bundle: DataT) -> Any:
        """Keep what ``setup`` resolved: the device, the resumed checkpoint, the data; the config with its learning
        rate resolved (saved as the value, not as "derive it")."""
        self.device, self.resumed, self.bundle = ctx.device, resumed, bundle
        self.config = config.updated(lr=config.resolved_lr)
        return self.config

    @property
    def initial_backbone_weights(self) -> Any:
        """The backbone's weights file for a new run; ``None`` on a resume, whose weights come from its checkpoint."""
        return getattr(self.config, "backbone_weights") if self.resumed is None else None

    def data_identity(self) -> dict[str, Any]:
        bundle: Any = self.bundle
        return data_identity(bundle.classes, dataset_size(bundle.train), dataset_size(bundle.val))

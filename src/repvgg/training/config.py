"""Typed training configuration: defaults, YAML/JSON files, command-line overrides.

The resolved configuration is saved with every run (``config.yaml``) and inside every checkpoint,
so a run can be rebuilt and resumed from its output folder alone. Files are parsed as data
(``yaml.safe_load`` / ``json``); nothing in them is executed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

from repvgg.serialization import DictMixin, write_text

__all__ = ["RunConfig", "TrainConfig", "load_config_file", "resolve_run_config"]

C = TypeVar("C", bound="RunConfig")


class RunConfig(DictMixin):
    """A run configuration: dict round trips plus overrides and a YAML copy in the run folder."""

    def updated(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (``None`` values are ignored, as for unset CLI flags)."""
        merged = self.to_dict()
        merged.update({k: v for k, v in changes.items() if v is not None})
        return type(self).from_dict(merged)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the config as YAML, atomically."""
        import yaml

        return write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run needs. Paper defaults for ImageNet, small defaults for the digits data.

    ``None`` in ``lr``, ``img_size`` and ``warmup_epochs`` means "derive it": the learning rate is
    ``0.1 * batch_size / 256`` (linear scaling), the image size is 32 for the digits and 224 for
    image folders, and warm-up is 5 epochs for schedules of 100+ epochs and 1 otherwise.
    """

    model: str = "repvgg_a0"
    data: str | None = None  # ImageFolder root with train/ and val/; None = embedded digits
    img_size: int | None = None
    epochs: int = 30
    batch_size: int = 64  # global, over all processes
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float | None = None
    label_smoothing: float = 0.1
    custom_l2: bool = False
    ema_decay: float = 0.0  # 0 disables the weight EMA
    mixup: float = 0.0
    cutmix: float = 0.0
    auto_augment: str | None = None  # timm policy string, e.g. "rand-m9-mstd0.5" or "original"
    amp: bool = False  # mixed precision (CUDA only)
    channels_last: bool = False
    grad_checkpointing: bool = False
    sync_bn: bool = False
    weights: str | None = None  # initialise from a checkpoint (classifier kept if classes differ)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # RepVGGSpec fields
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    output: str | None = None
    resume: str | None = None
    bad_images: str = "fail"  # or "skip"
    val_fraction: float = 0.2  # digits only
    stop_after_steps: int | None = None
    log_interval: int = 50

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.img_size is None or self.img_size >= 8, "img_size must be >= 8"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0"),
            (self.bad_images in ("fail", "skip"), "bad_images must be 'fail' or 'skip'"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.stop_after_steps is None or self.stop_after_steps >= 1, "stop_after_steps must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid training config: {message}")

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else 0.1 * self.batch_size / 256

    @property
    def resolved_warmup_epochs(self) -> float:
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return 5.0 if self.epochs >= 100 else 1.0



def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (keys checked later by :meth:`TrainConfig.from_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values, got {type(data).__name__}")
    return data


def resolve_run_config(
    config_cls: type[C],
    *,
    resume: str | None = None,
    config_file: str | None = None,
    flags: Mapping[str, Any] | None = None,
) -> C:
    """Merge, in this order of precedence: defaults < a resumed run's config < a config file < flags.

    ``flags`` holds command-line values, ``None`` for the ones not given.
    """
    from repvgg.io.checkpoint import load_checkpoint

    base: dict[str, Any] = {}
    if resume:
        base.update(load_checkpoint(resume)["config"])
        base.pop("stop_after_steps", None)  # a time slice applies to one invocation only
    if config_file:
        base.update({k.replace("-", "_"): v for k, v in load_config_file(config_file).items()})
    config = config_cls.from_dict(base) if base else config_cls()
    return config.updated(**(flags or {}))

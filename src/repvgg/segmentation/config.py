"""Typed configuration of a segmentation run: defaults, YAML/JSON files, command-line overrides.

The recipe is the paper's (Sec. 4.3, after PSPNet): SGD with momentum 0.9, weight decay 1e-4, poly
learning-rate decay with power 0.9, auxiliary loss weight 0.4. The defaults are sized so that
``repvgg seg-train`` with no arguments trains on the generated shapes on a 2-core CPU in a few
minutes; for real data, set ``data``, ``crop_size``, ``head_channels`` / ``aux_channels`` (512 / 256
in PSPNet) and the paper's ``lr`` 0.01 with batch 16 and an ImageNet-pretrained ``backbone_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass

from repvgg.training.config import RunConfig
from repvgg.segmentation.backbones import FAST_DILATED_LAYERS
from repvgg.segmentation.pspnet import AUX_LOSS_WEIGHT, SegmenterConfig
from repvgg.segmentation.synthetic import SyntheticConfig

__all__ = ["SegTrainConfig"]

#: Speed baselines a run may be compared with ("none" skips the comparison).
BASELINES = ("resnet50", "resnet101", "none")


@dataclass
class SegTrainConfig(RunConfig):
    """Everything a segmentation run needs.

    ``lr=None`` means ``0.01 * batch_size / 16`` for folder data (the paper's 0.01 at batch 16, with a
    pretrained backbone) and 0.05 for the generated shapes, which are learnt from scratch in a few
    minutes and gain from the larger step. ``crop_size=None`` is the generated image size, or 512
    for folders.
    """

    backbone: str = "repvgg_tiny"  # a registered RepVGG name, or resnet50 / resnet101
    fast: bool = False  # dilate only the last 5 layers (the paper's "fast" variants)
    dilated_layers: int | None = None  # or any number of last layers to dilate
    head_channels: int = 64  # PSPNet: 512
    aux_channels: int = 32  # PSPNet: 256; 0 = no auxiliary head
    aux_weight: float = AUX_LOSS_WEIGHT
    dropout: float = 0.1
    backbone_weights: str | None = None  # ImageNet weights for the backbone
    data: str | None = None  # None = generated shapes; else a folder (see repvgg.segmentation.data)
    num_classes: int | None = None  # folders without classes.txt
    crop_size: int | None = None
    scale_range: tuple[float, float] | None = None  # default (0.75, 1.5) shapes, (0.5, 2.0) folders
    val_size: int | None = None  # resize validation images (needed to batch images of mixed sizes)
    synthetic_train: int = 800
    synthetic_val: int = 100
    synthetic_size: int = 96
    synthetic_seed: int = 0  # the data's seed, separate from the training seed
    epochs: int = 30
    batch_size: int = 16  # global, over all processes
    lr: float | None = None
    poly_power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 1e-4
    amp: bool = False  # mixed precision (CUDA only)
    sync_bn: bool = False
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    output: str | None = None
    resume: str | None = None
    baseline: str = "resnet50"  # speed comparison at the same input size; "none" skips it
    stop_after_steps: int | None = None
    log_interval: int = 20

    def __post_init__(self) -> None:
        if self.scale_range is not None:
            self.scale_range = tuple(float(v) for v in self.scale_range)  # YAML gives lists
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (the pyramid pooling's 1x1 bin needs 2 images for BN)"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.poly_power >= 0, "poly_power must be >= 0"),
            (self.aux_weight >= 0, "aux_weight must be >= 0"),
            (self.crop_size is None or self.crop_size >= 8, "crop_size must be >= 8"),
            (self.val_size is None or self.val_size >= 8, "val_size must be >= 8"),
            (self.scale_range is None or len(self.scale_range) == 2, "scale_range must be two numbers"),
            (self.synthetic_train >= 1 and self.synthetic_val >= 1, "synthetic_train and synthetic_val must be >= 1"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.baseline in BASELINES, f"baseline must be one of {list(BASELINES)}"),
            (self.stop_after_steps is None or self.stop_after_steps >= 1, "stop_after_steps must be >= 1"),
            (self.log_interval >= 1, "log_interval must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid segmentation config: {message}")
        if self.fast and self.dilated_layers not in (None, FAST_DILATED_LAYERS):
            raise ValueError(f"fast means dilated_layers={FAST_DILATED_LAYERS}; pass one or the other, "
                             f"not fast with dilated_layers={self.dilated_layers}")

    @property
    def synthetic(self) -> bool:
        return self.data is None or self.data == "synthetic"

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.05 if self.synthetic else 0.01 * self.batch_size / 16

    def synthetic_config(self) -> SyntheticConfig:
        """The generated data this config trains on (also used by ``seg-eval`` to rebuild it)."""
        return SyntheticConfig(image_size=self.synthetic_size, num_train=self.synthetic_train,
                               num_val=self.synthetic_val, seed=self.synthetic_seed)

    def segmenter_config(self, num_classes: int) -> SegmenterConfig:
        """The architecture to build for ``num_classes`` classes."""
        return SegmenterConfig(
            backbone=self.backbone,
            num_classes=num_classes,
            dilated_layers=FAST_DILATED_LAYERS if self.fast else self.dilated_layers,
            head_channels=self.head_channels,
            aux_channels=self.aux_channels,
            dropout=self.dropout,
        )

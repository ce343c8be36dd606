"""Typed configuration of a segmentation run: defaults, YAML/JSON files, command-line overrides.

The recipe is the paper's (Sec. 4.3, after PSPNet): SGD with momentum 0.9, weight decay 1e-4, poly
learning-rate decay with power 0.9, auxiliary loss weight 0.4. The defaults are sized so that
``repvgg seg-train`` with no arguments trains on the generated shapes on a 2-core CPU in a few
minutes; for real data, set ``data``, ``crop_size``, ``head_channels`` / ``aux_channels`` (512 / 256
in PSPNet) and the paper's ``lr`` 0.01 with batch 16 and an ImageNet-pretrained ``backbone_weights``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

from repvgg.limits import MAX_BATCH_SIZE, MAX_IMG_SIZE, MAX_LR
from repvgg.options import option
from repvgg.training.config import LoopConfig

#: Layers dilated by the paper's "fast" segmentation backbones (the last five).
FAST_DILATED_LAYERS = 5
#: Weight of PSPNet's auxiliary loss (Zhao et al., CVPR 2017), as in the RepVGG paper.
AUX_LOSS_WEIGHT = 0.4

__all__ = ["AUX_LOSS_WEIGHT", "FAST_DILATED_LAYERS", "SegTrainConfig"]

#: Speed baselines a run may be compared with ("none" skips the comparison).
BASELINES = ("resnet50", "resnet101", "none")


@dataclass
class SegTrainConfig(LoopConfig):
    """Everything a segmentation run needs.

    ``lr=None`` means ``0.01 * batch_size / 16`` for folder data (the paper's 0.01 at batch 16, with a
    pretrained backbone) and 0.05 for the generated shapes, which are learnt from scratch in a few
    minutes and gain from the larger step. ``crop_size=None`` is the generated image size, or 512
    for folders.
    """

    epochs: int = option(12, "training epochs (sized for the generated shapes)", low=1)
    batch_size: int = option(16, "global batch size over all processes, >= 2 per process", low=2, high=MAX_BATCH_SIZE)
    lr: float | None = option(None, "base learning rate of the poly schedule",
                              default_help="0.05 generated data, 0.01 x batch/16 folders", low=0, high=MAX_LR,
                              low_open=True)
    output: str | None = option(None, "run folder", default_help="runs/seg-<backbone>-<data>-<time>")
    log_interval: int = option(20, "steps between log lines (and tracked step scalars)", low=1)
    backbone: str = option("repvgg_tiny", "registered RepVGG name (see `repvgg info`) or resnet50/resnet101")
    fast: bool = option(False, "the paper's fast variant: dilate only the last 5 layers")
    dilated_layers: int | None = option(None, "dilate only the last N backbone layers",
                                        default_help="every layer of the last two stages")
    head_channels: int = option(64, "width of the classifier's 3x3 conv (PSPNet: 512)", low=1, high=16384)
    aux_channels: int = option(32, "width of the auxiliary head's 3x3 conv, 0 = none (PSPNet: 256)", low=0,
                               high=16384)
    aux_weight: float = option(AUX_LOSS_WEIGHT, "weight of the auxiliary loss", low=0, high=100)
    dropout: float = option(0.1, "Dropout2d before the classifiers' last conv", low=0, high=1, high_open=True)
    backbone_weights: str | None = option(None, "ImageNet weights file for the backbone (RepVGG formats or a "
                                                "torchvision ResNet)")
    data: str | None = option(None, "folder with images/{train,val} and labels/{train,val}",
                              default_help="the generated shapes")
    num_classes: int | None = option(None, "number of classes of a folder without classes.txt",
                                     default_help="from classes.txt", low=1)
    crop_size: int | None = option(None, "training crop", default_help="the generated image size, 512 for folders",
                                   low=8, high=MAX_IMG_SIZE)
    scale_range: tuple[float, float] | None = option(None, "random scale range of training crops",
                                                     default_help="(0.75, 1.5) shapes, (0.5, 2.0) folders")
    val_size: int | None = option(None, "resize validation images to this square size",
                                  default_help="as they are", low=8, high=MAX_IMG_SIZE)
    synthetic_train: int = option(400, "generated training scenes", low=1, high=10**7)
    synthetic_val: int = option(100, "generated validation scenes", low=1, high=10**7)
    synthetic_size: int = option(96, "generated scene size in pixels", low=8, high=MAX_IMG_SIZE)
    synthetic_seed: int = option(0, "the generated data's seed, separate from the training seed", low=0,
                                 high=2**32 - 1)
    poly_power: float = option(0.9, "power of the poly learning-rate decay", low=0, high=100)
    baseline: str = option("resnet50", "ResNet PSPNet timed next to the model at the same input size",
                           choices=BASELINES)

    def __post_init__(self) -> None:
        scales = self.scale_range
        if isinstance(scales, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in scales):  # YAML gives lists; the length is checked below
            self.scale_range = cast("tuple[float, float]", tuple(float(v) for v in scales))
        super().__post_init__()
        scales = self.scale_range or (1.0, 1.0)
        self._check([
            (isinstance(scales, tuple) and len(scales) == 2 and all(math.isfinite(v) and 0.05 <= v <= 4 for v in scales)
             and scales[0] <= scales[1],
             f"scale_range must be two numbers from 0.05 to 4, the smaller first, got {self.scale_range}"),
            (self.baseline in BASELINES, f"baseline must be one of {list(BASELINES)}"),
        ])
        if self.synthetic and self.num_classes is not None:
            from repvgg.dense.scenes import SHAPE_CLASSES

            raise ValueError(f"num_classes (--num-classes) is for a data folder without classes.txt; the generated "
                             f"scenes have their own {len(SHAPE_CLASSES)} classes: leave it out, or pass --data FOLDER")
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

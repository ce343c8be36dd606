"""Semantic segmentation with RepVGG backbones: PSPNet, data and metrics (RepVGG paper, Sec. 4.3).

Not imported by ``import repvgg``; use ``import repvgg.segmentation``. Data loading needs numpy and
Pillow, the ResNet baselines torchvision (all installed with torchvision).
"""

from repvgg.segmentation.backbones import FAST_DILATED_LAYERS, ResNetBackbone, create_repvgg_backbone
from repvgg.segmentation.pspnet import (
    AUX_LOSS_WEIGHT,
    IGNORE_INDEX,
    PSPNet,
    PyramidPooling,
    SegmentationOutput,
    SegmenterConfig,
    build_segmenter,
    create_segmenter,
    list_backbones,
    main_logits,
    segmentation_loss,
)

__all__ = [
    "AUX_LOSS_WEIGHT",
    "FAST_DILATED_LAYERS",
    "IGNORE_INDEX",
    "PSPNet",
    "PyramidPooling",
    "ResNetBackbone",
    "SegmentationOutput",
    "SegmenterConfig",
    "build_segmenter",
    "create_repvgg_backbone",
    "create_segmenter",
    "list_backbones",
    "main_logits",
    "segmentation_loss",
]

"""Semantic segmentation with RepVGG backbones: PSPNet, data, metrics and the training job (RepVGG paper, Sec. 4.3).

Not imported by ``import repvgg``; use ``import repvgg.segmentation``. Data loading needs numpy and
Pillow, the ResNet baselines torchvision (all installed with torchvision).

=================  ============================================================================
``backbones``      dilated RepVGG (normal and "fast") and ResNet-50/101 feature extractors
``pspnet``         ``SegmenterConfig``, ``PSPNet``, ``create_segmenter``, ``segmentation_loss``
``synthetic``      the embedded default data: generated shape scenes with per-pixel labels
``data``           a folder of images and label PNGs, and ``build_segmentation_data``
``transforms``     joint image/label augmentation (scale, crop with ignore padding, flip)
``metrics``        confusion matrix, IoU, mean IoU, pixel accuracy, ``compare_segmenters``
``config``         ``SegTrainConfig``: the training recipe as data (YAML/JSON + flags)
``train``          ``train_segmenter``: the ``repvgg seg-train`` job, resumable, ``torchrun``-ready
``evaluate``       scores and speed of a trained segmenter and its converted copy; tables
``weights``        ``save_segmenter`` / ``load_segmenter``: files that rebuild the segmenter alone
``plots``          ``predictions.png`` (input | ground truth | prediction) and ``curves.png``
=================  ============================================================================
"""

from repvgg.segmentation.backbones import FAST_DILATED_LAYERS, ResNetBackbone, create_repvgg_backbone
from repvgg.segmentation.config import SegTrainConfig
from repvgg.segmentation.data import (
    EXPECTED_LAYOUT,
    SegmentationDataBundle,
    SegmentationFolder,
    build_segmentation_data,
    load_label,
)
from repvgg.segmentation.evaluate import evaluate_segmenter_file
from repvgg.segmentation.metrics import (
    ConfusionMatrix,
    SegmentationMetrics,
    SegmenterComparison,
    compare_segmenters,
    confusion_matrix,
    evaluate_segmenter,
    metrics_from_confusion,
)
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
from repvgg.segmentation.synthetic import SHAPE_CLASSES, SyntheticConfig, SyntheticShapes
from repvgg.segmentation.train import poly_learning_rate, train_segmenter
from repvgg.segmentation.weights import load_segmenter, save_segmenter

__all__ = [
    "AUX_LOSS_WEIGHT",
    "ConfusionMatrix",
    "EXPECTED_LAYOUT",
    "FAST_DILATED_LAYERS",
    "IGNORE_INDEX",
    "PSPNet",
    "PyramidPooling",
    "ResNetBackbone",
    "SHAPE_CLASSES",
    "SegmentationDataBundle",
    "SegmentationFolder",
    "SegmentationMetrics",
    "SegmentationOutput",
    "SegmenterComparison",
    "SegmenterConfig",
    "SegTrainConfig",
    "SyntheticConfig",
    "SyntheticShapes",
    "build_segmentation_data",
    "build_segmenter",
    "compare_segmenters",
    "confusion_matrix",
    "create_repvgg_backbone",
    "create_segmenter",
    "evaluate_segmenter",
    "evaluate_segmenter_file",
    "list_backbones",
    "load_label",
    "load_segmenter",
    "main_logits",
    "metrics_from_confusion",
    "poly_learning_rate",
    "save_segmenter",
    "segmentation_loss",
    "train_segmenter",
]

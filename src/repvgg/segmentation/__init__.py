"""Semantic segmentation with RepVGG backbones: PSPNet, data, metrics and the training job (RepVGG paper, Sec. 4.3).

Not imported by ``import repvgg``; use ``import repvgg.segmentation`` (names load on first use). Data
loading needs numpy and Pillow, the ResNet baselines torchvision (all installed with torchvision).

=================  ============================================================================
``pspnet``         ``SegmenterConfig``, ``PSPNet``, ``create_segmenter``, ``segmentation_loss``
``synthetic``      the embedded default data: generated shape scenes with per-pixel labels
``data``           a folder of images and label PNGs, and ``build_segmentation_data``
``transforms``     joint augmentation on uint8 with torchvision v2 (scale, pad, crop, flip), normalisation last
``metrics``        confusion matrix, IoU, mean IoU, pixel accuracy, ``compare_segmenters``
``config``         ``SegTrainConfig``: the training recipe as data (YAML/JSON + flags)
``train``          ``train_segmenter``: the ``repvgg seg-train`` job, resumable, ``torchrun``-ready
``evaluate``       scores and speed of a trained segmenter and its converted copy; tables
``weights``        ``save_segmenter`` / ``load_segmenter``: files that rebuild the segmenter alone
``plots``          ``predictions.png`` (input | ground truth | prediction) and ``curves.png``
``export``         the ONNX graph (normalisation, network, argmax) of any height and width, checked in two runtimes
``predict``        ``SegmentationPredictor``: masks of new images, for ``repvgg predict``
=================  ============================================================================
"""

from repvgg.lazy import lazy_exports

#: Public name -> the module that defines it, imported on first use (``repvgg seg-train --help`` needs
#: only the torch-free ``config``).
_EXPORTS = {
    "AUX_LOSS_WEIGHT": "repvgg.segmentation.config",
    "ConfusionMatrix": "repvgg.segmentation.metrics",
    "EXPECTED_LAYOUT": "repvgg.segmentation.data",
    "FAST_DILATED_LAYERS": "repvgg.segmentation.config",
    "IGNORE_INDEX": "repvgg.segmentation.pspnet",
    "PSPNet": "repvgg.segmentation.pspnet",
    "PyramidPooling": "repvgg.segmentation.pspnet",
    "ResNetBackbone": "repvgg.dense.backbones",
    "SHAPE_CLASSES": "repvgg.segmentation.synthetic",
    "SegTrainConfig": "repvgg.segmentation.config",
    "SegmentationDataBundle": "repvgg.segmentation.data",
    "SegmentationFolder": "repvgg.segmentation.data",
    "SegmentationMetrics": "repvgg.segmentation.metrics",
    "SegmentationOutput": "repvgg.segmentation.pspnet",
    "SegmenterComparison": "repvgg.segmentation.metrics",
    "SegmenterConfig": "repvgg.segmentation.pspnet",
    "SyntheticConfig": "repvgg.segmentation.synthetic",
    "SyntheticShapes": "repvgg.segmentation.synthetic",
    "build_segmentation_data": "repvgg.segmentation.data",
    "build_segmenter": "repvgg.segmentation.pspnet",
    "compare_segmenters": "repvgg.segmentation.metrics",
    "confusion_matrix": "repvgg.segmentation.metrics",
    "create_repvgg_backbone": "repvgg.dense.backbones",
    "create_segmenter": "repvgg.segmentation.pspnet",
    "evaluate_segmenter": "repvgg.segmentation.metrics",
    "evaluate_segmenter_file": "repvgg.segmentation.evaluate",
    "list_backbones": "repvgg.segmentation.pspnet",
    "load_label": "repvgg.segmentation.data",
    "load_segmenter": "repvgg.segmentation.weights",
    "main_logits": "repvgg.segmentation.pspnet",
    "metrics_from_confusion": "repvgg.segmentation.metrics",
    "poly_learning_rate": "repvgg.segmentation.train",
    "save_segmenter": "repvgg.segmentation.weights",
    "segmentation_loss": "repvgg.segmentation.pspnet",
    "train_segmenter": "repvgg.segmentation.train",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports("repvgg.segmentation", globals(), _EXPORTS)

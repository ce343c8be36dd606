"""Object detection with RepVGG backbones: torchvision's FCOS or RetinaNet on a feature pyramid, or the real-time
detector in YOLOv6's design (EfficientRep, Rep-PAN, an efficient decoupled head), COCO data and metrics, and the
training job.

Not imported by ``import repvgg``; use ``import repvgg.detection`` (names load on first use). Needs torchvision, and
pycocotools for COCO's metrics (the ``train`` extra).

=============  ===================================================================================================
``detector``   ``DetectorConfig``, ``build_detector``, ``create_detector``: FCOS / RetinaNet over a RepVGG pyramid
``yolo``       the real-time kind: SimSPPF, Rep-PAN, the decoupled head, decoding and per-image NMS
``tal``        its training: task-aligned assignment, the varifocal and GIoU losses
``coco``       COCO annotation files, read and checked; the generated scenes in the same form
``data``       letterboxed, box-padded training samples; augmentation through torchvision.transforms.v2
``metrics``    COCO AP by ``pycocotools.COCOeval``; two detectors compared box by box
``config``     ``DetTrainConfig``: the training recipe as data (YAML/JSON + flags)
``train``      ``train_detector``: the ``repvgg det-train`` job, resumable
``weights``    ``save_detector`` / ``load_detector``: files that rebuild the detector alone
``export``     the ONNX graph (resize to NMS), checked in ONNX Runtime and OpenVINO
``runtime``    the fastest verified way to run a detector: PyTorch, ONNX Runtime or OpenVINO, weighed
``predict``    ``DetectionPredictor``: boxes in new images, for ``repvgg predict``
``plots``      ``predictions.png`` and ``curves.png``
=============  ===================================================================================================
"""

from repvgg.lazy import lazy_exports

_EXPORTS = {
    "CocoSet": "repvgg.detection.coco",
    "DetTrainConfig": "repvgg.detection.config",
    "DetectionDataBundle": "repvgg.detection.data",
    "DetectionSet": "repvgg.detection.data",
    "DetectorConfig": "repvgg.detection.detector",
    "build_detection_data": "repvgg.detection.data",
    "build_validation_set": "repvgg.detection.data",
    "build_detector": "repvgg.detection.detector",
    "coco_from_scenes": "repvgg.detection.coco",
    "coco_scores": "repvgg.detection.metrics",
    "compare_detectors": "repvgg.detection.metrics",
    "create_detector": "repvgg.detection.detector",
    "load_detector": "repvgg.detection.weights",
    "read_coco": "repvgg.detection.coco",
    "save_detector": "repvgg.detection.weights",
    "train_detector": "repvgg.detection.train",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports("repvgg.detection", globals(), _EXPORTS)

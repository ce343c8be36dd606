"""A detector on RepVGG features: torchvision's FCOS (the default) or RetinaNet on a feature pyramid, or the
real-time one-stage detector in YOLOv6's design ([`repvgg.detection.yolo`][repvgg.detection.yolo], ``kind="yolo"``).

The backbone is any registered RepVGG, QARepVGG or RepVGGplus, built with ``features_only`` (its ``feature_info``
sizes the pyramid); ``torchvision.ops.FeaturePyramidNetwork`` turns its stages into P3-P5 and adds P6 and P7 from
P5 as torchvision's FCOS and RetinaNet do (Tian et al., FCOS, ICCV 2019; Lin et al., RetinaNet, ICCV 2017). The
pyramid's width and the head's depth are options, so that a detector fits a small CPU. Only the backbone has
multi-branch blocks: converting the detector ([`repvgg.reparameterize_model`][repvgg.nn.convert.reparameterize_model])
fuses them and leaves the pyramid and the head (GroupNorm, no BatchNorm) as they are.

Images go in as a list of float ``(3, H, W)`` tensors in [0, 1]; torchvision's transform normalises them with the
ImageNet statistics and resizes them to ``image_size`` (the longer side), as the detector was trained.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from repvgg.dense.backbones import RESNET_DEPTHS, ResNetBackbone
from repvgg.detection.config import DETECTOR_KINDS
from repvgg.detection.yolo import YoloDetector
from repvgg.io.card import IMAGENET_MEAN, IMAGENET_STD
from repvgg.io.loading import create_model
from repvgg.limits import MAX_CLASSES, MAX_IMG_SIZE, brief, check_float, check_int
from repvgg.nn.convert import is_converted
from repvgg.nn.registry import canonical_name
from repvgg.serialization import DictMixin

__all__ = ["DETECTOR_KINDS", "Detector", "DetectorConfig", "FCOSDetector", "FeaturePyramid", "NECK_DEPTHS",
           "RetinaNetDetector", "YoloDetector", "build_detector", "create_detector"]

#: Groups of the heads' GroupNorm (FCOS's head fixes 32).
NORM_GROUPS = 32
#: The yolo detector's Rep-PAN depth per backbone (YOLOv6's 12 x 0.33 for n and s; fewer for t, sized for speed).
NECK_DEPTHS = {"efficientrep_t": 1, "efficientrep_n": 4, "efficientrep_s": 4}


@dataclass(frozen=True)
class DetectorConfig(DictMixin):
    """Everything that defines a detector, as plain data (stored with its weights to rebuild it).

    Attributes:
        backbone: a registered RepVGG name (``"repvgg_a0"``, ``"qarepvgg_a0"``, ``"repvggplus_tiny"``, ...), or
            ``"resnet18"`` / ``"resnet34"`` / ``"resnet50"`` / ``"resnet101"`` (torchvision's, the speed baselines).
        num_classes: object classes (no background class).
        kind: ``"fcos"`` (anchor-free, the default), ``"retinanet"``, or ``"yolo"`` (YOLOv6's design: Rep-PAN and
            an efficient decoupled head; an ``efficientrep_*`` backbone).
        out_indices: the backbone stages the pyramid reads (2, 3, 4: strides 8, 16, 32; the yolo kind reads these).
        fpn_channels: the pyramid's width, a multiple of 32 from 64 (the heads normalise in 32 groups of at least two
            channels); 256 in the papers. ``None``: 64; the yolo kind has none (its neck's widths are half the
            backbone's).
        head_convs: 3x3 convs in each head tower (4 in the papers); ``None``: 2, and 1 for the yolo kind (YOLOv6's).
        neck_depth: RepVGG blocks in each of the yolo kind's four Rep-PAN RepBlocks; ``None``: the backbone's
            (`NECK_DEPTHS`, 2 for other backbones). The other kinds have none.
        image_size: the longer side images are resized to, in and out of training.
        score_threshold: detections scoring below it are dropped.
        nms_threshold: IoU above which non-maximum suppression drops the lower-scoring box of a class.
        detections_per_image: at most this many detections per image, best first.
        in_chans: input image channels.
    """

    backbone: str = "repvgg_a0"
    num_classes: int = 4
    kind: str = "fcos"
    out_indices: tuple[int, ...] = (2, 3, 4)
    fpn_channels: int | None = None
    head_convs: int | None = None
    neck_depth: int | None = None
    image_size: int = 128
    score_threshold: float = 0.05
    nms_threshold: float = 0.6
    detections_per_image: int = 100
    in_chans: int = 3

    def _resolve_kind_defaults(self) -> None:
        """Fill the kind's defaults (``None`` fields) and refuse what the kind has not."""
        yolo = self.kind == "yolo"
        if yolo and self.fpn_channels is not None:
            raise ValueError("the yolo detector has no fpn_channels: its Rep-PAN neck is half as wide as each backbone "
                             "stage it reads; choose the width with the backbone (efficientrep_t, _n, _s)")
        if not yolo and self.neck_depth is not None:
            raise ValueError(f"neck_depth sets the yolo detector's Rep-PAN; the {self.kind} detector's pyramid has "
                             "no blocks to set")
        if yolo:
            default_depth = NECK_DEPTHS.get(self.backbone.removeprefix("qa"), 2)
            object.__setattr__(self, "neck_depth", default_depth if self.neck_depth is None else self.neck_depth)
            check_int(self.neck_depth, "neck_depth", low=1, high=16)
        else:
            object.__setattr__(self, "fpn_channels", 64 if self.fpn_channels is None else self.fpn_channels)
        object.__setattr__(self, "head_convs", (1 if yolo else 2) if self.head_convs is None else self.head_convs)

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not isinstance(self.kind, str):
            raise ValueError(f"backbone and kind must be names, got {brief(self.backbone)} and {brief(self.kind)}")
        if not isinstance(self.out_indices, (list, tuple)) \
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.out_indices):
            raise ValueError(f"out_indices must be a list of stage indices among 1-4, got {brief(self.out_indices)}")
        object.__setattr__(self, "out_indices", tuple(self.out_indices))
        if self.backbone not in RESNET_DEPTHS:
            object.__setattr__(self, "backbone", canonical_name(self.backbone))
        if self.kind not in DETECTOR_KINDS:
            raise ValueError(f"kind must be one of {', '.join(DETECTOR_KINDS)}, got {self.kind!r}")
        check_int(self.num_classes, "num_classes", low=1, high=MAX_CLASSES)
        self._resolve_kind_defaults()
        if self.kind != "yolo" and (not isinstance(self.fpn_channels, int) or self.fpn_channels % NORM_GROUPS or not
                                    2 * NORM_GROUPS <= self.fpn_channels <= 4096):
            # a group of one channel has one value to normalise on a 1x1 map (P7 of a small image): GroupNorm refuses
            raise ValueError(f"fpn_channels must be a multiple of {NORM_GROUPS} from {2 * NORM_GROUPS} to 4096 (the "
                             f"heads normalise in {NORM_GROUPS} groups of at least two channels), got "
                             f"{self.fpn_channels!r}")
        check_int(self.head_convs, "head_convs", low=0, high=16)
        check_int(self.image_size, "image_size", low=32, high=MAX_IMG_SIZE)
        check_int(self.detections_per_image, "detections_per_image", low=1, high=10_000)
        check_int(self.in_chans, "in_chans", low=1, high=64)
        check_float(self.score_threshold, "score_threshold", low=0, high=1)
        check_float(self.nms_threshold, "nms_threshold", low=0, high=1)
        if not self.out_indices or sorted(set(self.out_indices)) != list(self.out_indices) \
                or not set(self.out_indices) <= {1, 2, 3, 4}:
            raise ValueError(f"out_indices must be increasing stage indices among 1-4, got {self.out_indices!r}")


class FeaturePyramid(nn.Module):
    """A features-only backbone and a feature pyramid over its maps, with P6 and P7 added from the last level
    (what torchvision's detectors take as ``backbone``: an ``out_channels`` attribute and a dict of maps)."""

    def __init__(self, body: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = body
        info: Any = body.feature_info
        self.fpn = FeaturePyramidNetwork(info.channels(), out_channels,
                                         extra_blocks=LastLevelP6P7(out_channels, out_channels))
        self.out_channels = out_channels
        self.strides: list[int] = [*info.reduction()]
        self.strides += [self.strides[-1] * 2, self.strides[-1] * 4]  # P6, P7

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class _OurDetector:
    """What this package adds to torchvision's detectors: the configuration that rebuilds it, a name, and whether
    its backbone is converted."""

    config: DetectorConfig
    name: str
    backbone: FeaturePyramid
    transform: GeneralizedRCNNTransform

    @property
    def deploy(self) -> bool:
        """True once every multi-branch block of the backbone is fused."""
        return is_converted(self.backbone)


class FCOSDetector(_OurDetector, FCOS):
    """torchvision's FCOS on a RepVGG feature pyramid."""


class RetinaNetDetector(_OurDetector, RetinaNet):
    """torchvision's RetinaNet on a RepVGG feature pyramid."""


Detector = FCOSDetector | RetinaNetDetector | YoloDetector


def _anchors(config: DetectorConfig, strides: list[int]) -> AnchorGenerator:
    if config.kind == "fcos":  # one point per location, sized by its level's stride (torchvision's FCOS)
        return AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    # RetinaNet: three scales and three aspect ratios per location, 4 x the stride at the smallest scale
    sizes = tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in strides)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))


def _head(config: DetectorConfig, anchors: AnchorGenerator) -> nn.Module:
    channels, per_location = config.fpn_channels, anchors.num_anchors_per_location()[0]
    if config.kind == "fcos":
        return FCOSHead(channels, per_location, config.num_classes, num_convs=config.head_convs)
    head = RetinaNetHead(channels, per_location, config.num_classes, norm_layer=partial(nn.GroupNorm, NORM_GROUPS))
    for tower in (head.classification_head, head.regression_head):  # torchvision builds 4 convs: keep head_convs
        tower.conv = tower.conv[: config.head_convs]
    return head


def build_detector(config: DetectorConfig, *, backbone_weights: str | os.PathLike[str] | None = None,
                   deploy: bool = False) -> Detector:
    """The detector ``config`` describes (training-time blocks unless ``deploy``), its backbone loaded from
    ``backbone_weights`` when given (any weights file the package reads; the classifier in it is ignored)."""
    body: nn.Module
    if config.backbone in RESNET_DEPTHS:
        body = ResNetBackbone(RESNET_DEPTHS[config.backbone], output_stride=32, out_indices=config.out_indices,
                              in_chans=config.in_chans, deploy=deploy, weights=backbone_weights)
    else:
        body = create_model(config.backbone, weights=backbone_weights, in_chans=config.in_chans, deploy=deploy,
                            features_only=True, out_indices=config.out_indices)
    if config.kind == "yolo":
        return YoloDetector(config, body, deploy=deploy)
    assert config.fpn_channels is not None  # resolved by the config
    backbone = FeaturePyramid(body, config.fpn_channels)
    anchors = _anchors(config, backbone.strides)
    detector_class: Any = FCOSDetector if config.kind == "fcos" else RetinaNetDetector
    model: Detector = detector_class(
        backbone, config.num_classes, min_size=config.image_size, max_size=config.image_size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), anchor_generator=anchors,
        head=_head(config, anchors), score_thresh=config.score_threshold, nms_thresh=config.nms_threshold,
        detections_per_img=config.detections_per_image,
    )
    model.config = config
    model.name = f"{config.kind}-{config.backbone}"
    return model


def create_detector(backbone: str, num_classes: int, *, backbone_weights: str | os.PathLike[str] | None = None,
                    deploy: bool = False, **options: Any) -> Detector:
    """Build a detector by backbone name: ``create_detector("repvgg_a0", num_classes=80, kind="retinanet")``.

    Args:
        backbone: any registered RepVGG, QARepVGG or RepVGGplus name.
        num_classes: object classes.
        backbone_weights: a weights file for the backbone (classification weights, a checkpoint or a deploy file).
        deploy: build the converted form (to load a converted detector's state dict).
        **options: any other [`DetectorConfig`][repvgg.detection.detector.DetectorConfig] field.
    """
    config = DetectorConfig.from_dict({"backbone": backbone, "num_classes": num_classes, **options})
    return build_detector(config, backbone_weights=backbone_weights, deploy=deploy)


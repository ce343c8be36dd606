"""A real-time one-stage detector in YOLOv6's design (Li et al., YOLOv6 v1 and v3, 2022/2023), built from RepVGG
blocks: ``kind="yolo"``.

- **Backbone:** EfficientRep (``efficientrep_t/n/s``, or any registered RepVGG / QARepVGG): per stage a stride-2
  RepVGG block and a RepBlock of n more, then SimSPPF (a 1x1 conv, three chained 5x5 max-pools, a 1x1 conv over the
  four maps).
- **Neck:** Rep-PAN: top-down (1x1 reduce, nearest upsampling, concatenation, RepBlock) and bottom-up (stride-2
  3x3 conv, concatenation, RepBlock) over strides 8, 16 and 32, each level half its backbone stage's width.
- **Head:** the efficient decoupled head: per level a 1x1 stem, then a class branch and a box branch of ``head_convs``
  3x3 convs, anchor-free (one point per location), box distances to the four sides in strides (softplus keeps them
  positive). ReLU throughout, so the converted network is convs and ReLUs only.

Training assigns points to objects by task alignment and scores them with the varifocal and GIoU losses
([`repvgg.detection.tal`][repvgg.detection.tal]). Images go in and detections come out exactly as for the FCOS kind:
torchvision's ``GeneralizedRCNNTransform`` resizes and normalises, and maps the boxes back to each image's pixels.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import _topk_min
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, clip_boxes_to_image

from repvgg.detection.tal import AssignConfig, pad_targets, yolo_losses
from repvgg.io.card import IMAGENET_MEAN, IMAGENET_STD
from repvgg.nn.block import ConvBNReLU, RepVGGBlock
from repvgg.nn.convert import is_converted

__all__ = ["DecoupledHead", "RepBlock", "RepPAN", "SimSPPF", "YoloDetector", "YoloFeatures", "anchor_points"]

#: Box candidates kept per image before non-maximum suppression (YOLOv6 and ultralytics keep a few thousand).
CANDIDATES = 1000
#: The class branch's initial probability (Lin et al., focal loss): few points are objects.
PRIOR = 0.01


class RepBlock(nn.Sequential):
    """``depth`` RepVGG blocks, the first from ``in_channels`` to ``out_channels`` (YOLOv6's RepBlock)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, *, quant_friendly: bool = False,
                 deploy: bool = False) -> None:
        super().__init__(*(RepVGGBlock(in_channels if i == 0 else out_channels, out_channels,
                                       quant_friendly=quant_friendly, deploy=deploy) for i in range(depth)))


class SimSPPF(nn.Module):
    """Spatial pyramid pooling, fast and plain (YOLOv6): a 1x1 conv to half the channels, three chained 5x5
    max-pools, and a 1x1 conv over the four maps."""

    def __init__(self, in_channels: int, out_channels: int, *, deploy: bool = False) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.reduce = ConvBNReLU(in_channels, hidden, deploy=deploy)
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)
        self.fuse = ConvBNReLU(4 * hidden, out_channels, deploy=deploy)

    def forward(self, x: Tensor) -> Tensor:
        maps = [self.reduce(x)]
        for _ in range(3):
            maps.append(self.pool(maps[-1]))
        return self.fuse(torch.cat(maps, 1))


class RepPAN(nn.Module):
    """Rep-PAN over the backbone's stride-8, 16 and 32 maps (``channels``): top-down, then bottom-up, with RepBlocks
    of ``depth`` blocks; its outputs have ``widths`` channels (half the backbone's at each level)."""

    def __init__(self, channels: tuple[int, int, int], depth: int, *, quant_friendly: bool = False,
                 deploy: bool = False) -> None:
        super().__init__()
        c3, c4, c5 = channels
        n3, n4, n5 = (max(8, c // 2) for c in channels)
        self.widths = (n3, n4, n5)

        def rep(cin: int, cout: int) -> RepBlock:
            return RepBlock(cin, cout, depth, quant_friendly=quant_friendly, deploy=deploy)

        self.reduce5 = ConvBNReLU(c5, n4, deploy=deploy)
        self.top4 = rep(c4 + n4, n4)
        self.reduce4 = ConvBNReLU(n4, n3, deploy=deploy)
        self.top3 = rep(c3 + n3, n3)
        self.down3 = ConvBNReLU(n3, n3, 3, stride=2, deploy=deploy)
        self.bottom4 = rep(n3 + n3, n4)
        self.down4 = ConvBNReLU(n4, n4, 3, stride=2, deploy=deploy)
        self.bottom5 = rep(n4 + n4, n5)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        x3, x4, x5 = maps
        lateral5 = self.reduce5(x5)
        top4 = self.top4(torch.cat([_upsample(lateral5, x4), x4], 1))
        lateral4 = self.reduce4(top4)
        out3 = self.top3(torch.cat([_upsample(lateral4, x3), x3], 1))
        out4 = self.bottom4(torch.cat([self.down3(out3), lateral4], 1))
        out5 = self.bottom5(torch.cat([self.down4(out4), lateral5], 1))
        return [out3, out4, out5]


def _upsample(x: Tensor, like: Tensor) -> Tensor:
    """``x`` upsampled twice (nearest) to ``like``'s size. By a fixed factor, not to ``like``'s shape: an exported
    graph then reads no shape of a quantized map (OpenVINO's INT8 pipeline mis-computes a map whose shape is read).
    The detector's input sides are multiples of 32 (the transform pads them), so every level is twice the next."""
    if not torch.jit.is_tracing() and (x.shape[-1] * 2 != like.shape[-1] or x.shape[-2] * 2 != like.shape[-2]):
        raise ValueError(f"Rep-PAN needs input sides that are multiples of 32, got maps {tuple(like.shape[-2:])} and "
                         f"{tuple(x.shape[-2:])}")
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class YoloFeatures(nn.Module):
    """The backbone's last three stages, SimSPPF on the last, and Rep-PAN: what the head reads, as a dict of maps
    (the ``backbone`` of a detector here; its INT8 export quantizes all of it)."""

    def __init__(self, body: nn.Module, neck_depth: int, *, deploy: bool = False) -> None:
        super().__init__()
        info: Any = body.feature_info
        channels = tuple(info.channels())
        if len(channels) != 3:
            raise ValueError(f"the yolo detector reads three backbone stages (strides 8, 16, 32), got {len(channels)}")
        quant_friendly = bool(getattr(getattr(body, "spec", None), "quant_friendly", False))
        self.body = body
        self.sppf = SimSPPF(channels[2], channels[2], deploy=deploy)
        self.neck = RepPAN(channels, neck_depth, quant_friendly=quant_friendly, deploy=deploy)
        self.out_channels = self.neck.widths
        self.strides: list[int] = [*info.reduction()]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        x3, x4, x5 = self.body(x)
        return OrderedDict((str(i), m) for i, m in enumerate(self.neck([x3, x4, self.sppf(x5)])))


class DecoupledHead(nn.Module):
    """YOLOv6's efficient decoupled head: per level a 1x1 stem, then ``convs`` 3x3 convs and a 1x1 prediction in each
    of a class branch (``num_classes`` logits) and a box branch (4 distances, before softplus)."""

    def __init__(self, widths: tuple[int, ...], num_classes: int, convs: int, *, deploy: bool = False) -> None:
        super().__init__()

        def branch(width: int) -> nn.Sequential:
            return nn.Sequential(*(ConvBNReLU(width, width, 3, deploy=deploy) for _ in range(convs)))

        self.stems = nn.ModuleList(ConvBNReLU(w, w, deploy=deploy) for w in widths)
        self.cls_convs = nn.ModuleList(branch(w) for w in widths)
        self.reg_convs = nn.ModuleList(branch(w) for w in widths)
        self.cls_preds = nn.ModuleList(nn.Conv2d(w, num_classes, 1) for w in widths)
        self.reg_preds = nn.ModuleList(nn.Conv2d(w, 4, 1) for w in widths)
        self.num_classes = num_classes
        for conv in (*self.cls_preds, *self.reg_preds):
            nn.init.zeros_(conv.weight)
        for cls_pred, reg_pred in zip(self.cls_preds, self.reg_preds):
            assert isinstance(cls_pred, nn.Conv2d) and isinstance(reg_pred, nn.Conv2d)
            assert cls_pred.bias is not None and reg_pred.bias is not None
            nn.init.constant_(cls_pred.bias, -math.log((1 - PRIOR) / PRIOR))
            nn.init.constant_(reg_pred.bias, math.log(math.e - 1))  # softplus(b) = 1: a box one stride around

    def forward(self, maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Class logits ``(B, N, num_classes)`` and raw box distances ``(B, N, 4)`` over every level's points."""
        logits, distances = [], []
        for i, x in enumerate(maps):
            x = self.stems[i](x)
            logits.append(self.cls_preds[i](self.cls_convs[i](x)).flatten(2))
            distances.append(self.reg_preds[i](self.reg_convs[i](x)).flatten(2))
        return torch.cat(logits, 2).transpose(1, 2), torch.cat(distances, 2).transpose(1, 2)


def anchor_points(batch: Tensor, strides: list[int]) -> tuple[Tensor, Tensor]:
    """Every location's centre ``(N, 2)`` (``x, y`` in input pixels) over the levels of a ``batch`` whose sides are
    multiples of the strides, in the head's order, and its level's stride ``(N, 1)``. The sizes come from the input,
    not from the maps (see `_upsample`)."""
    points, scales = [], []
    for stride in strides:
        height, width = batch.shape[-2] // stride, batch.shape[-1] // stride
        ys = (torch.arange(height, device=batch.device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(width, device=batch.device, dtype=torch.float32) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        level = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], 1)
        points.append(level)
        scales.append(torch.full_like(level[:, :1], float(stride)))
    return torch.cat(points), torch.cat(scales)


def decode_boxes(points: Tensor, strides: Tensor, distances: Tensor) -> Tensor:
    """``x1, y1, x2, y2`` boxes from raw distances (left, top, right, bottom, in strides before softplus)."""
    ltrb = F.softplus(distances.float()) * strides
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)


class YoloDetector(nn.Module):
    """The real-time detector: resize and normalise, features, decoupled head, then the losses (training, given
    ``targets`` as torchvision's detectors take them) or per-image detections over ``score_threshold`` after
    class-wise non-maximum suppression, in each input image's pixels.

    ``config`` is the [`DetectorConfig`][repvgg.detection.detector.DetectorConfig] it was built from.
    """

    def __init__(self, config: Any, body: nn.Module, *, deploy: bool = False) -> None:
        super().__init__()
        self.config = config
        self.name = f"yolo-{config.backbone}"
        self.transform = GeneralizedRCNNTransform(config.image_size, config.image_size, list(IMAGENET_MEAN),
                                                  list(IMAGENET_STD))
        self.backbone = YoloFeatures(body, config.neck_depth, deploy=deploy)
        self.head = DecoupledHead(self.backbone.out_channels, config.num_classes, config.head_convs, deploy=deploy)
        self.assign = AssignConfig()

    @property
    def deploy(self) -> bool:
        """True once every block and every conv-BN pair is fused."""
        return is_converted(self)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if self.training and targets is None:
            raise ValueError("a detector in training mode needs targets (boxes and labels per image)")
        original_sizes = [(img.shape[-2], img.shape[-1]) for img in images]  # traced as sizes in an export
        batch, targets = self.transform(images, targets)
        logits, boxes, points = self._predict(batch.tensors)
        if self.training:
            assert targets is not None
            gt_boxes, gt_labels = pad_targets(targets)
            return yolo_losses(logits.float(), boxes, points, gt_boxes, gt_labels, self.assign)
        found = [self._detections(s, b, size) for s, b, size in zip(logits.sigmoid(), boxes, batch.image_sizes)]
        return self.transform.postprocess(found, batch.image_sizes, original_sizes)

    def _predict(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Class logits ``(B, N, C)``, boxes ``(B, N, 4)`` and the points ``(N, 2)`` of a normalised batch."""
        maps = list(self.backbone(batch).values())
        logits, distances = self.head(maps)
        points, strides = anchor_points(batch, self.backbone.strides)
        return logits, decode_boxes(points, strides, distances), points

    @torch.no_grad()
    def candidates(self, images: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Every point's box ``(B, N, 4)`` (in the resized images' pixels, clipped to each as `_detections` clips
        it) and class scores ``(B, N, C)``, before the threshold and NMS: what a converted detector must reproduce."""
        batch = self.transform(images)[0]
        logits, boxes, _ = self._predict(batch.tensors)
        clipped = [clip_boxes_to_image(b, size) for b, size in zip(boxes, batch.image_sizes)]
        return torch.stack(clipped), logits.sigmoid()

    def _detections(self, scores: Tensor, boxes: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        """One image's detections: the best-scoring (point, class) pairs over the threshold, class-wise NMS.

        Exported graphs must hold when nothing passes the threshold: the boxes are clipped while every point has one
        (ONNX Runtime's INT8 graph cannot reshape an empty clip), and a placeholder scoring -1 keeps NMS's input from
        being empty (OpenVINO answers an empty NMS with a row of garbage); the threshold drops it after NMS, which
        keeps what thresholding first would (a box under it never suppresses one over it)."""
        threshold = self.config.score_threshold
        boxes = clip_boxes_to_image(boxes, size)
        flat = scores.flatten()
        keep = torch.where(flat > threshold)[0]
        top, order = flat[keep].topk(_topk_min(keep, CANDIDATES, 0))
        keep = keep[order]
        classes = scores.shape[1]
        point, labels = torch.div(keep, classes, rounding_mode="floor"), keep % classes
        kept_boxes, top = torch.cat([boxes[point], boxes.new_zeros(1, 4)]), torch.cat([top, top.new_full((1,), -1.0)])
        labels = torch.cat([labels, labels.new_zeros(1)])
        best = batched_nms(kept_boxes, top, labels, self.config.nms_threshold)
        best = best[top[best] > threshold][: self.config.detections_per_image]
        return {"boxes": kept_boxes[best], "scores": top[best], "labels": labels[best]}

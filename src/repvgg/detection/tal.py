"""Training the yolo detector: task-aligned assignment (Feng et al., TOOD, ICCV 2021, as YOLOv6 uses it) and its
losses, the varifocal loss for classes (Zhang et al., VarifocalNet, CVPR 2021) and GIoU for boxes
(``torchvision.ops``).

Assignment, per object: the points inside its box are candidates; each candidate's alignment is
``s ** alpha * u ** beta`` (``s`` the predicted probability of the object's class there, ``u`` the IoU of the box
predicted there with the object's); the ``topk`` best-aligned candidates are its positives. A point chosen by
several objects keeps the one its box overlaps most. A positive's class target is its alignment scaled so that the
object's best point gets the object's best IoU (a soft, quality-aware label); every other point's targets are 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou_loss

__all__ = ["AssignConfig", "Assignment", "pad_targets", "task_aligned_assign", "varifocal_loss", "yolo_losses"]


@dataclass(frozen=True)
class AssignConfig:
    """The assignment's and the losses' constants (YOLOv6's): ``topk`` positives per object, the alignment's
    exponents, the varifocal loss's ``vfl_alpha`` and ``vfl_gamma``, and each loss's weight in the sum."""

    topk: int = 13
    alpha: float = 1.0
    beta: float = 6.0
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0
    class_weight: float = 1.0
    box_weight: float = 2.5


class Assignment(NamedTuple):
    """Per point: whether it is a positive ``(B, N)``, its object's box ``(B, N, 4)`` and class ``(B, N)`` (-1
    where none), and its soft class targets ``(B, N, C)``."""

    positive: Tensor
    boxes: Tensor
    labels: Tensor
    scores: Tensor


def pad_targets(targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Per-image ``boxes`` and ``labels`` as ``(B, M, 4)`` and ``(B, M)`` tensors, padded with label -1."""
    most = max([1, *(len(t["labels"]) for t in targets)])
    device = targets[0]["boxes"].device
    boxes = torch.zeros(len(targets), most, 4, device=device)
    labels = torch.full((len(targets), most), -1, dtype=torch.int64, device=device)
    for i, t in enumerate(targets):
        boxes[i, : len(t["labels"])] = t["boxes"]
        labels[i, : len(t["labels"])] = t["labels"]
    return boxes, labels


@torch.no_grad()
def task_aligned_assign(scores: Tensor, boxes: Tensor, points: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                        config: AssignConfig = AssignConfig()) -> Assignment:
    """Assign points to objects by task alignment.

    Args:
        scores: predicted class probabilities ``(B, N, C)``.
        boxes: predicted boxes ``(B, N, 4)`` (``x1, y1, x2, y2``).
        points: the points ``(N, 2)`` (``x, y``), in the boxes' pixels.
        gt_boxes: objects' boxes ``(B, M, 4)``; gt_labels: their classes ``(B, M)``, -1 for padding.
    """
    batch, count, classes = scores.shape
    valid = gt_labels >= 0
    lt = points[None, None] - gt_boxes[:, :, None, :2]
    rb = gt_boxes[:, :, None, 2:] - points[None, None]
    candidate = (torch.cat([lt, rb], -1).amin(-1) > 1e-9) & valid[..., None]  # (B, M, N): strictly inside
    iou = torch.stack([box_iou(g, p) for g, p in zip(gt_boxes, boxes.float())]).clamp(min=0)
    class_scores = scores.float().gather(2, gt_labels.clamp(min=0)[:, None, :].expand(batch, count, -1))
    align = class_scores.transpose(1, 2).pow(config.alpha) * iou.pow(config.beta) * candidate
    best = align.topk(min(config.topk, count), dim=-1).indices
    chosen = torch.zeros_like(candidate).scatter_(-1, best, True) & candidate
    several = chosen.sum(1, keepdim=True) > 1  # (B, 1, N): the point keeps the object its box overlaps most
    closest = F.one_hot(torch.where(chosen, iou, -1.0).argmax(1), gt_labels.shape[1]).transpose(1, 2).bool()
    chosen = torch.where(several, closest & chosen, chosen)
    positive = chosen.any(1)
    index = chosen.to(torch.uint8).argmax(1)  # (B, N): the chosen object (0 where none)
    target_boxes = gt_boxes.gather(1, index[..., None].expand(-1, -1, 4))
    target_labels = torch.where(positive, gt_labels.gather(1, index), -1)
    align, iou = align * chosen, iou * chosen
    tiny = torch.finfo(align.dtype).tiny  # s * u ** 6 is small: an added epsilon would bias the targets
    normalised = align * iou.amax(-1, keepdim=True) / align.amax(-1, keepdim=True).clamp(min=tiny)
    quality = normalised.amax(1) * positive  # (B, N)
    target_scores = F.one_hot(target_labels.clamp(min=0), classes).float() * quality[..., None]
    return Assignment(positive, target_boxes, target_labels, target_scores)


def varifocal_loss(logits: Tensor, targets: Tensor, positive: Tensor, alpha: float = 0.75,
                   gamma: float = 2.0) -> Tensor:
    """The varifocal loss of every logit (not reduced): binary cross-entropy against the soft ``targets``, weighted
    by the target on an object's class at a positive (``positive``: ``(..., C)`` booleans) and by
    ``alpha * p ** gamma`` elsewhere."""
    probability = logits.sigmoid()
    weight = torch.where(positive, targets, alpha * probability.pow(gamma))
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight


def yolo_losses(logits: Tensor, boxes: Tensor, points: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                config: AssignConfig = AssignConfig()) -> dict[str, Tensor]:
    """The weighted ``classification`` (varifocal) and ``bbox_regression`` (GIoU, each positive weighted by its class
    target) losses of one batch, both divided by the sum of the class targets."""
    assigned = task_aligned_assign(logits.detach().sigmoid(), boxes.detach(), points, gt_boxes, gt_labels, config)
    total = assigned.scores.sum().clamp(min=1.0)
    on_class = F.one_hot(assigned.labels.clamp(min=0), logits.shape[-1]).bool() & assigned.positive[..., None]
    cls = varifocal_loss(logits, assigned.scores, on_class, config.vfl_alpha, config.vfl_gamma).sum() / total
    weight = assigned.scores.sum(-1)[assigned.positive]
    giou = generalized_box_iou_loss(boxes[assigned.positive], assigned.boxes[assigned.positive], reduction="none")
    box = (giou * weight).sum() / total
    return {"classification": config.class_weight * cls, "bbox_regression": config.box_weight * box}

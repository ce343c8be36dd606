"""Segmentation metrics from a confusion matrix: per-class IoU, mean IoU, pixel and mean class accuracy.

Pixels labelled with the ignore index (255) are left out everywhere. A class that appears in neither
the labels nor the predictions has no IoU (NaN) and is left out of the mean, as in the Cityscapes and
VOC evaluation scripts; a class that is predicted but never labelled has IoU 0 and counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repvgg.segmentation.pspnet import IGNORE_INDEX, main_logits
from repvgg.training.distributed import all_reduce
from repvgg.training.evaluate import compare_models

__all__ = [
    "confusion_matrix",
    "SegmentationMetrics",
    "metrics_from_confusion",
    "ConfusionMatrix",
    "evaluate_segmenter",
    "SegmenterComparison",
    "compare_segmenters",
]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = true class, columns = predicted class.

    Raises:
        ValueError: shapes differ, or a label / prediction lies outside ``0..num_classes-1``
            (labels may also be ``ignore_index``).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    for name, values in (("label", target), ("prediction", pred)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} values must lie in 0..{num_classes - 1} (labels may also be {ignore_index}); "
                f"got range {values.min().item()}..{values.max().item()}"
            )
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


@dataclass(frozen=True)
class SegmentationMetrics:
    """Scores in [0, 1]; ``iou`` has one entry per class (NaN where the class never occurs)."""

    mean_iou: float
    pixel_accuracy: float
    mean_accuracy: float
    iou: tuple[float, ...] = field(default=())

    def as_dict(self, class_names: Iterable[str] | None = None) -> dict[str, float]:
        """Flat ``{"miou": ..., "pixel_acc": ..., "mean_acc": ..., "iou/<class>": ...}`` for logs."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(len(self.iou))]
        out = {"miou": self.mean_iou, "pixel_acc": self.pixel_accuracy, "mean_acc": self.mean_accuracy}
        out.update({f"iou/{name}": value for name, value in zip(names, self.iou)})
        return out


def metrics_from_confusion(matrix: Tensor) -> SegmentationMetrics:
    """IoU = TP / (TP + FP + FN) per class, averaged over classes that occur; accuracies over labelled pixels."""
    m = matrix.to(torch.float64)
    tp = m.diagonal()
    labelled = m.sum(dim=1)
    predicted = m.sum(dim=0)
    union = labelled + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    class_acc = torch.where(labelled > 0, tp / labelled.clamp(min=1), torch.full_like(tp, math.nan))
    total = m.sum()
    return SegmentationMetrics(
        mean_iou=_nanmean(iou),
        pixel_accuracy=(tp.sum() / total).item() if total > 0 else math.nan,
        mean_accuracy=_nanmean(class_acc),
        iou=tuple(iou.tolist()),
    )


def _nanmean(values: Tensor) -> float:
    valid = values[~values.isnan()]
    return valid.mean().item() if valid.numel() else math.nan


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches; `compute` turns it into metrics."""

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of predicted class ids (or logits ``(N, C, H, W)``, argmaxed) and labels."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        self.matrix += confusion_matrix(pred, target, self.num_classes, ignore_index=self.ignore_index)

    def all_reduce(self) -> None:
        """Sum the matrices of all processes (no-op unless torch.distributed is initialised)."""
        self.matrix = all_reduce(self.matrix, "sum")

    def reset(self) -> None:
        self.matrix.zero_()

    def compute(self) -> SegmentationMetrics:
        return metrics_from_confusion(self.matrix)


@dataclass(frozen=True)
class SegmenterComparison:
    """Scores of several segmenters on the same pixels, and how each compares with the first.

    ``loss`` is the main-head cross-entropy per labelled pixel; ``max_abs_diff`` and ``agreement``
    (fraction of all pixels whose predicted class equals the first model's) and ``relative_error``
    ([`OutputDeviation`][repvgg.nn.convert.OutputDeviation], NaN if any output was not finite) have one entry per
    model after the first.
    """

    metrics: list[SegmentationMetrics]
    loss: list[float]
    max_abs_diff: list[float]
    relative_error: list[float]
    agreement: list[float]
    finite: list[bool]
    images: int
    pixels: int


def compare_segmenters(
    models: Sequence[nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    ignore_index: int = IGNORE_INDEX,
) -> SegmenterComparison:
    """Score every model (eval mode, restored afterwards) on every batch; compare the others' logits with the first's
    ([`compare_models`][repvgg.training.evaluate.compare_models]).

    Used to check that a converted segmenter computes what the training-time one does. In a
    distributed run each process passes its own shard; counts are summed and the largest
    difference is taken over processes, so every process gets the same result.
    """
    meters = [ConfusionMatrix(num_classes, ignore_index=ignore_index) for _ in models]
    sums = torch.zeros(len(models) + 1, dtype=torch.float64)  # main-head loss per model, labelled pixels

    def score(i: int, logits: Tensor, labels: Tensor) -> None:
        meters[i].update(logits.argmax(dim=1).cpu(), labels.cpu())
        labelled = int((labels != ignore_index).sum())
        if labelled:
            sums[i] += float(F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum"))
        if i == 0:
            sums[-1] += labelled

    comparison = compare_models(models, batches, device=device, score=score, output=main_logits)
    all_reduce(sums, "sum")
    for meter in meters:
        meter.all_reduce()
    labelled_total = max(1.0, float(sums[-1]))
    return SegmenterComparison(
        metrics=[meter.compute() for meter in meters],
        loss=[float(sums[i]) / labelled_total for i in range(len(models))],
        max_abs_diff=comparison.max_abs_diff,
        relative_error=comparison.relative_error,
        agreement=comparison.agreement,
        finite=comparison.finite,
        images=comparison.images,
        pixels=comparison.predictions,
    )


def evaluate_segmenter(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    ignore_index: int = IGNORE_INDEX,
) -> SegmentationMetrics:
    """``model``'s scores on ``(images, labels)`` batches (eval mode, its training flag restored afterwards).

    In a distributed run each process sees its own shard and the matrices are summed, so every process
    gets the same metrics.
    """
    return compare_segmenters([model], batches, num_classes, device=device, ignore_index=ignore_index).metrics[0]

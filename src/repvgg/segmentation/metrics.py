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

from repvgg.nn.convert import OutputDeviation
from repvgg.segmentation.pspnet import IGNORE_INDEX, main_logits
from repvgg.training.distributed import all_reduce

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
    """Accumulates a confusion matrix over batches; :meth:`compute` turns it into metrics."""

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


@torch.no_grad()
def evaluate_segmenter(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    ignore_index: int = IGNORE_INDEX,
) -> SegmentationMetrics:
    """Run ``model`` in eval mode over ``(images, labels)`` batches and score its argmax predictions.

    Restores the model's training flag afterwards. In a distributed run each process sees its own
    shard and the matrices are summed, so every process gets the same metrics.
    """
    was_training = model.training
    model.eval()
    meter = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    try:
        for images, labels in batches:
            logits = main_logits(model(images.to(device)))
            meter.update(logits.argmax(dim=1).cpu(), labels)
    finally:
        model.train(was_training)
    meter.all_reduce()
    return meter.compute()


@dataclass(frozen=True)
class SegmenterComparison:
    """Scores of several segmenters on the same pixels, and how each compares with the first.

    ``loss`` is the main-head cross-entropy per labelled pixel; ``max_abs_diff`` and ``agreement``
    (fraction of all pixels whose predicted class equals the first model's) and ``relative_error``
    (:class:`~repvgg.nn.convert.OutputDeviation`, NaN if any output was not finite) have one entry per
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


@torch.no_grad()
def compare_segmenters(
    models: Sequence[nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    ignore_index: int = IGNORE_INDEX,
) -> SegmenterComparison:
    """Run every model (eval mode) on every batch and score it; compare the others' logits with the first's.

    Used to check that a converted segmenter computes what the training-time one does. In a
    distributed run each process passes its own shard; counts are summed and the largest
    difference is taken over processes, so every process gets the same result.
    """
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    n = len(models)
    meters = [ConfusionMatrix(num_classes, ignore_index=ignore_index) for _ in models]
    sums = torch.zeros(n + max(0, n - 1) + 3, dtype=torch.float64)  # loss per model, agreement, labelled, px, images
    deviations = [OutputDeviation() for _ in range(n - 1)]
    nonfinite = torch.zeros(n, dtype=torch.float64)
    try:
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            outputs = [main_logits(m(images)).float() for m in models]
            labelled = int((labels != ignore_index).sum())
            preds = [logits.argmax(dim=1) for logits in outputs]
            for i, logits in enumerate(outputs):
                nonfinite[i] += float(not torch.isfinite(logits).all())
            for i, (logits, pred) in enumerate(zip(outputs, preds)):
                meters[i].update(pred.cpu(), labels.cpu())
                if labelled:
                    sums[i] += float(F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum"))
            for j in range(1, n):
                deviations[j - 1].update(outputs[0], outputs[j])
                sums[n + j - 1] += float((preds[j] == preds[0]).sum())
            sums[-3] += labelled
            sums[-2] += labels.numel()
            sums[-1] += labels.shape[0]
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    sums = all_reduce(sums, "sum")
    all_reduce(nonfinite, "sum")
    for deviation in deviations:
        all_reduce(deviation.sums, "sum")
        all_reduce(deviation.max_abs, "max")
    for meter in meters:
        meter.all_reduce()
    labelled_total, pixel_total = max(1.0, float(sums[-3])), max(1.0, float(sums[-2]))
    return SegmenterComparison(
        metrics=[meter.compute() for meter in meters],
        loss=[float(sums[i]) / labelled_total for i in range(n)],
        max_abs_diff=[d.max_abs_diff for d in deviations],
        relative_error=[d.relative for d in deviations],
        agreement=[float(sums[n + j]) / pixel_total for j in range(n - 1)],
        finite=[float(v) == 0 for v in nonfinite],
        images=int(sums[-1]),
        pixels=int(sums[-2]),
    )

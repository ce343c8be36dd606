"""Evaluation: top-1/top-5 of one or more models on the same batches, logit agreement, throughput."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from repvgg.limits import check_int
from repvgg.nn.convert import OutputDeviation, check_outputs
from repvgg.training.distributed import all_reduce

__all__ = ["EvalReport", "evaluate_models", "measure_throughput", "topk_correct"]


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top.eq(labels[:, None])
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@dataclass
class EvalReport:
    """Accuracies of each evaluated model, and how the others compare with the first one.

    ``finite[i]`` is False when model ``i`` produced a NaN or infinite output on some batch; the other
    models' ``max_abs_diff`` / ``relative_error`` are then NaN (never "identical").
    """

    images: int
    top1: list[float]
    top5: list[float]
    loss: list[float]
    finite: list[bool] = field(default_factory=list)
    max_abs_diff: list[float] = field(default_factory=list)  # vs model 0, per other model
    relative_error: list[float] = field(default_factory=list)  # ||other - model 0|| / ||model 0||
    agreement: list[float] = field(default_factory=list)  # fraction of equal argmax vs model 0


@torch.no_grad()
def evaluate_models(
    models: Sequence[nn.Module],
    loader: DataLoader,
    device: torch.device,
    *,
    channels_last: bool = False,
) -> EvalReport:
    """Run every model on every batch of ``loader`` and summarise (summed over processes if distributed).

    Comparing a training-time model with its converted copy on identical inputs gives the largest
    absolute and the relative logit difference (:class:`~repvgg.nn.convert.OutputDeviation`) and the
    fraction of predictions that agree.
    """
    for model in models:
        model.eval()
    n = len(models)
    stats = torch.zeros(4 * n + max(0, n - 1) + 1, dtype=torch.float64)  # top-1, top-5, loss, non-finite
    deviations = [OutputDeviation() for _ in range(n - 1)]
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        outputs = [m(images).float() for m in models]
        for i, logits in enumerate(outputs):
            c1, c5 = topk_correct(logits, labels)
            stats[4 * i] += c1
            stats[4 * i + 1] += c5
            stats[4 * i + 2] += float(criterion(logits, labels))
            stats[4 * i + 3] += float(not torch.isfinite(logits).all())
        for j, logits in enumerate(outputs[1:]):
            deviations[j].update(outputs[0], logits)
            stats[4 * n + j] += float((logits.argmax(1) == outputs[0].argmax(1)).sum())
        stats[-1] += labels.numel()
    all_reduce(stats, "sum")
    for deviation in deviations:
        all_reduce(deviation.sums, "sum")
        all_reduce(deviation.max_abs, "max")
    total = max(1.0, float(stats[-1]))
    return EvalReport(
        images=int(stats[-1]),
        top1=[100.0 * float(stats[4 * i]) / total for i in range(n)],
        top5=[100.0 * float(stats[4 * i + 1]) / total for i in range(n)],
        loss=[float(stats[4 * i + 2]) / total for i in range(n)],
        finite=[float(stats[4 * i + 3]) == 0 for i in range(n)],
        max_abs_diff=[d.max_abs_diff for d in deviations],
        relative_error=[d.relative for d in deviations],
        agreement=[float(stats[4 * n + j]) / total for j in range(n - 1)],
    )


@torch.no_grad()
def measure_throughput(
    models: Sequence[nn.Module],
    batch: Tensor,
    *,
    warmup: int = 2,
    rounds: int = 7,
) -> list[float]:
    """Images/s of each model (eval mode) on ``batch``: interleaved rounds (A B A B ...) after warm-up, median.

    Interleaving makes the comparison fair on a noisy machine: background load hits every model
    alike. CUDA work is timed with CUDA events (:mod:`repvgg.perf.timing`).
    """
    from repvgg.perf.timing import make_timer, time_interleaved

    for model in models:
        model.eval()
    calls = {str(i): (lambda m=model: m(batch)) for i, model in enumerate(models)}
    results = time_interleaved(calls, warmup=warmup, rounds=rounds, timer=make_timer(batch.device))
    return [results[str(i)].throughput(batch.shape[0]) for i in range(len(models))]


def evaluate_checkpoint(
    weights: str,
    *,
    data: str | None = None,
    arch: str | None = None,
    img_size: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
) -> dict:
    """Evaluate a saved model on the validation split of ``data`` (default: the digits data).

    A training-time checkpoint is also converted and both forms are reported, with their largest
    logit difference; a deploy checkpoint is evaluated as it is.
    """
    from repvgg.nn.convert import reparameterize_model
    from repvgg.training.data import build_datasets
    from repvgg.training.distributed import resolve_device
    from repvgg.io.loading import load_model

    check_int(batch_size, "batch_size", low=1)
    check_int(workers, "workers", low=0)
    model = load_model(weights, arch=arch)
    bundle = build_datasets(data, img_size=img_size)
    if model.num_classes != bundle.num_classes:
        raise ValueError(
            f"{weights} has {model.num_classes} classes but the data has {bundle.num_classes}; "
            "evaluate it on the dataset it was trained for"
        )
    torch_device = resolve_device(device)
    model = model.to(torch_device).eval()
    models = [model] if model.deploy else [model, reparameterize_model(model)]
    loader = DataLoader(bundle.val, batch_size=batch_size, num_workers=workers)
    report = evaluate_models(models, loader, torch_device)
    check_outputs(report.finite, report.relative_error, str(weights))
    result = {
        "weights": str(weights),
        "model": model.name,
        "form": "deploy" if model.deploy else "training-time",
        "dataset": bundle.name,
        "val_images": report.images,
        "val_top1": report.top1[0],
        "val_top5": report.top5[0],
    }
    if len(models) == 2:
        result.update(val_top1_deploy=report.top1[1], val_top5_deploy=report.top5[1],
                      max_abs_diff=report.max_abs_diff[0], prediction_agreement=report.agreement[0])
    return result

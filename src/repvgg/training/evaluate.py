"""Evaluation: top-1/top-5 of one or more models on the same batches, logit agreement, throughput."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from repvgg.limits import check_batch_memory, check_float, check_int, check_workers
from repvgg.nn.convert import OutputDeviation, check_outputs
from repvgg.training.distributed import all_reduce

log = logging.getLogger(__name__)

__all__ = ["Comparison", "EvalReport", "compare_models", "digits_val_fraction", "evaluate_models", "measure_throughput",
           "topk_correct"]


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


@dataclass
class Comparison:
    """Several models run on the same batches ([`compare_models`][repvgg.training.evaluate.compare_models]).

    ``finite[i]`` is False when model ``i`` gave a NaN or infinite output on some batch; for every model
    after the first, ``max_abs_diff`` and ``relative_error`` ([`OutputDeviation`][repvgg.nn.convert.OutputDeviation],
    NaN once an output was not finite: never "identical") measure its outputs against the first model's, and
    ``agreement`` is the fraction of ``predictions`` (argmax over dim 1: a class per image, or per pixel) that
    equal the first model's.
    """

    images: int
    predictions: int
    finite: list[bool]
    max_abs_diff: list[float]
    relative_error: list[float]
    agreement: list[float]


#: ``score(model index, float logits, labels)``: the caller's own metrics, accumulated batch by batch.
Scorer = Callable[[int, Tensor, Tensor], None]


@torch.no_grad()
def compare_models(
    models: Sequence[Callable[[Tensor], Any]],
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device | str | None = None,
    score: Scorer | None = None,
    output: Callable[[Any], Tensor] | None = None,
    channels_last: bool = False,
) -> Comparison:
    """The one loop that runs several models on the same batches and compares them with the first.

    ``models`` are modules (run in eval mode; each gets its previous mode back on every way out) or any
    callables (an ONNX Runtime session). ``output`` picks the logits out of a model's output (e.g. a
    segmenter's main head); ``score`` accumulates the caller's metrics. Counts and deviations are summed
    over processes in a distributed run; what ``score`` collects, the caller sums.
    """
    modes = [m.training if isinstance(m, nn.Module) else None for m in models]
    for model in models:
        if isinstance(model, nn.Module):
            model.eval()
    n = len(models)
    counts = torch.zeros(2 * n + 1, dtype=torch.float64)  # non-finite per model, agreement per other, images, preds
    deviations = [OutputDeviation() for _ in range(n - 1)]
    try:
        for images, labels in batches:
            if device is not None:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            outputs = [(output(m(images)) if output else m(images)).float() for m in models]
            for i, logits in enumerate(outputs):
                counts[i] += float(not torch.isfinite(logits).all())
                if score is not None:
                    score(i, logits, labels)
            predictions = [logits.argmax(1) for logits in outputs]
            for j in range(1, n):
                deviations[j - 1].update(outputs[0], outputs[j])
                counts[n + j - 1] += float((predictions[j] == predictions[0]).sum())
            counts[-2] += labels.shape[0]
            counts[-1] += predictions[0].numel()
    finally:
        for model, mode in zip(models, modes):
            if isinstance(model, nn.Module) and mode is not None:
                model.train(mode)
    all_reduce(counts, "sum")
    for deviation in deviations:
        all_reduce(deviation.sums, "sum")
        all_reduce(deviation.max_abs, "max")
    return Comparison(
        images=int(counts[-2]), predictions=int(counts[-1]), finite=[float(counts[i]) == 0 for i in range(n)],
        max_abs_diff=[d.max_abs_diff for d in deviations], relative_error=[d.relative for d in deviations],
        agreement=[float(counts[n + j]) / max(1.0, float(counts[-1])) for j in range(n - 1)],
    )


def evaluate_models(
    models: Sequence[nn.Module],
    loader: DataLoader,
    device: torch.device,
    *,
    channels_last: bool = False,
) -> EvalReport:
    """Top-1, top-5 and loss of every model on every batch of ``loader``
    ([`compare_models`][repvgg.training.evaluate.compare_models]: the others compared with the first), summed over
    processes if distributed.

    Comparing a training-time model with its converted copy on identical inputs gives the largest
    absolute and the relative logit difference and the fraction of predictions that agree.
    """
    sums = torch.zeros(len(models), 3, dtype=torch.float64)  # top-1, top-5, summed loss
    criterion = nn.CrossEntropyLoss(reduction="sum")

    def score(i: int, logits: Tensor, labels: Tensor) -> None:
        sums[i] += torch.tensor([*topk_correct(logits, labels), float(criterion(logits, labels))],
                                dtype=torch.float64)

    comparison = compare_models(models, loader, device=device, score=score, channels_last=channels_last)
    all_reduce(sums, "sum")
    total = max(1.0, float(comparison.images))
    return EvalReport(
        images=comparison.images,
        top1=[100.0 * float(s[0]) / total for s in sums],
        top5=[100.0 * float(s[1]) / total for s in sums],
        loss=[float(s[2]) / total for s in sums],
        finite=comparison.finite,
        max_abs_diff=comparison.max_abs_diff,
        relative_error=comparison.relative_error,
        agreement=comparison.agreement,
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
    alike. CUDA work is timed with CUDA events (`repvgg.measure.timing`).
    """
    from repvgg.measure.timing import make_timer, time_interleaved

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
    val_fraction: float | None = None,
) -> dict:
    """Evaluate a saved model on the validation split of ``data`` (default: the digits data).

    The images are prepared as the file records (its image size, resize and crop, mean and std), else at the
    data's default size. A training-time checkpoint is also converted and both forms are reported, with their largest
    logit difference; a deploy checkpoint is evaluated as it is. The digits are split as ``val_fraction`` says, else
    as the run beside ``weights`` split them ([`digits_val_fraction`][repvgg.training.evaluate.digits_val_fraction]).
    """
    from repvgg.nn.convert import reparameterize_model
    from repvgg.training.data import Relabelled, build_datasets, collate_readable
    from repvgg.training.distributed import dataset_size, resolve_device
    from repvgg.io.loading import load_model, model_card
    from repvgg.training.config import TrainConfig

    check_int(batch_size, "batch_size", low=1)
    check_workers(workers)
    if data is not None and val_fraction is not None:
        raise ValueError("--val-fraction splits the embedded digits; a folder's val/ images are its split")
    fraction = digits_val_fraction(weights, val_fraction) if data is None else TrainConfig.val_fraction
    model = load_model(weights, arch=arch)
    card = model_card(model)
    bundle = build_datasets(data, img_size=img_size, preprocessing=card.recorded_preprocessing,
                            val_fraction=fraction)
    label_map = card.label_map(bundle.classes, bundle.name)  # matched by name; a mismatch is refused
    size = bundle.preprocessing.img_size
    val = bundle.val if label_map is None else Relabelled(bundle.val, label_map)
    batch_size = max(1, min(batch_size, dataset_size(val)))  # no batch holds more images than there are
    check_batch_memory(batch_size, (model.in_chans, size, size), "--batch-size")
    torch_device = resolve_device(device)
    model = model.to(torch_device).eval()
    models = [model] if model.deploy else [model, reparameterize_model(model)]
    workers = check_workers(workers, batches=-(-dataset_size(val) // batch_size))  # none without a batch to load
    loader = DataLoader(val, batch_size=batch_size, num_workers=workers, collate_fn=collate_readable)
    report = evaluate_models(models, loader, torch_device)
    check_outputs(report.finite, report.relative_error, str(weights))
    result = {
        "weights": str(weights),
        "model": model.name,
        "form": "deploy" if model.deploy else "training-time",
        "dataset": bundle.name,
        **({"val_fraction": fraction} if data is None else {}),
        "val_images": report.images,
        "val_top1": report.top1[0],
        "val_top5": report.top5[0],
    }
    if len(models) == 2:
        result.update(val_top1_deploy=report.top1[1], val_top5_deploy=report.top5[1],
                      max_abs_diff=report.max_abs_diff[0], prediction_agreement=report.agreement[0])
    return result


def digits_val_fraction(weights: str, given: float | None = None) -> float:
    """The digits split a saved model is evaluated on: ``given``, else the ``val_fraction`` of the run whose folder
    holds ``weights`` (its ``config.yaml``, when it trained on the digits), else the default 0.2. Another split than
    the run's would score images it trained on."""
    from pathlib import Path

    from repvgg.options import load_config_file
    from repvgg.training.config import TrainConfig

    if given is not None:
        check_float(given, "val_fraction", low=0, high=1)
        return given
    config = Path(weights).resolve().parent / "config.yaml"  # a link to a run's file: the run's folder
    if not str(weights).startswith("hf-hub:") and config.is_file():
        try:
            recorded = load_config_file(config)
        except (OSError, ValueError) as err:  # not a run's config: another file of that name
            log.info("%s is not read for the digits split (%s)", config, err)
            return TrainConfig.val_fraction
        fraction = recorded.get("val_fraction")
        if {"model", "epochs", "seed"} <= set(recorded) and recorded.get("data") is None \
                and isinstance(fraction, float) and 0 < fraction < 1:
            return fraction
    return TrainConfig.val_fraction

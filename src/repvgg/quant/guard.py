"""The accuracy guard: the one rule every reduced precision passes before it is used or written.

A float32 candidate must reproduce the eager model on the example input (relative L2 deviation at most
``rtol``, 1e-4 by default). A reduced-precision candidate (bfloat16, float16, INT8) changes the numbers on
purpose, so it is judged where it matters, on labelled validation images: its top-1 prediction must agree with
the float32 model's on at least ``min_agreement`` of them (99.5% by default) and its top-1 accuracy may be at
most ``max_top1_drop`` points below float32's (0.5 by default). Without validation images a reduced precision
is never chosen automatically.

The same rule guards ``optimize_for_inference`` (a candidate below it is not chosen), ``repvgg quantize`` (an INT8
file below it is not written: exit 1) and ``repvgg predict --dtype int8`` (judged against the float32 model's own
predictions on the inputs): [`validation_guard`][repvgg.quant.guard.validation_guard] measures,
[`require_passing`][repvgg.quant.guard.require_passing] refuses with the remedies. A detector is judged by the COCO AP
it keeps on its validation images ([`require_ap`][repvgg.quant.guard.require_ap]: at most
`DEFAULT_MAX_AP_DROP` points lost), a segmenter by its mean IoU ([`require_miou`][repvgg.quant.guard.require_miou]:
at most `DEFAULT_MAX_MIOU_DROP` points), with the same remedies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from repvgg.errors import RunFailed
from repvgg.training.evaluate import compare_models

__all__ = ["DEFAULT_MAX_AP_DROP", "DEFAULT_MAX_MIOU_DROP", "DEFAULT_RTOL", "DETECTOR_REMEDIES", "Guard", "GuardResult",
           "PrecisionRejected", "REMEDIES", "SEGMENTER_REMEDIES", "output_deviation", "require_ap", "require_miou",
           "require_passing", "validation_guard"]

#: Most COCO AP points (of 100) an INT8 detector may lose against float32.
DEFAULT_MAX_AP_DROP = 1.0
#: Most mean-IoU points (of 100) an INT8 segmenter may lose against float32.
DEFAULT_MAX_MIOU_DROP = 1.0

#: Largest relative L2 deviation from the eager float32 output on the example, per precision (``None``: INT8
#: is judged on validation images only).
DEFAULT_RTOL: dict[str, float | None] = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2, "int8": None}

#: What to do when INT8 loses too much accuracy (said in every refusal).
REMEDIES = ("train a quantization-friendly model (qarepvgg_*, whose blocks keep INT8 ranges narrow), fine-tune with "
            "quantization-aware training (repvgg quantize --qat-epochs N), calibrate differently (--calibration "
            "entropy or percentile), or accept a larger loss (--min-agreement, --max-top1-drop)")
#: The same for a detector, which is quantized by calibration only (no quantization-aware training).
DETECTOR_REMEDIES = ("train it on a quantization-friendly backbone (repvgg det-train --backbone qarepvgg_*), calibrate "
                     "differently (--calibration entropy or percentile, or other --calib-images), or accept a larger "
                     "loss (--max-ap-drop)")
#: The same for a segmenter.
SEGMENTER_REMEDIES = ("train it on a quantization-friendly backbone (repvgg seg-train --backbone qarepvgg_*), "
                      "calibrate differently (--calibration entropy or percentile, or other --calib-images), or accept "
                      "a larger loss (--max-miou-drop)")


class PrecisionRejected(RunFailed):
    """A reduced precision lost more accuracy than the guard allows; nothing was written or chosen."""


def output_deviation(actual: Any, expected: Any) -> float:
    """Largest relative L2 deviation ``|a - e| / |e|`` over the tensors of two (nested) outputs (NaN if any
    value is not finite)."""
    got, _ = tree_flatten(actual)
    want, _ = tree_flatten(expected)
    if len(got) != len(want):
        raise ValueError(f"outputs differ in structure: {len(got)} vs {len(want)} tensors")
    worst = 0.0
    for a, e in zip(got, want):
        if tuple(a.shape) != tuple(e.shape):
            raise ValueError(f"output shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
        a64, e64 = a.detach().to("cpu", torch.float64), e.detach().to("cpu", torch.float64)
        if not (torch.isfinite(a64).all() and torch.isfinite(e64).all()):
            return float("nan")
        worst = max(worst, float((a64 - e64).norm() / e64.norm().clamp_min(1e-30)))
    return worst


@dataclass(frozen=True)
class Guard:
    """The thresholds a reduced-precision candidate must meet on the validation images."""

    min_agreement: float = 0.995
    max_top1_drop: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.min_agreement <= 1 or not 0 <= self.max_top1_drop <= 100:
            raise ValueError(f"min_agreement must be in [0, 1] and max_top1_drop in [0, 100], got "
                             f"{self.min_agreement}, {self.max_top1_drop}")

    def describe(self) -> str:
        return f"top-1 agreement with float32 >= {100 * self.min_agreement:g}%, top-1 drop <= {self.max_top1_drop:g}"


@dataclass(frozen=True)
class GuardResult:
    """One candidate on the validation images, next to the float32 reference."""

    passed: bool
    agreement: float
    top1: float
    top1_reference: float
    images: int

    def describe(self) -> str:
        return (f"top-1 {self.top1:.2f}% vs {self.top1_reference:.2f}% in float32, agreeing on "
                f"{100 * self.agreement:.2f}% of {self.images} validation images")


def _labelled(validation: Iterable[Any]) -> Iterable[tuple[Tensor, Tensor]]:
    """The ``(images, labels)`` batches of ``validation``, each checked: labels are integer class indices within
    the model's outputs."""
    for batch in validation:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(isinstance(t, Tensor) for t in batch):
            raise ValueError("validation must yield (images, labels) batches of tensors, got a "
                             f"{type(batch).__name__}; pair the images with their class indices")
        images, labels = batch
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.dim() != 1:
            raise ValueError(f"validation labels must be a 1-d tensor of integer class indices, got {labels.dtype} "
                             f"of shape {tuple(labels.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"a validation batch holds {len(images)} images but {len(labels)} labels")
        if len(labels) and int(labels.min()) < 0:
            raise ValueError(f"validation labels must be class indices (0 or more), got {int(labels.min())}")
        yield images, labels


def validation_guard(reference: nn.Module, runners: Mapping[str, Any], validation: Iterable[Any],
                     guard: Guard, *, device: torch.device) -> dict[str, GuardResult]:
    """Judge each of ``runners`` against the float32 ``reference`` on the ``(images, labels)`` batches of
    ``validation``, in one pass ([`compare_models`][repvgg.training.evaluate.compare_models]).

    Raises:
        ValueError: a batch without labels, labels that are not class indices of the model, or no images.
    """
    names = list(runners)
    correct = torch.zeros(len(names) + 1, dtype=torch.float64)

    def score(i: int, logits: Tensor, labels: Tensor) -> None:
        if i == 0 and labels.numel() and int(labels.max()) >= logits.shape[1]:
            raise ValueError(f"validation labels must be class indices from 0 to {logits.shape[1] - 1} (the model "
                             f"has {logits.shape[1]} outputs), got {int(labels.max())}")
        correct[i] += float((logits.argmax(1) == labels.to(logits.device)).sum())

    comparison = compare_models([reference, *runners.values()], _labelled(validation), device=device, score=score)
    if comparison.images == 0:
        raise ValueError("the validation data holds no images")
    top1 = [100.0 * float(c) / comparison.images for c in correct]
    results = {}
    for j, name in enumerate(names):
        agreement = comparison.agreement[j]
        passed = (comparison.finite[j + 1] and agreement >= guard.min_agreement
                  and top1[0] - top1[j + 1] <= guard.max_top1_drop)
        results[name] = GuardResult(passed, agreement, top1[j + 1], top1[0], comparison.images)
    return results


def require_passing(results: Mapping[str, GuardResult], guard: Guard, what: str,
                    consequence: str = "Nothing was written.") -> None:
    """Refuse when no result passed the guard: a [`PrecisionRejected`][repvgg.quant.guard.PrecisionRejected] naming each
    result and the remedies.

    Raises:
        PrecisionRejected: none of ``results`` passed (``what`` says what was judged, e.g. "the INT8 file").
    """
    if any(result.passed for result in results.values()):
        return
    measured = "; ".join(f"{name}: {result.describe()}" for name, result in results.items())
    raise PrecisionRejected(f"{what} fails the accuracy guard ({guard.describe()} points): {measured}. "
                            f"{consequence} To get an accurate INT8 model, {REMEDIES}")


def require_ap(fp32_ap: float, reduced_ap: float, max_drop: float, what: str,
               consequence: str = "Nothing was written.") -> None:
    """Refuse a reduced-precision detector whose COCO AP (in [0, 1]) is more than ``max_drop`` points (of 100) below
    float32's, or not a number.

    Raises:
        PrecisionRejected: naming ``what``, both APs and the remedies.
    """
    _require_score("COCO AP", 100 * fp32_ap, 100 * reduced_ap, max_drop, what, consequence, "detector",
                   DETECTOR_REMEDIES)


def require_miou(fp32_miou: float, reduced_miou: float, max_drop: float, what: str,
                 consequence: str = "Nothing was written.") -> None:
    """Refuse a reduced-precision segmenter whose mean IoU (in percent) is more than ``max_drop`` points below
    float32's, or not a number.

    Raises:
        PrecisionRejected: naming ``what``, both mIoUs and the remedies.
    """
    _require_score("mean IoU", fp32_miou, reduced_miou, max_drop, what, consequence, "segmenter", SEGMENTER_REMEDIES)


def _require_score(metric: str, fp32: float, reduced: float, max_drop: float, what: str, consequence: str,
                   model: str, remedies: str) -> None:
    drop = fp32 - reduced
    if drop <= max_drop:  # NaN fails too
        return
    raise PrecisionRejected(f"{what} fails the accuracy guard: {metric} {reduced:.2f} against float32's {fp32:.2f}, "
                            f"{drop:.2f} points lost (at most {max_drop:g} allowed). {consequence} To get an accurate "
                            f"INT8 {model}, {remedies}")

"""The accuracy guard of the fast path: what a candidate must compute to be chosen.

A float32 candidate must reproduce the eager model on the example input (relative L2 deviation at most
``rtol``, 1e-4 by default). A reduced-precision candidate (bfloat16, float16, INT8) changes the numbers on
purpose, so it is judged where it matters, on labelled validation images: its top-1 prediction must agree with
the float32 model's on at least ``min_agreement`` of them (99.5% by default) and its top-1 accuracy may be at
most ``max_top1_drop`` points below float32's (0.5 by default). Without validation images a reduced precision
is never chosen automatically.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from repvgg.training.evaluate import compare_models

__all__ = ["DEFAULT_RTOL", "Guard", "GuardResult", "output_deviation", "validation_guard"]

#: Largest relative L2 deviation from the eager float32 output on the example, per precision (``None``: INT8
#: is judged on validation images only).
DEFAULT_RTOL: dict[str, float | None] = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2, "int8": None}


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
        if not 0 <= self.min_agreement <= 1 or self.max_top1_drop < 0:
            raise ValueError(f"min_agreement must be in [0, 1] and max_top1_drop >= 0, got {self.min_agreement}, "
                             f"{self.max_top1_drop}")


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


def validation_guard(reference: nn.Module, runners: Mapping[str, Any], validation: Iterable[tuple[Tensor, Tensor]],
                     guard: Guard, *, device: torch.device) -> dict[str, GuardResult]:
    """Judge each of ``runners`` against the float32 ``reference`` on the ``(images, labels)`` batches of
    ``validation``, in one pass (:func:`~repvgg.training.evaluate.compare_models`)."""
    names = list(runners)
    correct = torch.zeros(len(names) + 1, dtype=torch.float64)

    def score(i: int, logits: Tensor, labels: Tensor) -> None:
        correct[i] += float((logits.argmax(1) == labels.to(logits.device)).sum())

    comparison = compare_models([reference, *runners.values()], validation, device=device, score=score)
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

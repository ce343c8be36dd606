"""Model-level conversion: fuse every RepVGG block of any ``nn.Module`` into plain 3x3 convs."""

from __future__ import annotations

import copy
import math
from typing import Protocol, Sequence, TypeGuard, TypeVar

import torch
from torch import Tensor, nn

from repvgg.errors import ConversionMismatch, RunFailed

__all__ = ["CONVERSION_TOLERANCE", "OutputDeviation", "check_conversion", "check_outputs", "reparameterize_model",
           "is_reparameterizable"]

#: Largest relative deviation ||converted - source|| / ||source|| accepted for a converted, exported or
#: quantized float model; above it nothing is written.
CONVERSION_TOLERANCE = 1e-4

M = TypeVar("M", bound=nn.Module)


class Reparameterizable(Protocol):
    """A module that fuses itself in place."""

    def reparameterize(self) -> None: ...


def is_reparameterizable(module: nn.Module) -> TypeGuard[Reparameterizable]:
    """True for modules that know how to fuse themselves (they define ``reparameterize()``)."""
    return callable(getattr(module, "reparameterize", None))


def is_converted(model: nn.Module) -> bool:
    """True when no module of ``model`` is left to fuse (every one with ``reparameterize()`` is in its deploy form)."""
    return not any(is_reparameterizable(m) and not getattr(m, "deploy", False) for m in model.modules())


@torch.no_grad()
def reparameterize_model(model: M, inplace: bool = False) -> M:
    """Fuse every block of ``model`` that has a ``reparameterize()`` method and return the model in eval mode.

    Works for a RepVGG and for any network that uses RepVGG blocks as parts (a backbone inside a
    segmenter, say): every submodule with ``reparameterize()`` is fused (e.g. all
    [`RepVGGBlock`][repvgg.nn.block.RepVGGBlock]), the rest is left alone. Conversion always uses the BN running
    statistics, so the result is the same whether or not the caller called ``.eval()`` first.

    Args:
        model: the training-time model.
        inplace: modify ``model`` itself instead of a deep copy (saves memory for big models).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparameterize_model expects an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    for name, module in list(target.named_modules()):
        if is_reparameterizable(module):
            try:
                module.reparameterize()
            except ValueError as err:
                raise ValueError(f"cannot convert {name or type(module).__name__}: {err}") from err
    return target.eval()


class OutputDeviation:
    """How far a model's outputs are from a reference model's, accumulated over batches.

    `sums` holds the squared difference, the squared reference and the number of batches with a
    NaN or infinite output of either model; `max_abs` the largest absolute difference. Both are
    plain tensors, so a distributed caller can sum and max them over processes before reading
    [`relative`][repvgg.nn.convert.OutputDeviation.relative], which is NaN once any output was not finite: NaN never
    passes as "identical".
    """

    def __init__(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64)
        self.max_abs = torch.zeros(1, dtype=torch.float64)

    @torch.no_grad()
    def update(self, reference: Tensor, actual: Tensor) -> None:
        reference, actual = reference.detach().double(), actual.detach().double()
        if reference.shape != actual.shape:
            raise ValueError(f"outputs differ in shape: {tuple(actual.shape)} vs {tuple(reference.shape)}")
        if not (torch.isfinite(reference).all() and torch.isfinite(actual).all()):
            self.sums[2] += 1
            return
        diff = actual - reference
        self.sums[0] += float(diff.square().sum())
        self.sums[1] += float(reference.square().sum())
        if diff.numel():
            self.max_abs[0] = max(float(self.max_abs[0]), float(diff.abs().max()))

    @property
    def finite(self) -> bool:
        return float(self.sums[2]) == 0

    @property
    def relative(self) -> float:
        """``||actual - reference|| / ||reference||`` over every value seen (NaN if any was not finite)."""
        if not self.finite:
            return math.nan
        return math.sqrt(float(self.sums[0]) / max(float(self.sums[1]), 1e-300))

    @property
    def max_abs_diff(self) -> float:
        return float(self.max_abs[0]) if self.finite else math.nan


def check_outputs(finite: Sequence[bool], relative_errors: Sequence[float], what: str) -> None:
    """Fail an evaluation whose models produced NaN or infinite outputs, or whose converted copies do not
    compute what the first model does ([`check_conversion`][repvgg.nn.convert.check_conversion]): a broken model never
    gets a score.

    Raises:
        RunFailed: non-finite outputs (broken weights, e.g. from a diverged run).
        ConversionMismatch: a converted copy deviates.
    """
    if not all(finite):
        raise RunFailed(f"{what}: the model's outputs contain NaN or infinite values, so its weights are broken "
                        "(a diverged run?); no score is reported")
    for relative in relative_errors:
        check_conversion(relative, f"the converted form of {what}")


def check_conversion(relative: float, what: str, *, tolerance: float = CONVERSION_TOLERANCE) -> None:
    """Refuse a converted model whose relative deviation from its source is above ``tolerance`` or not finite.

    Raises:
        ConversionMismatch: naming ``what`` and the deviation; the caller then writes nothing.
    """
    if not relative <= tolerance:  # NaN fails too
        detail = "outputs are NaN or infinite" if math.isnan(relative) else f"relative deviation {relative:.3g}"
        raise ConversionMismatch(f"{what} does not compute what its source does ({detail}, tolerance "
                                 f"{tolerance:g}); nothing was written")

"""The fastest way this package knows to run a model on a device, chosen by measuring and guarded by accuracy.

[`optimize_for_inference`][repvgg.perf.fast.optimize_for_inference] prepares the model (RepVGG blocks fused into 3x3
convs, conv-BN pairs folded, eval mode), builds every candidate runtime that is available in every precision it weighs,
checks what each computes ([`repvgg.quant.guard`][repvgg.quant.guard]), times the accepted ones in interleaved rounds
and returns the fastest as a plain callable (float32 tensor in, float32 tensor out).

The candidates are the runtimes of `repvgg.perf.runtimes` (the `CANDIDATES` table, one module per
runtime). By default the CPU tries eager, channels_last, torchscript, onnxruntime and openvino (compilation
takes tens of seconds on a small CPU, so ``compile`` is tried only when asked for); CUDA tries eager,
channels_last, cuda_graph and the two compiled forms.

Precision is a choice too. ``dtype="auto"`` weighs float32; bfloat16 where the device computes it natively
(a CPU with AVX512-BF16 or AMX, detected, never guessed; a GPU that supports it); float16 on CUDA; and INT8
(QDQ through ONNX Runtime and OpenVINO, calibrated on ``calibration``) on the CPU. A reduced precision is
chosen only if it passes the accuracy guard on ``validation`` images, never without them. An explicit reduced
``dtype`` is held to the same guard: it needs ``validation`` images, or ``check_accuracy=False`` to take it
unchecked.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repvgg.nn.convert import is_reparameterizable, reparameterize_model
from repvgg.nn.fusion import fuse_conv_bn, is_batchnorm
from repvgg.measure.environment import device_supports_dtype, native_bf16
from repvgg.quant.guard import DEFAULT_RTOL, Guard, output_deviation, require_passing, validation_guard
from repvgg.perf.runtimes import (CANDIDATES, TORCH_DTYPES, BuildContext, Candidate, Runner, Unsupported,
                                  default_candidates)
from repvgg.perf.choosing import FastestSoFar, choose, effort

__all__ = ["CANDIDATES", "Candidate", "CandidateReport", "InferenceRunner", "default_candidates", "default_rtol",
           "optimize_for_inference", "output_deviation", "precisions_to_weigh", "prepare_for_inference"]

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int8: "int8"}
_PRECISION_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def default_rtol(dtype: torch.dtype | str) -> float | None:
    """The accepted relative deviation on the example for a precision (1e-4 for float32; ``None`` for INT8)."""
    name = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if name not in DEFAULT_RTOL:
        raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DEFAULT_RTOL)}")
    return DEFAULT_RTOL[name]


@dataclass
class CandidateReport:
    """What happened to one candidate in one precision: built or not, how accurate, how fast, and why."""

    name: str
    status: str  # "ok", "unavailable", "failed", "inaccurate", "unchecked"
    detail: str = ""
    deviation: float | None = None
    median_s: float | None = None
    precision: str = "float32"
    agreement: float | None = None  # with float32 on the validation images
    top1: float | None = None
    top1_reference: float | None = None


class InferenceRunner:
    """A callable ``runner(x) -> output`` wrapping the chosen candidate.

    Inputs are moved to the runner's device as float32; outputs come back as float32 (CPU runtimes return
    CPU tensors), whatever precision the runner computes in. Gradients are never recorded.

    Attributes:
        backend: name of the chosen candidate (a runtime of `CANDIDATES`).
        device: where it computes.
        dtype: in which precision it computes (``torch.int8`` for the QDQ INT8 graph).
        reports: one `CandidateReport` per candidate and precision considered.
        reason: one sentence on why this candidate was chosen.
        alternatives: the other accepted candidates, by ``(backend, precision)``, each taking and returning
            float32 tensors on the device (a benchmark times them side by side).
    """

    def __init__(self, fn: Runner, *, backend: str, device: torch.device, dtype: torch.dtype,
                 reports: list[CandidateReport], reason: str,
                 alternatives: dict[tuple[str, str], Runner] | None = None) -> None:
        self._fn = fn
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.reports = reports
        self.reason = reason
        self.alternatives = alternatives or {}

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Any:
        return self._fn(x.to(device=self.device, dtype=torch.float32))

    def __repr__(self) -> str:
        return f"InferenceRunner(backend={self.backend!r}, device={self.device}, dtype={self.dtype})"


def precisions_to_weigh(dtype: str | torch.dtype | None, example: Tensor, *, calibration: Any) -> list[str]:
    """The precisions ``optimize_for_inference`` weighs for ``dtype`` on ``example``'s device."""
    device = example.device
    if dtype is None:
        dtype = example.dtype if example.is_floating_point() else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}; use 'auto', {', '.join(map(repr, DEFAULT_RTOL))}")
        dtype = _DTYPE_NAMES[dtype]
    if dtype == "auto":
        weighed = ["float32"]
        weighed += ["float16"] if device.type == "cuda" else []
        weighed += ["bfloat16"] if native_bf16(device) else []
        weighed += ["int8"] if device.type == "cpu" and calibration is not None else []
        return weighed
    if dtype not in DEFAULT_RTOL:
        raise ValueError(f"unsupported dtype {dtype!r}; use 'auto', {', '.join(map(repr, DEFAULT_RTOL))}")
    if dtype == "int8" and device.type != "cpu":
        raise ValueError("INT8 runs through ONNX Runtime or OpenVINO on the CPU; use a CPU example input")
    if dtype == "int8" and calibration is None:
        raise ValueError("dtype='int8' needs calibration images (calibration=[batches] or a DataLoader)")
    if dtype in ("float16", "bfloat16") and not device_supports_dtype(device, TORCH_DTYPES[dtype]):
        raise ValueError(f"{dtype} convolutions are not supported on this {device.type}")
    if dtype == "bfloat16" and not native_bf16(device):
        log.warning("this %s computes bfloat16 without native units (AVX512-BF16 or AMX): expect it to be slower "
                    "than float32", device.type)
    return [dtype]


def prepare_for_inference(model: nn.Module, device: torch.device, fuse: bool = True) -> nn.Module:
    """A fused eval-mode float32 copy of ``model`` on ``device``, which every candidate is built from (the caller's
    model is never modified)."""
    prepared = copy.deepcopy(model).eval()
    if fuse:
        if any(is_reparameterizable(m) for m in prepared.modules()):
            prepared = reparameterize_model(prepared, inplace=True)
        if any(is_batchnorm(m) for m in prepared.modules()):
            prepared = fuse_conv_bn(prepared)
    for p in prepared.parameters():
        p.requires_grad_(False)
    return prepared.to(device=device, dtype=torch.float32).eval()


@torch.no_grad()
def _reference_output(model: nn.Module, example: Tensor) -> Any:
    """The caller's eager model on ``example``, on its own device and dtype (its mode is restored)."""
    param = next(model.parameters(), None)
    x = example if param is None else example.to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def _build_one(name: str, ctx: BuildContext, reference: Any, rtol: float | None) -> tuple[Runner | None,
                                                                                        CandidateReport]:
    """Build one candidate in ``ctx.precision`` and check it on the example: the runner (or ``None``) and its report."""
    precision = ctx.precision
    if ctx.example.device.type not in CANDIDATES[name].devices or precision not in CANDIDATES[name].precisions:
        candidate = CANDIDATES[name]
        return None, CandidateReport(name, "unavailable", f"{name} runs in {', '.join(candidate.precisions)} on "
                                     f"{', '.join(candidate.devices)}, not in {precision} on {ctx.example.device.type}",
                                     precision=precision)
    try:
        runner = CANDIDATES[name].build(ctx)
        with torch.no_grad():
            deviation = output_deviation(runner(ctx.example), reference)
    except Unsupported as err:
        log.debug("candidate %s (%s) skipped: %s", name, precision, err)
        return None, CandidateReport(name, "unavailable", str(err), precision=precision)
    except ImportError as err:
        log.info("candidate %s skipped: not installed (%s)", name, err.name or err)
        return None, CandidateReport(name, "unavailable", f"not installed ({err.name or err})", precision=precision)
    except Exception as err:  # noqa: BLE001 - any failure of an optional runtime just rules it out
        log.info("candidate %s (%s) failed to build or run: %s: %s", name, precision, type(err).__name__, err)
        return None, CandidateReport(name, "failed", f"{type(err).__name__}: {err}", precision=precision)
    limit = float("inf") if rtol is None else rtol
    if not deviation <= limit:  # NaN fails too
        log.info("candidate %s (%s) rejected: relative deviation %.2e exceeds %s", name, precision, deviation, rtol)
        return None, CandidateReport(name, "inaccurate", f"deviation {deviation:.2e} > {limit:.0e}", deviation,
                                     precision=precision)
    return runner, CandidateReport(name, "ok", "", deviation, precision=precision)


def _build_candidates(names: Sequence[str], precisions: Sequence[str], prepared: nn.Module, example: Tensor,
                      reference: Any, rtol: float | None, *, calibration: Any, first_only: bool,
                      graph: Path | None = None,
                      on_built: Callable[[dict[tuple[str, str], Runner], list[CandidateReport], tuple[str, str]],
                                         None] | None = None
                      ) -> tuple[dict[tuple[str, str], Runner], list[CandidateReport]]:
    """Build and check each candidate in each precision, in preference order; the working ones and a report on all.
    ``on_built`` sees each working candidate as soon as it is built (and may drop it from ``working``)."""
    reports: list[CandidateReport] = []
    working: dict[tuple[str, str], Runner] = {}
    with tempfile.TemporaryDirectory(prefix="repvgg-fast-") as tmp:
        # The runtimes load what they need from the exported files before they are deleted.
        files: dict[str, Path] = {} if graph is None else {"onnx": graph}  # made once for every precision
        contexts = {p: BuildContext(prepared, example, Path(tmp), precision=p, calibration=calibration, files=files)
                    for p in precisions}
        for precision in precisions:
            for name in sorted(names, key=list(CANDIDATES).index):
                limit = rtol if precision == precisions[0] and rtol is not None else DEFAULT_RTOL[precision]
                runner, report = _build_one(name, contexts[precision], reference, limit)
                reports.append(report)
                if runner is not None:
                    working[(name, precision)] = runner
                    del runner
                    if first_only:
                        return working, reports
                    if on_built is not None:
                        on_built(working, reports, (name, precision))
    return working, reports


def _guard(working: dict[tuple[str, str], Runner], reports: list[CandidateReport], prepared: nn.Module,
           validation: Iterable[Any] | None, guard: Guard, *, automatic: bool, device: torch.device) -> None:
    """Keep only the reduced-precision candidates that pass the accuracy guard (in place, reports updated)."""
    reduced = {key: runner for key, runner in working.items() if key[1] != "float32"}
    if not reduced:
        return
    by_key = {(r.name, r.precision): r for r in reports}
    if validation is None:
        for key in reduced:
            if automatic:  # never chosen without evidence
                del working[key]
                by_key[key].status = "unchecked"
                by_key[key].detail = "no validation images: a reduced precision is never chosen unchecked"
            else:
                by_key[key].detail = "accuracy not checked (no validation images)"
        if not automatic:
            log.warning("%s was asked for without validation images: its accuracy is not checked",
                        ", ".join(sorted({p for _, p in reduced})))
        return
    results = validation_guard(prepared, {f"{n}/{p}": r for (n, p), r in reduced.items()}, validation, guard,
                               device=device)
    if not automatic:  # a precision asked for by name: refused, with the remedies, when none of its runtimes holds
        precision = ", ".join(sorted({p for _, p in reduced}))
        require_passing(results, guard, precision, f"No {precision} runner is returned.")
    for key in reduced:
        result, report = results[f"{key[0]}/{key[1]}"], by_key[key]
        report.agreement, report.top1, report.top1_reference = result.agreement, result.top1, result.top1_reference
        report.detail = result.describe()
        if not result.passed:
            report.status = "inaccurate"
            del working[key]
            log.info("candidate %s (%s) rejected by the accuracy guard: %s", key[0], key[1], report.detail)


def optimize_for_inference(
    model: nn.Module,
    example_input: Tensor,
    *,
    dtype: str | torch.dtype | None = None,
    calibration: Any = None,
    validation: Iterable[Any] | None = None,
    candidates: Sequence[str] | None = None,
    measure: bool = True,
    rtol: float | None = None,
    min_agreement: float = 0.995, max_top1_drop: float = 0.5,
    warmup: int | None = None, rounds: int | None = None, pause_s: float | None = None,
    fuse: bool = True,
    one_at_a_time: bool = False,
    check_accuracy: bool = True,
    graph: str | os.PathLike[str] | None = None,
) -> InferenceRunner:
    """Return the fastest verified way to run ``model`` on ``example_input``'s device.

    Works for any ``nn.Module`` taking one image tensor (RepVGG in either form, torchvision ResNets,
    timm models), so comparisons through it are fair. The caller's model is not modified.

    Args:
        model: the network (training-time RepVGG blocks are fused on a copy when ``fuse``).
        example_input: a representative batch on the target device; timing and the equivalence
            check use it, so give it the batch size you will run.
        dtype: ``"auto"`` (weigh every precision the device computes natively, see the module docstring),
            ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"int8"`` or the matching torch dtype; default: the
            input's float dtype.
        calibration: images that set INT8's activation ranges: a list or DataLoader of image batches, or of
            ``(images, labels)`` batches, at the example's height and width.
        validation: ``(images, labels)`` batches on which a reduced precision must keep its top-1 agreement
            with float32 at ``min_agreement`` and its top-1 accuracy within ``max_top1_drop`` points.
        candidates: names from `CANDIDATES` to consider (default `default_candidates`).
        measure: time the candidates and pick the fastest; ``False`` takes the first that works,
            in `CANDIDATES` order.
        rtol: accepted relative L2 deviation from the eager model on the example (default 1e-4 for float32).
        min_agreement: see ``validation``.
        max_top1_drop: see ``validation``.
        warmup: untimed calls per candidate (default 2 on the CPU, 10 on CUDA).
        rounds: timed rounds per candidate (default 5 on the CPU, 20 on CUDA).
        pause_s: idle time before each timed call (default 50 ms on the CPU, where runtimes with
            their own spinning thread pools would otherwise slow whichever candidate runs next).
        fuse: fuse RepVGG blocks and conv-BN pairs on the copy first (exact, and faster eagerly).
        check_accuracy: a reduced precision asked for by name (``dtype="int8"``, ``"bfloat16"``, ``"float16"``) is
            held to the accuracy guard on ``validation``, which it then needs; ``False`` takes it unchecked (the
            caller measures its accuracy elsewhere, as a benchmark does), and the log says so.
        one_at_a_time: build, check and time the candidates one after another, keeping only the fastest so far:
            one runtime's copy of the model is held at a time besides it (for large models; the timings are then
            not interleaved, and the runner has no ``alternatives``).
        graph: an ONNX file of the prepared ``model`` at the example's size (dynamic batch) made earlier, which the
            ONNX runtimes are built from (and checked as every candidate is) instead of exporting it again.

    Raises:
        ValueError: for an unknown candidate name or dtype, or if no candidate reproduces the eager output
            (and passes the accuracy guard).
    """
    names = _checked_arguments(model, example_input, candidates)
    device = example_input.device
    precisions = precisions_to_weigh(dtype, example_input, calibration=calibration)
    guard = Guard(min_agreement, max_top1_drop)
    automatic = dtype == "auto"
    if not automatic and precisions != ["float32"] and validation is None and check_accuracy:
        raise ValueError(f"dtype={precisions[0]!r} is a reduced precision, held to the accuracy guard on labelled "
                         "validation images: pass validation=[(images, labels), ...] (batches the model has not been "
                         "calibrated on), or check_accuracy=False to take it unchecked")
    if automatic and validation is None and len(precisions) > 1:
        log.info("dtype='auto' without validation images: only float32 is weighed (a reduced precision is chosen "
                 "only after it passes the accuracy guard)")
        precisions = precisions[:1]

    reference = _reference_output(model, example_input)
    prepared = prepare_for_inference(model, device, fuse)
    example = example_input.to(device=device, dtype=torch.float32)

    def check(candidates: dict[tuple[str, str], Runner], reports: list[CandidateReport]) -> None:
        _guard(candidates, reports, prepared, validation, guard, automatic=automatic, device=device)

    alone = FastestSoFar(check, example, *effort(device, warmup, rounds, pause_s)) if one_at_a_time and measure \
        else None
    working, reports = _build_candidates(names, precisions, prepared, example, reference, rtol,
                                         calibration=calibration, first_only=not measure and validation is None,
                                         on_built=alone, graph=None if graph is None else Path(graph))
    if alone is None:
        check(working, reports)
    elif not working and alone.rejected is not None:
        raise alone.rejected
    if not working:
        details = "; ".join(f"{r.name} ({r.precision}): {r.status} {r.detail}".strip() for r in reports)
        hint = (" On CUDA, TensorFloat-32 moves float32 results by ~1e-3: turn it off or pass a larger rtol."
                if device.type == "cuda" and "float32" in precisions else "")
        raise ValueError(f"no candidate reproduces the eager model within its accuracy guard ({details}).{hint}")
    chosen, reason = choose(working, reports, example, measure=measure, warmup=warmup, rounds=rounds,
                             pause_s=pause_s)
    reason = alone.reason() if alone is not None else reason
    log.info("optimize_for_inference(%s, %s): %s in %s (%s)", type(model).__name__, device, chosen[0], chosen[1],
             reason)
    return InferenceRunner(working[chosen], backend=chosen[0], device=device, dtype=_PRECISION_DTYPES[chosen[1]],
                           reports=reports, reason=reason,
                           alternatives={key: run for key, run in working.items() if key != chosen})


def _checked_arguments(model: Any, example_input: Any, candidates: Sequence[str] | None) -> list[str]:
    """The candidates to weigh, once the model, the example and the names are checked."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    if example_input.dim() < 1 or example_input.shape[0] == 0 or example_input.numel() == 0:
        raise ValueError(f"example_input holds no images (shape {tuple(example_input.shape)}); give a batch of at "
                         "least one image, as the model will see it: it is what every runtime is checked on")
    if example_input.device.type not in ("cpu", "cuda"):
        raise ValueError(f"optimize_for_inference supports 'cpu' and 'cuda' inputs, got {example_input.device.type!r}")
    names = list(candidates) if candidates is not None else default_candidates(example_input.device)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown candidate(s) {unknown}; choose from {', '.join(CANDIDATES)}")
    if not names:
        raise ValueError("candidates is empty")
    return names

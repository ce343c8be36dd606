"""The fastest way this package knows to run a model on a device, chosen by measuring.

:func:`optimize_for_inference` prepares the model (RepVGG blocks fused into 3x3 convs, conv-BN pairs
folded, eval mode), builds every candidate runtime that is available, checks that each computes the
same function as the eager model on the example input, times them in interleaved rounds and returns
the fastest as a plain callable (tensor in, tensor out).

The candidates are the runtimes of :mod:`repvgg.perf.runtimes` (the :data:`CANDIDATES` table, one
module per runtime). By default the CPU tries eager, channels_last, torchscript, onnxruntime and openvino (compilation
takes tens of seconds on a small CPU, so ``compile`` is tried only when asked for); CUDA tries
eager, channels_last, cuda_graph and the two compiled forms. Reduced precision (``dtype=``) is used
only when asked for. Candidates that are not installed, fail to build, or deviate from the eager
output by more than ``rtol`` (relative L2 norm) are skipped, and the log says why.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from repvgg.nn.convert import is_reparameterizable, reparameterize_model
from repvgg.nn.fusion import fuse_conv_bn, is_batchnorm
from repvgg.perf.runtimes import CANDIDATES, BuildContext, Candidate, Runner, Unsupported, default_candidates
from repvgg.perf.timing import make_timer, time_interleaved

__all__ = [
    "CANDIDATES",
    "Candidate",
    "CandidateReport",
    "InferenceRunner",
    "default_candidates",
    "default_rtol",
    "optimize_for_inference",
    "output_deviation",
]

log = logging.getLogger(__name__)


#: Largest relative L2 deviation from the eager float32 output accepted for each compute dtype.
_DEFAULT_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def default_rtol(dtype: torch.dtype) -> float:
    """The accepted relative deviation for a compute dtype (1e-4 for float32)."""
    if dtype not in _DEFAULT_RTOL:
        raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(str(d) for d in _DEFAULT_RTOL)}")
    return _DEFAULT_RTOL[dtype]


def output_deviation(actual: Any, expected: Any) -> float:
    """Largest relative L2 deviation ``|a - e| / |e|`` over the tensors of two (nested) outputs."""
    got, _ = tree_flatten(actual)
    want, _ = tree_flatten(expected)
    if len(got) != len(want):
        raise ValueError(f"outputs differ in structure: {len(got)} vs {len(want)} tensors")
    worst = 0.0
    for a, e in zip(got, want):
        if tuple(a.shape) != tuple(e.shape):
            raise ValueError(f"output shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
        a64, e64 = a.detach().to("cpu", torch.float64), e.detach().to("cpu", torch.float64)
        worst = max(worst, float((a64 - e64).norm() / e64.norm().clamp_min(1e-30)))
    return worst


@dataclass
class CandidateReport:
    """What happened to one candidate: built or not, its deviation, and its median time."""

    name: str
    status: str  # "ok", "unavailable", "failed", "inaccurate"
    detail: str = ""
    deviation: float | None = None
    median_s: float | None = None


class InferenceRunner:
    """A callable ``runner(x) -> output`` wrapping the chosen candidate.

    Inputs are moved to the runner's device and compute dtype; outputs come back in the compute
    dtype on the device (CPU runtimes return CPU tensors). Gradients are never recorded.

    Attributes:
        backend: name of the chosen candidate.
        device: where it computes.
        dtype: in which precision it computes.
        reports: one :class:`CandidateReport` per candidate considered.
        reason: one sentence on why this candidate was chosen.
    """

    def __init__(self, fn: Runner, *, backend: str, device: torch.device, dtype: torch.dtype,
                 reports: list[CandidateReport], reason: str) -> None:
        self._fn = fn
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.reports = reports
        self.reason = reason

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Any:
        return self._fn(x.to(device=self.device, dtype=self.dtype))

    def __repr__(self) -> str:
        return f"InferenceRunner(backend={self.backend!r}, device={self.device}, dtype={self.dtype})"


def _prepare(model: nn.Module, device: torch.device, dtype: torch.dtype, fuse: bool) -> nn.Module:
    """A fused eval-mode copy on ``device`` in ``dtype`` (the caller's model is never modified)."""
    prepared = copy.deepcopy(model).eval()
    if fuse:
        if any(is_reparameterizable(m) for m in prepared.modules()):
            prepared = reparameterize_model(prepared, inplace=True)
        if any(is_batchnorm(m) for m in prepared.modules()):
            prepared = fuse_conv_bn(prepared)
    for p in prepared.parameters():
        p.requires_grad_(False)
    return prepared.to(device=device, dtype=dtype).eval()


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


def _build_candidates(
    names: Sequence[str], prepared: nn.Module, example: Tensor, reference: Any, rtol: float, *, first_only: bool,
) -> tuple[dict[str, Runner], list[CandidateReport]]:
    """Build and verify each candidate in preference order; return the working ones and a report on all."""
    reports: list[CandidateReport] = []
    working: dict[str, Runner] = {}
    with tempfile.TemporaryDirectory(prefix="repvgg-fast-") as tmp:
        # The runtimes load what they need from the exported file before it is deleted.
        ctx = BuildContext(prepared, example, Path(tmp))
        for name in sorted(names, key=list(CANDIDATES).index):
            if example.device.type not in CANDIDATES[name].devices:
                reports.append(CandidateReport(name, "unavailable", f"not for {example.device.type}"))
                continue
            try:
                runner = CANDIDATES[name].build(ctx)
                with torch.no_grad():
                    deviation = output_deviation(runner(example), reference)
            except Unsupported as err:
                reports.append(CandidateReport(name, "unavailable", str(err)))
                log.debug("candidate %s skipped: %s", name, err)
                continue
            except ImportError as err:
                reports.append(CandidateReport(name, "unavailable", f"not installed ({err.name or err})"))
                log.info("candidate %s skipped: not installed (%s)", name, err.name or err)
                continue
            except Exception as err:  # noqa: BLE001 - any failure of an optional runtime just rules it out
                reports.append(CandidateReport(name, "failed", f"{type(err).__name__}: {err}"))
                log.info("candidate %s failed to build or run: %s: %s", name, type(err).__name__, err)
                continue
            if not deviation <= rtol:
                reports.append(CandidateReport(name, "inaccurate", f"deviation {deviation:.2e} > {rtol:.0e}",
                                               deviation))
                log.info("candidate %s rejected: relative deviation %.2e exceeds %.0e", name, deviation, rtol)
                continue
            reports.append(CandidateReport(name, "ok", "", deviation))
            working[name] = runner
            if first_only:
                break
    return working, reports


def optimize_for_inference(
    model: nn.Module,
    example_input: Tensor,
    *,
    dtype: torch.dtype | None = None,
    candidates: Sequence[str] | None = None,
    measure: bool = True,
    rtol: float | None = None,
    warmup: int | None = None,
    rounds: int | None = None,
    pause_s: float | None = None,
    fuse: bool = True,
) -> InferenceRunner:
    """Return the fastest verified way to run ``model`` on ``example_input``'s device.

    Works for any ``nn.Module`` taking one image tensor (RepVGG in either form, torchvision ResNets,
    timm models), so comparisons through it are fair. The caller's model is not modified.

    Args:
        model: the network (training-time RepVGG blocks are fused on a copy when ``fuse``).
        example_input: a representative batch on the target device; timing and the equivalence
            check use it, so give it the batch size you will run.
        dtype: compute precision (default: the input's float dtype); ``torch.float16`` or
            ``torch.bfloat16`` for reduced precision where the device supports it.
        candidates: names from :data:`CANDIDATES` to consider (default :func:`default_candidates`).
        measure: time the candidates and pick the fastest; ``False`` takes the first that works,
            in :data:`CANDIDATES` order.
        rtol: accepted relative L2 deviation from the eager model (default 1e-4 for float32).
        warmup: untimed calls per candidate (default 2 on the CPU, 10 on CUDA).
        rounds: timed rounds per candidate (default 5 on the CPU, 20 on CUDA).
        pause_s: idle time before each timed call (default 50 ms on the CPU, where runtimes with
            their own spinning thread pools would otherwise slow whichever candidate runs next).
        fuse: fuse RepVGG blocks and conv-BN pairs on the copy first (exact, and faster eagerly).

    Raises:
        ValueError: for an unknown candidate name or dtype, or if no candidate reproduces the
            eager output within ``rtol``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    device = example_input.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"optimize_for_inference supports 'cpu' and 'cuda' inputs, got {device.type!r}")
    dtype = dtype or (example_input.dtype if example_input.is_floating_point() else torch.float32)
    rtol = default_rtol(dtype) if rtol is None else rtol
    names = list(candidates) if candidates is not None else default_candidates(device)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown candidate(s) {unknown}; choose from {', '.join(CANDIDATES)}")
    if not names:
        raise ValueError("candidates is empty")
    cuda = device.type == "cuda"
    warmup = (10 if cuda else 2) if warmup is None else warmup
    rounds = (20 if cuda else 5) if rounds is None else rounds
    pause_s = (0.0 if cuda else 0.05) if pause_s is None else pause_s

    reference = _reference_output(model, example_input)
    prepared = _prepare(model, device, dtype, fuse)
    example = example_input.to(device=device, dtype=dtype)

    working, reports = _build_candidates(names, prepared, example, reference, rtol, first_only=not measure)
    if not working:
        details = "; ".join(f"{r.name}: {r.status} {r.detail}".strip() for r in reports)
        hint = (" On CUDA, TensorFloat-32 moves float32 results by ~1e-3: turn it off or pass a larger rtol."
                if cuda and dtype == torch.float32 else "")
        raise ValueError(f"no candidate reproduces the eager model within rtol={rtol:g} ({details}).{hint}")

    if measure and len(working) > 1:
        with torch.no_grad():
            timings = time_interleaved(
                {name: (lambda r=runner: r(example)) for name, runner in working.items()},
                warmup=warmup, rounds=rounds, timer=make_timer(device), pause_s=pause_s,
            )
        for report in reports:
            if report.name in timings:
                report.median_s = timings[report.name].median
        chosen = min(working, key=lambda n: timings[n].median)
        ranking = ", ".join(f"{n} {timings[n].median * 1e3:.2f} ms"
                            for n in sorted(working, key=lambda n: timings[n].median))
        reason = f"fastest median over {rounds} interleaved rounds at batch {example.shape[0]}: {ranking}"
    else:
        chosen = next(iter(working))
        reason = "the only candidate that works" if measure else "first working candidate (not measured)"
    log.info("optimize_for_inference(%s, %s, %s): %s (%s)", type(model).__name__, device,
             str(dtype).removeprefix("torch."), chosen, reason)
    return InferenceRunner(working[chosen], backend=chosen, device=device, dtype=dtype, reports=reports, reason=reason)

"""``repvgg bench``: speed, memory and FLOP rate of RepVGG against the paper's baselines, side by side.

For each requested RepVGG variant the benchmark times three forms (Ding et al., RepVGG, CVPR 2021):

* ``train``: the training-time multi-branch network, in eval mode, run eagerly;
* ``plain``: the converted network (one 3x3 conv + ReLU per layer), run eagerly;
* ``fast``: the converted network through :func:`repvgg.perf.fast.optimize_for_inference`;

next to torchvision's ResNets / VGG-16 with their conv-BN pairs fused (the paper's fair baselines),
eagerly (``fused``) and through the same fast path, and timm's re-parameterized RepVGG of the same
name run eagerly (``timm``, the peer implementation). All of them run in one process, in interleaved
rounds after warm-up, and the median is reported (see :mod:`repvgg.perf.timing`).

The FLOP rate puts each model's achieved GFLOP/s (2 x multiply-adds x images/s) next to that of one
large 3x3 convolution run through the fast path in the same run: how close the model comes to the
machine's practical limit. Peak memory of one forward pass comes from :mod:`repvgg.perf.memory`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from repvgg.perf.config import BenchConfig
from repvgg.nn.complexity import count_macs, count_parameters
from repvgg.perf.environment import device_supports_dtype, environment, set_tf32
from repvgg.perf.memory import peak_forward_memory
from repvgg.perf.timing import make_timer, synchronize, time_interleaved

__all__ = [
    "PAPER_PAIRS",
    "BenchConfig",
    "BenchResult",
    "BenchRow",
    "TargetCheck",
    "check_targets",
    "run_benchmark",
]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: The paper's speed comparisons (Ding et al., Sec. 4.1 and Table 4: 1080Ti, batch 128, float32):
#: RepVGG model -> (its baseline, RepVGG speed / baseline speed as published).
PAPER_PAIRS: dict[str, tuple[str, float]] = {
    "repvgg_a0": ("resnet18", 1.33),
    "repvgg_a1": ("resnet34", 1.64),
    "repvgg_a2": ("resnet50", 1.83),
    "repvgg_b1g2": ("resnet152", 2.66),
}

@dataclass
class BenchRow:
    """One model in one form at one precision."""

    model: str
    form: str  # train | plain | fast | fused | timm | conv3x3
    backend: str  # how it ran: eager or the fast path's choice
    dtype: str
    params: int
    macs: int  # per image
    batch_size: int
    throughput: float | None = None  # images/s at batch_size
    latency_ms: float | None = None  # batch 1
    gflops: float | None = None  # achieved, at batch_size
    flop_rate: float | None = None  # gflops / the reference conv's gflops
    peak_memory_bytes: int | None = None
    spread: float | None = None  # interquartile range / median of the throughput timings

    @property
    def label(self) -> str:
        return f"{self.model} ({self.form})"


@dataclass(frozen=True)
class TargetCheck:
    """One ratio the benchmark promises to report, with its threshold (``None``: information only)."""

    name: str
    dtype: str
    value: float
    threshold: float | None
    note: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.threshold is None else self.value >= self.threshold


@dataclass
class BenchResult:
    """Everything one run measured, plus where it ran."""

    config: BenchConfig
    environment: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    fast_paths: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: list[TargetCheck] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "environment": self.environment,
            "rows": [asdict(r) | {"label": r.label} for r in self.rows],
            "fast_paths": self.fast_paths,
            "targets": [asdict(t) | {"met": t.met} for t in self.targets],
        }

    def row(self, model: str, form: str, dtype: str = "float32") -> BenchRow | None:
        return next((r for r in self.rows if (r.model, r.form, r.dtype) == (model, form, dtype)), None)


# --- the entries ----------------------------------------------------------------------------------

@dataclass
class _Entry:
    row: BenchRow
    run: Callable[[Tensor], Any]
    module: nn.Module | None  # for the memory measurement (None for foreign runtimes)


def _complexity(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Parameters and per-image multiply-adds, counted on a ``meta`` copy (no compute, no memory)."""
    meta = copy.deepcopy(module).to("meta")
    return count_parameters(module), count_macs(meta, (1, *input_shape[1:]))


def _reference_conv(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=True)).eval()


def _selection_effort(device: torch.device) -> dict[str, int | None]:
    """Timing effort of the fast path's choice: brief on a small CPU (the budget is one minute),
    longer on CUDA (cuDNN autotuning and graph capture happen in the warm-up)."""
    return {"warmup": 1, "rounds": 3} if device.type == "cpu" else {"warmup": 5, "rounds": 10}


def _build_entries(config: BenchConfig, dtype_name: str, example: Tensor, result: BenchResult) -> list[_Entry]:
    from repvgg.nn.convert import reparameterize_model
    from repvgg.nn.registry import build_model

    dtype = _DTYPES[dtype_name]
    device = torch.device(config.device)
    batch = config.batch_size
    assert batch is not None
    entries: list[_Entry] = []

    def add(model_name: str, form: str, module: nn.Module, fast: bool = False) -> None:
        params, macs = _complexity(module, tuple(example.shape))
        module = module.to(device=device, dtype=dtype).eval()
        run: Callable[[Tensor], Any] = module
        backend = "eager"
        if fast:
            from repvgg.perf.fast import optimize_for_inference

            log.info("  choosing the fast path for %s", model_name)
            runner = optimize_for_inference(module, example, candidates=config.candidates, **_selection_effort(device))
            run, backend, module = runner, runner.backend, None  # type: ignore[assignment]
            result.fast_paths[f"{model_name}/{dtype_name}"] = {
                "backend": runner.backend,
                "reason": runner.reason,
                "candidates": [asdict(r) for r in runner.reports],
            }
        row = BenchRow(model_name, form, backend, dtype_name, params, macs, batch)
        entries.append(_Entry(row, run, module))

    for name in config.models:
        log.info("building %s (training-time, converted%s)", name, ", fast path" if config.fast else "")
        train = build_model(name, num_classes=config.num_classes).eval()
        plain = reparameterize_model(train)
        add(name, "train", train)
        add(name, "plain", plain)
        if config.fast:
            add(name, "fast", copy.deepcopy(plain), fast=True)
        if config.peer:
            from repvgg.nn.baselines import timm_peer

            try:
                add(name, "timm", timm_peer(name, num_classes=config.num_classes))
            except (ValueError, ImportError) as err:
                log.warning("no timm peer for %s: %s", name, err)
    for name in config.baselines:
        from repvgg.nn.baselines import torchvision_baseline

        log.info("building %s (conv-BN fused%s)", name, ", fast path" if config.fast else "")
        fused = torchvision_baseline(name, num_classes=config.num_classes)
        add(name, "fused", fused)
        if config.fast:
            add(name, "fast", copy.deepcopy(fused), fast=True)
    if config.reference_conv:
        channels, size = 256, max(config.img_size // 4, 8)
        conv_input = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
        conv = _reference_conv(channels)
        from repvgg.perf.fast import optimize_for_inference

        log.info("building the reference conv (3x3, %d->%d channels, %dx%d)", channels, channels, size, size)
        params, macs = _complexity(conv, tuple(conv_input.shape))
        runner = optimize_for_inference(conv.to(device, dtype), conv_input, candidates=config.candidates,
                                        **_selection_effort(device))
        row = BenchRow(f"conv3x3 {channels}ch {size}x{size}", "conv3x3", runner.backend, dtype_name, params, macs,
                       batch)
        entries.append(_Entry(row, lambda _x, r=runner, i=conv_input: r(i), None))
    return entries


def _progress(phase: str) -> Callable[[int, int], None]:
    def report(i: int, n: int) -> None:
        if (i + 1) % max(1, n // 5) == 0 or i + 1 == n:
            log.info("  %s: round %d/%d", phase, i + 1, n)

    return report


@torch.no_grad()
def run_benchmark(config: BenchConfig | None = None) -> BenchResult:
    """Run the benchmark described by ``config`` and return every measurement (nothing is printed)."""
    config = (config or BenchConfig()).resolved()
    device = torch.device(config.device)
    result = BenchResult(config, environment(config.device, tf32=config.tf32))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # let cuDNN pick the fastest algorithm per shape
        set_tf32(config.tf32)
    timer = make_timer(device)
    assert config.batch_size is not None and config.warmup is not None and config.rounds is not None
    for dtype_name in config.dtypes:
        dtype = _DTYPES[dtype_name]
        if not device_supports_dtype(device, dtype):
            log.warning("skipping %s: not supported on %s", dtype_name, device)
            continue
        example = torch.randn(config.batch_size, 3, config.img_size, config.img_size, device=device, dtype=dtype)
        entries = _build_entries(config, dtype_name, example, result)

        log.info("timing %d models at batch %d, %s, %s: %d warm-up + %d interleaved rounds",
                 len(entries), config.batch_size, dtype_name, device, config.warmup, config.rounds)
        timings = time_interleaved(
            {e.row.label: (lambda e=e, x=example: e.run(x)) for e in entries},
            warmup=config.warmup, rounds=config.rounds, timer=timer, pause_s=config.pause_s or 0.0,
            on_round=_progress("throughput"),
        )
        for e in entries:
            t = timings[e.row.label]
            e.row.throughput = t.throughput(config.batch_size)
            e.row.spread = t.spread()
            e.row.gflops = 2 * e.row.macs * e.row.throughput / 1e9
            if e.row.spread > 0.2:
                log.warning("%s: per-round times vary by %.0f%% (IQR/median); is something else running?",
                            e.row.label, 100 * e.row.spread)
        if config.latency:
            single = example[:1].clone()
            log.info("timing latency at batch 1")
            latency = time_interleaved(
                {e.row.label: (lambda e=e, x=single: e.run(x)) for e in entries if e.row.form != "conv3x3"},
                warmup=config.warmup, rounds=config.rounds, timer=timer, pause_s=config.pause_s or 0.0,
                on_round=_progress("latency"),
            )
            for e in entries:
                if e.row.label in latency:
                    e.row.latency_ms = latency[e.row.label].median * 1e3
        if config.memory:
            log.info("measuring peak forward memory")
            for e in entries:
                if e.module is not None:
                    e.row.peak_memory_bytes = peak_forward_memory(e.module, example)
                    synchronize(device)
        reference = next((e.row for e in entries if e.row.form == "conv3x3"), None)
        if reference is not None and reference.gflops:
            for e in entries:
                e.row.flop_rate = e.row.gflops / reference.gflops if e.row.gflops is not None else None
        result.rows.extend(e.row for e in entries)
        del entries
    result.targets = check_targets(result)
    return result


def check_targets(result: BenchResult,
                  thresholds: Mapping[str, Mapping[str, float]] | None = None) -> list[TargetCheck]:
    """The ratios the paper's speed claims are about, from the measured rows.

    For every RepVGG model and precision: converted / training-time throughput (``plain_vs_train``),
    fast path / timm's eager model (``fast_vs_timm``), fast path / the paper's baseline for that model
    through the same fast path (``fast_vs_baseline_fast``; the paper's GPU figure is quoted in the
    note), and the fast path's FLOP rate (``flop_rate``). ``thresholds`` maps a model name to minimum
    values by those keys (a benchmark's own targets); ratios without one are information.
    """
    checks: list[TargetCheck] = []
    for name in result.config.models:
        for dtype in result.config.dtypes:
            threshold = (thresholds or {}).get(name, {}).get

            train, plain = result.row(name, "train", dtype), result.row(name, "plain", dtype)
            fast, timm = result.row(name, "fast", dtype), result.row(name, "timm", dtype)
            if train and plain and train.throughput and plain.throughput:
                checks.append(TargetCheck(f"{name}: converted / training-time throughput", dtype,
                                          plain.throughput / train.throughput, threshold("plain_vs_train")))
            if fast and timm and fast.throughput and timm.throughput:
                checks.append(TargetCheck(f"{name}: fast path / timm re-parameterized (eager)", dtype,
                                          fast.throughput / timm.throughput, threshold("fast_vs_timm")))
            if name in PAPER_PAIRS:
                partner, paper = PAPER_PAIRS[name]
                other = result.row(partner, "fast", dtype)
                if fast and other and fast.throughput and other.throughput:
                    checks.append(TargetCheck(
                        f"{name} / {partner}, both through the fast path", dtype,
                        fast.throughput / other.throughput, threshold("fast_vs_baseline_fast"),
                        f"paper (1080Ti, batch 128, fp32): {paper:.2f}x",
                    ))
            if fast and fast.flop_rate is not None:
                checks.append(TargetCheck(f"{name}: fast path GFLOP/s / single 3x3 conv GFLOP/s", dtype,
                                          fast.flop_rate, threshold("flop_rate")))
    return checks

"""``repvgg bench``: speed, memory and FLOP rate of RepVGG against the paper's baselines, side by side.

For each requested RepVGG variant the benchmark times three forms (Ding et al., RepVGG, CVPR 2021):

* ``train``: the training-time multi-branch network, in eval mode, run eagerly;
* ``plain``: the converted network (one 3x3 conv + ReLU per layer), run eagerly;
* ``fast``: the converted network through
  [`repvgg.perf.fast.optimize_for_inference`][repvgg.perf.fast.optimize_for_inference];

next to torchvision's ResNets / VGG-16 with their conv-BN pairs fused (the paper's fair baselines),
eagerly (``fused``) and through the same fast path, and timm's re-parameterized RepVGG of the same
name run eagerly (``timm``, the peer implementation). All of them run in one process, in interleaved
rounds after warm-up, and the median is reported (see `repvgg.measure.timing`).

The FLOP rate puts each model's achieved GFLOP/s (2 x multiply-adds x images/s) next to that of one
large 3x3 convolution run through the fast path in the same run: how close the model comes to the
machine's practical limit. Peak memory of one forward pass comes from `repvgg.measure.memory`.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from repvgg.perf.config import BenchConfig
from repvgg.nn.complexity import count_macs, count_parameters
from repvgg.measure.environment import cpu_features, device_supports_dtype, environment, native_bf16, set_tf32
from repvgg.measure.memory import peak_forward_memory
from repvgg.measure.timing import make_timer, synchronize, time_interleaved

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
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

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
    deviation: float | None = None  # relative L2 deviation from the float32 model's output on the batch
    agreement: float | None = None  # fraction of the batch whose top-1 equals the float32 model's

    @property
    def label(self) -> str:
        runtime = f": {self.backend}" if self.form in ("fast", "runtime") else ""
        return f"{self.model} ({self.form}{runtime})"


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
    skipped: dict[str, str] = field(default_factory=dict)  # precision -> why it was not measured
    #: ``"model/precision"`` -> the accuracy guard of a reduced precision
    #: ([`GuardResult`][repvgg.quant.guard.GuardResult] as a dict, plus ``data``), measured on a trained model of the
    #: same architecture by whoever has the data.
    guards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "environment": self.environment,
            "rows": [asdict(r) | {"label": r.label, "accepted": self.accepted(r)} for r in self.rows],
            "fast_paths": self.fast_paths,
            "targets": [asdict(t) | {"met": t.met} for t in self.targets],
            "skipped": self.skipped,
            "guards": self.guards,
        }

    def row(self, model: str, form: str, dtype: str = "float32") -> BenchRow | None:
        return next((r for r in self.rows if (r.model, r.form, r.dtype) == (model, form, dtype)), None)

    def accepted(self, row: BenchRow) -> bool | None:
        """Whether a row's precision passed the accuracy guard: float32 always (the fast path checked it within
        1e-4), a reduced precision only where `guards` says so (``None``: not checked)."""
        if row.dtype == "float32":
            return True
        guard = self.guards.get(f"{row.model}/{row.dtype}/{row.backend}", self.guards.get(f"{row.model}/{row.dtype}"))
        return None if guard is None else bool(guard["passed"])


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


def _selection_effort(device: torch.device) -> tuple[int, int]:
    """``(warmup, rounds)`` of the fast path's choice: brief on a small CPU (the budget is one minute), longer on
    CUDA (cuDNN autotuning and graph capture happen in the warm-up)."""
    return (1, 3) if device.type == "cpu" else (5, 10)


def _on_float32(run: Callable[[Tensor], Any], x: Tensor) -> Any:
    return run(x.float())


def _on_fixed_input(run: Callable[[Tensor], Any], fixed: Tensor, _x: Tensor) -> Any:
    return run(fixed)


def _agreement(output: Any, reference: Tensor) -> tuple[float, float | None]:
    """``(relative deviation, top-1 agreement)`` of an output against the float32 reference on the same batch."""
    from repvgg.quant.guard import output_deviation

    output = output.float() if isinstance(output, Tensor) else output
    deviation = output_deviation(output, reference)
    agreement = float((output.argmax(1) == reference.argmax(1)).float().mean()) if isinstance(output, Tensor) else None
    return deviation, agreement


def _eager_entry(name: str, form: str, module: nn.Module, example: Tensor, reference: Tensor | None,
                 batch: int) -> _Entry:
    params, macs = _complexity(module, tuple(example.shape))
    module = module.to(device=example.device, dtype=example.dtype).eval()
    row = BenchRow(name, form, "eager", _DTYPE_NAMES[example.dtype], params, macs, batch)
    if reference is not None:
        row.deviation, row.agreement = _agreement(module(example), reference)
    return _Entry(row, module, module)


def _fast_entries(name: str, module: nn.Module, config: BenchConfig, precision: str, example: Tensor,
                  calibration: list[Tensor], result: BenchResult, *, every_runtime: bool) -> list[_Entry]:
    """The fast path's choice in ``precision`` (form ``fast``) and, with ``every_runtime``, every other runtime
    that computes in it (form ``runtime``), each with its deviation and agreement from float32 on the batch."""
    from repvgg.perf.fast import optimize_for_inference

    device = torch.device(config.device)
    params, macs = _complexity(module, tuple(example.shape))
    module = module.to(device=device, dtype=torch.float32).eval()
    log.info("  choosing the fast path for %s in %s", name, precision)
    # every runtime is a row of its own (every_runtime), or only the chosen one is kept: then it is chosen holding one
    # runtime's copy of the model at a time (a VGG-16 is 0.5 GB a copy)
    warmup, rounds = _selection_effort(device)
    # a benchmark times every precision; whether a reduced one is accurate is judged apart (BenchResult.guards)
    runner = optimize_for_inference(module, example.float(), dtype=precision, candidates=config.candidates,
                                    calibration=calibration if precision == "int8" else None,
                                    one_at_a_time=not every_runtime, warmup=warmup, rounds=rounds,
                                    check_accuracy=False)
    result.fast_paths[f"{name}/{precision}"] = {"backend": runner.backend, "reason": runner.reason,
                                                 "candidates": [asdict(r) for r in runner.reports]}
    reference = module(example.float())
    runs: dict[str, Callable[[Tensor], Any]] = {runner.backend: runner}
    if every_runtime:
        runs.update({backend: run for (backend, _), run in runner.alternatives.items()})
    entries = []
    for backend, run in runs.items():
        row = BenchRow(name, "fast" if backend == runner.backend else "runtime", backend, precision, params, macs,
                       config.batch)
        row.deviation, row.agreement = _agreement(run(example.float()), reference)
        entries.append(_Entry(row, functools.partial(_on_float32, run), None))
    return entries


def _build_entries(config: BenchConfig, precision: str, example: Tensor, result: BenchResult,
                   calibration: list[Tensor]) -> list[_Entry]:
    from repvgg.nn.convert import reparameterize_model
    from repvgg.nn.registry import build_model

    floating = precision != "int8"
    batch = config.batch
    entries: list[_Entry] = []
    for name in config.models:
        log.info("building %s (training-time, converted%s)", name, ", fast path" if config.fast else "")
        train = build_model(name, num_classes=config.num_classes).eval()
        plain = reparameterize_model(train)
        reference = plain(example.float())
        if floating and not config.fast_only:
            entries += [_eager_entry(name, "train", copy.deepcopy(train), example, reference, batch),
                        _eager_entry(name, "plain", copy.deepcopy(plain), example, reference, batch)]
        if config.fast:
            entries += _fast_entries(name, plain, config, precision, example, calibration, result,
                                     every_runtime=not config.fast_only)
        del train, plain
        if config.peer and floating and not config.fast_only:
            from repvgg.nn.baselines import timm_peer

            try:
                entries.append(_eager_entry(name, "timm", timm_peer(name, num_classes=config.num_classes), example,
                                            None, batch))
            except (ValueError, ImportError) as err:
                log.warning("no timm peer for %s: %s", name, err)
    for name in config.baselines:
        from repvgg.nn.baselines import baseline

        log.info("building %s (conv-BN fused%s)", name, ", fast path" if config.fast else "")
        fused = baseline(name, num_classes=config.num_classes).eval()
        reference = fused(example.float())
        if config.fast:  # the fast path works on copies of its own: it goes first, before the eager row casts
            entries += _fast_entries(name, fused, config, precision, example, calibration, result,
                                     every_runtime=False)
        if floating and not config.fast_only:
            entries.append(_eager_entry(name, "fused", fused, example, reference, batch))
        del fused
    if config.reference_conv and floating:
        entries.append(_reference_conv_entry(config, precision, example))
    return entries


def _reference_conv_entry(config: BenchConfig, precision: str, example: Tensor) -> _Entry:
    """One large 3x3 conv through the fast path: the FLOP rate's reference."""
    from repvgg.perf.fast import optimize_for_inference

    channels, size = 256, max(config.img_size // 4, 8)
    conv_input = torch.randn(config.batch, channels, size, size, device=example.device, dtype=example.dtype)
    conv = _reference_conv(channels)
    log.info("building the reference conv (3x3, %d->%d channels, %dx%d)", channels, channels, size, size)
    params, macs = _complexity(conv, tuple(conv_input.shape))
    warmup, rounds = _selection_effort(example.device)
    runner = optimize_for_inference(conv.to(example.device), conv_input, dtype=precision,
                                    candidates=config.candidates, warmup=warmup, rounds=rounds, check_accuracy=False)
    row = BenchRow(f"conv3x3 {channels}ch {size}x{size}", "conv3x3", runner.backend, precision, params, macs,
                   config.batch)
    return _Entry(row, functools.partial(_on_fixed_input, runner, conv_input), None)


def _skip_reason(device: torch.device, precision: str) -> str | None:
    """Why ``precision`` is not measured on ``device`` (``None``: it is)."""
    if precision == "int8":
        return None if device.type == "cpu" else "INT8 runs through ONNX Runtime or OpenVINO on the CPU"
    if not device_supports_dtype(device, _DTYPES[precision]):
        return f"{precision} convolutions are not supported on this {device.type}"
    if precision == "bfloat16" and not native_bf16(device):
        return f"this {device.type} has no native BF16 ({cpu_features().describe()}): it would be emulated"
    return None


def _generated_calibration(config: BenchConfig, device: torch.device) -> list[Tensor]:
    """INT8's calibration in a benchmark: generated images (random normal, seeded), said so in the report."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(config.batch, 3, config.img_size, config.img_size, generator=gen).to(device)
            for _ in range(4)]


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
        skipped = _skip_reason(device, dtype_name)
        if skipped:
            log.warning("skipping %s: %s", dtype_name, skipped)
            result.skipped[dtype_name] = skipped
            continue
        dtype = _DTYPES.get(dtype_name, torch.float32)  # INT8 runners take float32 batches
        example = torch.randn(config.batch, 3, config.img_size, config.img_size, device=device, dtype=dtype)
        entries = _build_entries(config, dtype_name, example, result, _generated_calibration(config, device))

        log.info("timing %d models at batch %d, %s, %s: %d warm-up + %d interleaved rounds",
                 len(entries), config.batch_size, dtype_name, device, config.warmup, config.rounds)
        timings = time_interleaved(
            {e.row.label: functools.partial(e.run, example) for e in entries},
            warmup=config.warmup, rounds=config.rounds, timer=timer, pause_s=config.pause_s or 0.0,
            on_round=_progress("throughput"),
        )
        for e in entries:
            t = timings[e.row.label]
            e.row.throughput = t.throughput(config.batch)
            e.row.spread = t.spread()
            e.row.gflops = 2 * e.row.macs * e.row.throughput / 1e9
            if e.row.spread > 0.2:
                log.warning("%s: per-round times vary by %.0f%% (IQR/median); is something else running?",
                            e.row.label, 100 * e.row.spread)
        if config.latency:
            single = example[:1].clone()
            log.info("timing latency at batch 1")
            latency = time_interleaved(
                {e.row.label: functools.partial(e.run, single) for e in entries if e.row.form != "conv3x3"},
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
        fastest = _fastest_accepted_vs_timm(result, name, (thresholds or {}).get(name, {}).get("fastest_vs_timm"))
        if fastest is not None:
            checks.append(fastest)
    return checks


def _fastest_accepted_vs_timm(result: BenchResult, name: str, threshold: float | None) -> TargetCheck | None:
    """The fastest row of RepVGG ``name`` whose precision passed the accuracy guard, against timm's eager float32
    model: the speed a deployment gets from this package over the usual one."""
    timm = result.row(name, "timm", "float32")
    timm_rate = timm.throughput if timm is not None else None
    rated = [(r, r.throughput) for r in result.rows if r.model == name and r.form in ("plain", "fast", "runtime")
             and r.throughput and result.accepted(r)]
    if not rated or not timm_rate:
        return None
    best, rate = max(((r, t) for r, t in rated if t is not None), key=lambda pair: pair[1])
    guard = result.guards.get(f"{name}/{best.dtype}/{best.backend}", result.guards.get(f"{name}/{best.dtype}"))
    note = (f"accuracy guard: {guard['detail']}" if guard else "float32: within 1e-4 of the eager model")
    return TargetCheck(f"{name}: fastest accepted row ({best.backend}, {best.dtype}) / timm eager float32",
                       best.dtype, rate / timm_rate, threshold, note)

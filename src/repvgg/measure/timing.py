"""Timing harness: interleaved rounds after warm-up, medians, and a clock that is right for the device.

Timings on a shared machine drift (frequency scaling, other processes, thermal limits). Timing the
candidates one after the other would let that drift favour whichever ran in the quiet moment, so
every candidate is timed once per round, in the same order, round after round (A B C A B C ...), and
the median over rounds is reported.

CUDA work is asynchronous: a host clock read right after a launch measures the launch, not the work.
`cuda_timer` records CUDA events on the current stream around the call and waits for the end
event before reading the elapsed time.

A choice between runtimes ([`choice_timer`][repvgg.measure.timing.choice_timer]) weighs wall time, except on
a CPU whose cores the process shares with other work of its own (a server's: see
[`share_cores`][repvgg.io.onnx_run.share_cores]): there it weighs the CPU time a call costs every thread, the
runtime's spinning after the call included, which is what the other work loses.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "SETTLE_S",
    "Timer",
    "TimingResult",
    "choice_timer",
    "cpu_cost_timer",
    "cpu_timer",
    "cuda_timer",
    "make_timer",
    "synchronize",
    "time_interleaved",
]

log = logging.getLogger(__name__)

#: A timer calls its argument once and returns the seconds that call took on the device.
Timer = Callable[[Callable[[], object]], float]


def cpu_timer(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes by the host's monotonic high-resolution clock (CPU work only)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


#: Seconds after a call whose CPU time `cpu_cost_timer` bills to it: runtimes' workers spin for about a
#: millisecond after a call before they sleep.
SETTLE_S = 0.002


def cpu_cost_timer(fn: Callable[[], object]) -> float:
    """The process's CPU seconds (every thread) over one call of ``fn`` and the `SETTLE_S` after it: what the call
    takes from the process's other threads on the same cores, its runtime's spinning included."""
    start = time.process_time()
    fn()
    time.sleep(SETTLE_S)
    return time.process_time() - start


def choice_timer(device: torch.device | str) -> tuple[Timer, str]:
    """How a choice between runtimes times a call on ``device``, and what the ranking is by: wall time
    ([`make_timer`][repvgg.measure.timing.make_timer]), or, on a CPU whose cores are shared with the process's other
    work ([`share_cores`][repvgg.io.onnx_run.share_cores]), `cpu_cost_timer`."""
    from repvgg.io.onnx_run import cores_shared

    if torch.device(device).type == "cpu" and cores_shared():
        return cpu_cost_timer, "least CPU time (every thread, spinning after the call included)"
    return make_timer(device), "fastest"


def cuda_timer(device: torch.device | str | int | None = None) -> Timer:
    """A timer for CUDA work: events recorded on the current stream around the call.

    The device is synchronised before the start event, so work queued earlier (another candidate's
    round) is not billed to this call, and the end event is waited on before reading the time.
    """

    def timer(fn: Callable[[], object]) -> float:
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

    return timer


def make_timer(device: torch.device | str) -> Timer:
    """The right timer for ``device``: CUDA events on CUDA devices, the host clock on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_timer(device)
    if device.type != "cpu":
        raise ValueError(f"timing is supported on 'cpu' and 'cuda' devices, got {device.type!r}")
    return cpu_timer


def synchronize(device: torch.device | str) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TimingResult:
    """Per-call times (seconds) of one candidate, in the order the rounds ran."""

    name: str
    samples: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def median(self) -> float:
        """Median seconds per call (robust to the occasional descheduled round)."""
        if not self.samples:
            raise ValueError(f"no timed samples for {self.name!r}: rounds must be >= 1")
        return statistics.median(self.samples)

    def spread(self) -> float:
        """Interquartile range relative to the median: a noise figure for the report."""
        if len(self.samples) < 4:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return (q3 - q1) / self.median

    def throughput(self, batch_size: int) -> float:
        """Items per second at ``batch_size`` items per call, from the median call time."""
        return batch_size / self.median


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    rounds: int,
    timer: Timer = cpu_timer,
    order: Sequence[str] | None = None,
    pause_s: float = 0.0,
    on_round: Callable[[int, int], None] | None = None,
) -> dict[str, TimingResult]:
    """Time every callable in ``fns`` over interleaved rounds and return their per-call samples.

    First each callable runs ``warmup`` times untimed (in turn, so lazy initialisation, autotuning,
    allocator growth and weight re-layouts happen before timing), then ``rounds`` rounds follow; in
    each round every callable is timed once, in ``order`` (default: the mapping's order).

    Args:
        fns: name -> zero-argument callable doing one unit of work (e.g. one batch).
        warmup: untimed calls per callable before the first round (>= 0).
        rounds: timed calls per callable (>= 1).
        timer: how one call is timed (`cpu_timer`, `cuda_timer`, or a fake in tests).
        order: the order within a round; must be a permutation of ``fns``' names.
        pause_s: idle seconds before each timed call (not timed). Runtimes with their own thread
            pools (ONNX Runtime, OpenVINO, OpenMP) spin for a while after a call; on a small CPU
            that spinning would be billed to whichever candidate runs next.
        on_round: called as ``on_round(round_index, rounds)`` after each round (progress reports).
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not fns:
        raise ValueError("nothing to time: fns is empty")
    if pause_s < 0:
        raise ValueError(f"pause_s must be >= 0, got {pause_s}")
    names = list(fns) if order is None else list(order)
    if sorted(names) != sorted(fns):
        raise ValueError(f"order {names} must name each of {sorted(fns)} exactly once")
    results = {name: TimingResult(name, warmup=warmup) for name in names}
    for _ in range(warmup):
        for name in names:
            fns[name]()
    for r in range(rounds):
        for name in names:
            if pause_s:
                time.sleep(pause_s)
            results[name].samples.append(timer(fns[name]))
        if on_round is not None:
            on_round(r, rounds)
    for name in names:
        log.debug("%s: median %.3f ms over %d rounds", name, results[name].median * 1e3, rounds)
    return results

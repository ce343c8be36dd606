"""Choosing among the working candidates of [`optimize_for_inference`][repvgg.perf.fast.optimize_for_inference]:
the fastest, timed in interleaved rounds ([`choose`][repvgg.perf.choosing.choose]) or one at a time as each is built
([`FastestSoFar`][repvgg.perf.choosing.FastestSoFar]), by wall time or, where the cores are shared, by CPU time
([`choice_timer`][repvgg.measure.timing.choice_timer])."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from repvgg.measure.timing import choice_timer, time_interleaved
from repvgg.perf.runtimes import Runner
from repvgg.quant.guard import PrecisionRejected

__all__ = ["FastestSoFar", "choose", "effort"]


class FastestSoFar:
    """Times each candidate alone as it is built and keeps only the fastest so far, so that one runtime's copy of a
    large model is held at a time besides it (the timings are then not interleaved)."""

    def __init__(self, check: Callable[[dict[tuple[str, str], Runner], list[Any]], None],
                 example: Tensor, warmup: int, rounds: int, pause_s: float) -> None:
        self.check, self.example = check, example
        self.warmup, self.rounds, self.pause_s = warmup, rounds, pause_s
        self.best: tuple[str, str] | None = None
        self.medians: dict[tuple[str, str], float] = {}
        self.rejected: PrecisionRejected | None = None  # raised if no candidate at all holds the guard

    def __call__(self, working: dict[tuple[str, str], Runner], reports: list[Any],
                 key: tuple[str, str]) -> None:
        report = next(r for r in reports if (r.name, r.precision) == key)
        try:
            self.check({key: working[key]} if key[1] != "float32" else {}, reports)  # the accuracy guard, alone
        except PrecisionRejected as err:
            report.status, self.rejected = "inaccurate", err
        if report.status != "ok":
            del working[key]
            return
        label = f"{key[0]}/{key[1]}"
        with torch.no_grad():
            timing = time_interleaved({label: functools.partial(working[key], self.example)}, warmup=self.warmup,
                                      rounds=self.rounds, timer=choice_timer(self.example.device)[0],
                                      pause_s=self.pause_s)
        self.medians[key] = report.median_s = timing[label].median
        loser = key if self.best is not None and self.medians[key] >= self.medians[self.best] else self.best
        if loser is not None:
            del working[loser]
        self.best = key if loser != key else self.best
        gc.collect()

    def reason(self) -> str:
        ranked = sorted(self.medians, key=self.medians.__getitem__)
        return (f"{choice_timer(self.example.device)[1]} median over {self.rounds} rounds at batch "
                f"{self.example.shape[0]}, each candidate timed alone (one runtime's copy held at a time): "
                + ", ".join(f"{n}/{p} {self.medians[(n, p)] * 1e3:.2f} ms" for n, p in ranked))


def effort(device: torch.device, warmup: int | None, rounds: int | None,
            pause_s: float | None) -> tuple[int, int, float]:
    """Warm-up calls, timed rounds and the idle pause before each timed call: as given, else the device's
    defaults (CUDA: 10, 20, none; the CPU: 2, 5 and 50 ms, so that one runtime's spinning threads settle)."""
    cuda = device.type == "cuda"
    return ((10 if cuda else 2) if warmup is None else warmup, (20 if cuda else 5) if rounds is None else rounds,
            (0.0 if cuda else 0.05) if pause_s is None else pause_s)


def choose(working: dict[tuple[str, str], Runner], reports: list[Any], example: Tensor, *,
            measure: bool, warmup: int | None, rounds: int | None,
            pause_s: float | None) -> tuple[tuple[str, str], str]:
    """The fastest of the working candidates (timed in interleaved rounds), or the first without ``measure``."""
    if not measure or len(working) == 1:
        reason = "the only candidate that works" if measure else "first working candidate (not measured)"
        return next(iter(working)), reason
    warmup, rounds, pause_s = effort(example.device, warmup, rounds, pause_s)
    labels = {key: f"{key[0]}/{key[1]}" for key in working}
    timer, ranked_by = choice_timer(example.device)
    with torch.no_grad():
        timings = time_interleaved({labels[k]: functools.partial(runner, example) for k, runner in working.items()},
                                   warmup=warmup, rounds=rounds, timer=timer, pause_s=pause_s)
    for report in reports:
        key = (report.name, report.precision)
        if key in working:
            report.median_s = timings[labels[key]].median
    ranked = sorted(working, key=lambda k: timings[labels[k]].median)
    ranking = ", ".join(f"{labels[k]} {timings[labels[k]].median * 1e3:.2f} ms" for k in ranked)
    return ranked[0], f"{ranked_by} median over {rounds} interleaved rounds at batch {example.shape[0]}: {ranking}"

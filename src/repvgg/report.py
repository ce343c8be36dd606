"""Presenting results: markdown tables, and a benchmark's table, JSON and figure written together.

Measuring code returns data (e.g. [`BenchResult`][repvgg.perf.bench.BenchResult]); this module and
`repvgg.plots` present it.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from repvgg.plots import plot_throughput
from repvgg.serialization import readable_text, write_json, write_text

__all__ = ["bench_header", "bench_table", "markdown_table", "printable", "write_bench_report"]

_CONTROL = {i: f"\\x{i:02x}" for i in [*range(32), 127]} | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
                                                          ord("\\"): "\\\\"}
# the bidirectional controls, which reorder what a terminal shows after them
_CONTROL |= {c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def printable(text: str) -> str:
    """``text`` for one cell of a printed table: newlines, tabs, carriage returns, other control characters and the
    bidirectional controls (in a file name or a class name) written as escapes (``\\n``, ``\\t``, ``\\x1b``,
    ``\\u202e``), and file-name bytes that are not UTF-8 too, so each row stays one line and the terminal shows what
    is there."""
    return readable_text(text.translate(_CONTROL))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table with columns padded for reading in a terminal; a cell's control characters
    and ``|`` are escaped (a class name or path cannot break its row)."""
    cells = [[printable(str(c)).replace("|", "\\|") for c in header]] + \
        [[printable(str(c)).replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def bench_table(result: Any) -> str:
    """A [`BenchResult`][repvgg.perf.bench.BenchResult] as a markdown table, followed by the target ratios.

    ``IQR`` is the interquartile range of the per-round times relative to their median: a noise
    figure (a few percent on a quiet machine; large values mean other work shared the CPU). ``vs FP32`` is a
    row's relative deviation from the float32 model on the timed batch and the share of that batch whose top-1
    agrees; ``guard`` whether its precision passed the accuracy guard (yes / no / "-" not checked).
    """
    cfg = result.config
    header = ["model", "form", "runs on", "dtype", "params (M)", "GMACs", f"img/s @{cfg.batch_size}",
              "IQR", "latency @1 (ms)", "GFLOP/s", "FLOP rate", "peak mem (MiB)", "vs FP32 (dev / agree)", "guard"]
    rows = [[
        r.model, r.form, r.backend, r.dtype, f"{r.params / 1e6:.2f}", f"{r.macs / 1e9:.2f}",
        _fmt(r.throughput, ".1f"), "-" if r.spread is None else f"{100 * r.spread:.0f}%",
        _fmt(r.latency_ms, ".2f"), _fmt(r.gflops, ".0f"),
        "-" if r.flop_rate is None else f"{100 * r.flop_rate:.0f}%",
        "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.1f}",
        "-" if r.deviation is None else f"{r.deviation:.1e} / {100 * (r.agreement or 0):.0f}%",
        {True: "yes", False: "no", None: "-"}[result.accepted(r)],
    ] for r in result.rows]
    text = markdown_table(header, rows)
    notes = [f"{precision}: not measured ({why})" for precision, why in result.skipped.items()]
    if "int8" in cfg.dtypes and "int8" not in result.skipped:
        notes.append("int8: calibrated on generated images (random, seeded); the timed models have random weights, so "
                     "their agreement on random images is no accuracy measure: the guard column says whether the "
                     "precision passed the accuracy guard on a trained model of the same architecture")
    if notes:
        text += "\n\n" + "\n".join(f"- {note}" for note in notes)
    if result.targets:
        target_rows = [[
            t.name, t.dtype, f"{t.value:.2f}",
            "-" if t.threshold is None else f">= {t.threshold:g}",
            {True: "met", False: "missed", None: "-"}[t.met], t.note,
        ] for t in result.targets]
        text += "\n\n" + markdown_table(["ratio", "dtype", "measured", "target", "", "note"], target_rows)
    return text


def bench_header(result: Any, *, note: str = "") -> str:
    """One paragraph saying where and how a benchmark ran: the device, the versions, batch, size, precision and
    timing effort, and the date (so a reader can scale the numbers to their own machine)."""
    env, cfg = result.environment, result.config
    if env.get("gpu"):
        where = (f"{env['gpu']}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, TF32 "
                 f"{'on' if env.get('tf32') else 'off'}")
    else:
        features = env.get("cpu_features", {}).get("summary", "features not read")
        where = (f"CPU, {env.get('cpu')} ({features}), {env.get('logical_cpus')} logical CPUs, "
                 f"{env.get('torch_threads')} PyTorch threads")
    return (f"{where}; torch {env.get('torch')}, onnxruntime {env.get('onnxruntime', '-')}, openvino "
            f"{env.get('openvino', '-')}; batch {cfg.batch_size}, "
            f"{cfg.img_size}x{cfg.img_size}, {', '.join(cfg.dtypes)}; median of {cfg.rounds} interleaved rounds after "
            f"{cfg.warmup} warm-up ({datetime.now(timezone.utc):%Y-%m-%d}){'; ' + note if note else ''}.")


def write_bench_report(result: Any, folder: str | os.PathLike[str], stem: str, *, note: str = "") -> dict[str, Path]:
    """``folder/stem.md`` (`bench_header` and `bench_table`), ``stem.json`` (every number) and
    ``stem.png`` (throughput against parameters) of a benchmark result."""
    folder = Path(folder)
    return {
        "markdown": write_text(folder / f"{stem}.md", f"{bench_header(result, note=note)}\n\n{bench_table(result)}\n"),
        "json": write_json(folder / f"{stem}.json", result.as_dict()),
        "plot": plot_throughput(result, folder / f"{stem}.png"),
    }

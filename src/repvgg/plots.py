"""PNG figures for run folders (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from repvgg.serialization import atomic_write

__all__ = ["pyplot", "plot_curves", "plot_throughput", "plot_training_curves", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend (imported only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG atomically (a failed write names the file and leaves the old one) and close it."""
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        pyplot().close(fig)
    return path


def plot_curves(
    history: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    losses: Mapping[str, str],
    scores: Mapping[str, str],
    loss_label: str,
    score_label: str,
    title: str = "",
) -> Path:
    """Per-epoch curves, losses on the left and scores on the right; the mappings are legend -> history key.

    Losses are drawn on a log scale: early validation losses (BatchNorm statistics far off in the first
    epoch) can be orders of magnitude above the rest and would flatten every other point.
    """
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, series, ylabel in ((ax_loss, losses, loss_label), (ax_score, scores, score_label)):
        for legend, key in series.items():
            ax.plot(epochs, [row[key] for row in history], label=legend)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_values = [row[key] for key in losses.values() for row in history]
    if loss_values and min(loss_values) > 0:
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel(f"{loss_label} (log scale)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """Classification runs: loss (train/val) and top-1 accuracy (train/val) per epoch."""
    return plot_curves(history, path, losses={"train": "train_loss", "val": "val_loss"},
                       scores={"train top-1": "train_top1", "val top-1": "val_top1"},
                       loss_label="cross-entropy", score_label="accuracy (%)", title=title)


def plot_throughput(result: Any, path: str | os.PathLike[str], dtype: str = "float32") -> Path:
    """Throughput against parameters, one point per model (its fastest form), like the paper's Fig. 1."""
    plt = pyplot()
    best: dict[tuple[str, str], Any] = {}
    for r in result.rows:
        if r.dtype != dtype or r.form in ("conv3x3", "train") or r.throughput is None:
            continue
        family = "timm" if r.form == "timm" else ("repvgg" if r.model in result.config.models else "baseline")
        key = (r.model, family)
        if key not in best or r.throughput > (best[key].throughput or 0):
            best[key] = r
    if not best:
        raise ValueError(f"no {dtype} throughput measurements to plot")
    styles = {"repvgg": ("tab:red", "o", "RepVGG (converted, fastest form)"),
              "baseline": ("tab:blue", "s", "baseline (conv-BN fused, fastest form)"),
              "timm": ("tab:gray", "^", "timm RepVGG (re-parameterized, eager)")}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for family, (color, marker, label) in styles.items():
        points = [r for (_, f), r in best.items() if f == family]
        if points:
            ax.scatter([p.params / 1e6 for p in points], [p.throughput for p in points], c=color, marker=marker,
                       s=50, label=label, zorder=3)
            for p in points:
                ax.annotate(f"{p.model}\n{p.backend}", (p.params / 1e6, p.throughput), fontsize=7,
                            xytext=(5, 3), textcoords="offset points")
    env = result.environment
    where = env.get("gpu") or f"{env.get('cpu')}, {env.get('torch_threads')} threads"
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"images/s (batch {result.config.batch_size}, {dtype})")
    ax.set_title(f"Throughput vs size: {where}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)

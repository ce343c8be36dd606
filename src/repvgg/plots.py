"""PNG figures for run folders (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from repvgg.serialization import atomic_write

__all__ = ["pyplot", "plot_curves", "plot_training_curves", "save_figure"]


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

"""PNG figures for run folders (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["plot_training_curves"]


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """Loss (train/val) and accuracy (train/val top-1) per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["train_top1"] for r in history], label="train top-1")
    ax_acc.plot(epochs, [r["val_top1"] for r in history], label="val top-1")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

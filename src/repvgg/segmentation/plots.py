"""PNG figures of a segmentation run: predictions next to inputs and ground truth, and training curves.

Label maps are drawn with one fixed palette, so the same class has the same colour in every
figure of every run; ignored pixels (255) are a neutral light grey.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from repvgg.plots import plot_curves, pyplot, save_figure
from repvgg.segmentation.pspnet import IGNORE_INDEX
from repvgg.segmentation.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IGNORE_COLOUR", "class_colours", "colorize", "denormalize", "plot_predictions",
           "plot_segmentation_curves"]

#: Colour of ignored pixels.
IGNORE_COLOUR = (200, 200, 200)
# Black background, then the generated shapes' hues (red, green, blue, orange), then other distinct colours.
_BASE_COLOURS = [
    (0, 0, 0), (220, 40, 40), (40, 170, 60), (50, 90, 220), (240, 170, 20), (150, 60, 190),
    (0, 170, 170), (240, 110, 180), (120, 80, 30), (130, 200, 0), (0, 60, 110), (250, 240, 80),
]


def class_colours(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 RGB: a fixed table, then hues spaced by the golden ratio."""
    colours = list(_BASE_COLOURS[:num_classes])
    for k in range(len(colours), num_classes):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.65 + 0.35 * (k % 2), 0.6 + 0.4 * ((k // 2) % 2))
        colours.append((round(255 * r), round(255 * g), round(255 * b)))
    return np.array(colours, dtype=np.uint8).reshape(num_classes, 3)


def colorize(label: Tensor | np.ndarray, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Class ids ``(H, W)`` to an RGB uint8 image ``(H, W, 3)``; ``ignore_index`` becomes `IGNORE_COLOUR`."""
    ids = label.cpu().numpy() if isinstance(label, Tensor) else np.asarray(label)
    ids = ids.astype(np.int64)
    palette = class_colours(num_classes)
    out = np.empty((*ids.shape, 3), dtype=np.uint8)
    ignored = ids == ignore_index
    valid = ~ignored & (ids >= 0) & (ids < num_classes)
    out[:] = IGNORE_COLOUR
    out[valid] = palette[ids[valid]]
    return out


def denormalize(image: Tensor) -> np.ndarray:
    """A normalised ``(3, H, W)`` tensor back to an RGB uint8 image ``(H, W, 3)``."""
    mean = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def plot_predictions(
    samples: Sequence[tuple[Tensor, Tensor, Tensor]],
    path: str | os.PathLike[str],
    class_names: Sequence[str],
    *,
    title: str = "",
    ignore_index: int = IGNORE_INDEX,
) -> Path:
    """One row per ``(image, label, prediction)``: input | ground truth | prediction, with a class legend.

    ``image`` is normalised ``(3, H, W)``; ``label`` and ``prediction`` are class ids ``(H, W)``.
    """
    from matplotlib.patches import Patch

    plt = pyplot()
    num_classes = len(class_names)
    rows = len(samples)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows + 0.6), squeeze=False)
    for row, (image, label, pred) in enumerate(samples):
        panels = [denormalize(image), colorize(label, num_classes, ignore_index=ignore_index),
                  colorize(pred, num_classes, ignore_index=ignore_index)]
        for col, (ax, panel) in enumerate(zip(axes[row], panels)):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(["input", "ground truth", "prediction"][col])
    palette = class_colours(num_classes) / 255.0
    handles = [Patch(color=tuple(palette[i]), label=name) for i, name in enumerate(class_names)]
    red, green, blue = IGNORE_COLOUR
    handles.append(Patch(color=(red / 255.0, green / 255.0, blue / 255.0), label="ignore"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    height = 2.5 * rows + 0.6  # inches: fixed margins (the legend's strip below, the titles above) are cheaper
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.7 / height, top=1 - (0.65 if title else 0.35) / height,
                        hspace=0.12, wspace=0.05)
    return save_figure(fig, path, dpi=80)


def plot_segmentation_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """Loss (train/val) and validation mIoU / pixel accuracy per epoch, side by side."""
    return plot_curves(history, path, losses={"train (main + aux)": "train_loss", "val (main)": "val_loss"},
                       scores={"val mIoU": "val_miou", "val pixel accuracy": "val_pixel_accuracy"},
                       loss_label="cross-entropy per pixel", score_label="%", title=title)

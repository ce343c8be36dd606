"""Figures of a detection run: ``predictions.png`` (validation images with the detector's boxes, class names and
scores, drawn by ``torchvision.utils.draw_bounding_boxes``) and ``curves.png`` (losses and AP per epoch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes, make_grid

from repvgg.plots import plot_curves, pyplot, save_figure

__all__ = ["draw_detections", "plot_detection_curves", "plot_detections"]

#: Boxes scoring below this are not drawn.
DRAW_THRESHOLD = 0.3


def draw_detections(image: Tensor, detections: dict[str, Tensor], classes: Sequence[str], *,
                    threshold: float = DRAW_THRESHOLD) -> Tensor:
    """``image`` (uint8 ``(3, H, W)``) with the boxes scoring at least ``threshold`` drawn and labelled
    ``"name score"``."""
    keep = detections["scores"] >= threshold
    boxes, scores, labels = detections["boxes"][keep], detections["scores"][keep], detections["labels"][keep]
    if not len(boxes):
        return image
    names = [f"{classes[int(c)]} {float(s):.2f}" for c, s in zip(labels, scores)]
    width = max(1, round(max(image.shape[-2:]) / 200))
    return draw_bounding_boxes(image, boxes, labels=names, colors="yellow", width=width)


@torch.no_grad()
def plot_detections(dataset: Any, model: nn.Module, indices: Iterable[int], path: str | os.PathLike[str],
                    classes: Sequence[str], *, title: str = "") -> Path:
    """Draw ``model``'s detections on the (letterboxed) validation images ``indices`` of a
    [`DetectionSet`][repvgg.detection.data.DetectionSet], four to a row."""
    model.eval()
    drawn = []
    for index in indices:
        image = dataset[index][0]
        found = model([image.float() / 255])[0]
        drawn.append(draw_detections(image, {k: v.cpu() for k, v in found.items()}, classes))
    grid = make_grid(drawn, nrow=4, padding=2, pad_value=255)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2.5 * min(4, len(drawn)), 2.5 * ((len(drawn) + 3) // 4) + 0.4))
    ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.axis("off")
    if title:
        ax.set_title(title)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92 if title else 0.99)
    return save_figure(fig, path)


def plot_detection_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """Training loss and validation AP / AP50 per epoch."""
    return plot_curves(history, path, losses={"train": "train_loss"},
                       scores={"val AP": "val_ap", "val AP50": "val_ap50"}, loss_label="loss",
                       score_label="COCO AP", title=title)

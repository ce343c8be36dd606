"""Detection data: a checked COCO set (a folder's, or the generated scenes') as fixed-size training samples.

Each sample is letterboxed: the image is resized so that its longer side is the detector's ``image_size`` and padded
on the right and bottom to a square with the ImageNet mean colour (zero once normalised, as torchvision pads its
batches). Its boxes are padded to ``max_objects`` rows (label -1 marks padding), so a batch is a tuple of tensors
that the training engine can stack and cut into micro-batches. Augmentation (training only) runs on uint8 through
``torchvision.transforms.v2``, which moves the ``BoundingBoxes`` with the pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from repvgg.dense.scenes import SyntheticConfig, scene
from repvgg.detection.coco import ANNOTATION_FILES, CocoSet, coco_from_scenes, read_coco
from repvgg.io.card import IMAGENET_MEAN
from repvgg.training.images import load_rgb

__all__ = ["DetectionDataBundle", "DetectionSet", "build_detection_data", "letterbox", "train_transform"]

#: Letterbox padding: the ImageNet mean as uint8, which normalises to zero.
PAD_COLOUR = [round(255 * m) for m in IMAGENET_MEAN]

Reader = Callable[[int], Tensor]


def letterbox(image: Tensor, boxes: Tensor, size: int) -> tuple[Tensor, Tensor, float]:
    """``image`` (uint8 ``(3, H, W)``) resized so its longer side is ``size`` and padded to ``size x size`` on the
    right and bottom; ``boxes`` (``x1, y1, x2, y2``) scaled with it; and the scale."""
    height, width = image.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = F.resize(image, [new_h, new_w], antialias=True)
    if (new_h, new_w) != (size, size):
        image = F.pad(image, [0, 0, size - new_w, size - new_h], fill=PAD_COLOUR)
    return image, boxes * scale, scale


def train_transform() -> v2.Transform:
    """The training augmentation: horizontal flips, scale and shift, colour jitter; boxes that leave the image or
    shrink below a pixel are dropped."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=0.0, translate=(0.1, 0.1), scale=(0.75, 1.25), fill={tv_tensors.Image: PAD_COLOUR}),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        v2.SanitizeBoundingBoxes(),
    ])


class DetectionSet(Dataset):
    """The images of a [`CocoSet`][repvgg.detection.coco.CocoSet] as ``(image, boxes, labels, index, scale)``.

    ``image`` is uint8 ``(3, S, S)`` letterboxed to ``image_size``; ``boxes`` float32 ``(max_objects, 4)`` in its
    pixels and ``labels`` int64 ``(max_objects,)``, padded with -1; ``index`` is the image's position in the set and
    ``scale`` the letterbox scale (original pixels = letterboxed / scale).
    """

    def __init__(self, coco: CocoSet, read: Reader, *, image_size: int, max_objects: int,
                 transform: v2.Transform | None = None) -> None:
        most = max((len(b) for b in coco.boxes), default=0)
        if most > max_objects:
            worst = max(range(len(coco.boxes)), key=lambda i: len(coco.boxes[i]))
            raise ValueError(f"{coco.source}: image {coco.images[worst]['id']} ({coco.images[worst]['file_name']}) "
                             f"has {most} objects, more than --max-objects {max_objects}; raise it")
        self.coco, self.read, self.image_size, self.max_objects = coco, read, image_size, max_objects
        self.transform = transform

    def __len__(self) -> int:
        return len(self.coco.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        image = self.read(index)
        boxes, labels = torch.from_numpy(self.coco.boxes[index]), torch.from_numpy(self.coco.labels[index])
        if self.transform is not None:
            sample = self.transform({
                "image": tv_tensors.Image(image), "labels": labels,
                "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:])),
            })
            image, boxes, labels = sample["image"].as_subclass(Tensor), sample["boxes"].as_subclass(Tensor), \
                sample["labels"]
        image, boxes, scale = letterbox(image, boxes, self.image_size)
        padded_boxes = torch.zeros(self.max_objects, 4)
        padded_labels = torch.full((self.max_objects,), -1, dtype=torch.int64)
        padded_boxes[: len(boxes)], padded_labels[: len(labels)] = boxes, labels
        return image, padded_boxes, padded_labels, torch.tensor(index), torch.tensor(scale)


def _scene_reader(config: SyntheticConfig, split: str) -> Reader:
    def read(index: int) -> Tensor:
        return torch.from_numpy(np.rint(scene(config, split, index).image * 255).astype(np.uint8)).permute(2, 0, 1)

    return read


def _folder_reader(root: Path, coco: CocoSet) -> Reader:
    """Read the set's images from ``root`` (each ``file_name`` there or under ``images/``), every file checked to be
    there first, and each image's size against the annotations when it is read."""
    paths = []
    for record in coco.images:
        candidates = [root / record["file_name"], root / "images" / record["file_name"]]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{coco.source}: image {record['id']} is {record['file_name']!r}, which is "
                                    f"neither in {root} nor in {root / 'images'}")
        paths.append(found)

    def read(index: int) -> Tensor:
        record = coco.images[index]
        image = F.pil_to_tensor(load_rgb(paths[index]))
        if tuple(image.shape[-2:]) != (record["height"], record["width"]):
            raise ValueError(f"{paths[index]} is {image.shape[-1]}x{image.shape[-2]} pixels, but {coco.source} says "
                             f"{record['width']}x{record['height']} (image {record['id']}); its boxes would be "
                             "misplaced")
        return image

    return read


@dataclass
class DetectionDataBundle:
    """Training and validation sets with what describes them."""

    name: str
    train: DetectionSet
    val: DetectionSet
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_detection_data(data: str | os.PathLike[str] | None, *, image_size: int, max_objects: int | None = None,
                         synthetic: SyntheticConfig | None = None, augment: bool = True) -> DetectionDataBundle:
    """A COCO folder's splits (``data``), or the generated scenes (``data=None``), checked and ready to train;
    ``max_objects=None`` pads each image's boxes to the most any image holds."""
    if data is None:
        config = synthetic or SyntheticConfig()
        sets = {split: (coco_from_scenes(config, split), _scene_reader(config, split)) for split in ("train", "val")}
        name = "generated scenes"
    else:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"no data folder {root}")
        sets = {}
        for split, relative in ANNOTATION_FILES.items():
            coco = read_coco(root / relative)
            sets[split] = (coco, _folder_reader(root, coco))
        name = root.name
    (train, read_train), (val, read_val) = sets["train"], sets["val"]
    if val.classes != train.classes or val.category_ids != train.category_ids:
        raise ValueError(f"{train.source} and {val.source} list different categories: {train.classes} and "
                         f"{val.classes}")
    if not any(len(b) for b in val.boxes):
        raise ValueError(f"{val.source} holds no (non-crowd) box: there is nothing to score detections against")
    most = max(len(b) for b in (*train.boxes, *val.boxes))
    options: dict[str, Any] = dict(image_size=image_size, max_objects=most if max_objects is None else max_objects)
    return DetectionDataBundle(
        name, DetectionSet(train, read_train, transform=train_transform() if augment else None, **options),
        DetectionSet(val, read_val, **options), list(train.classes))

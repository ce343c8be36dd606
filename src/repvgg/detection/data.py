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
from pathlib import Path, PurePosixPath, PureWindowsPath
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
from repvgg.limits import brief
from repvgg.training.images import load_rgb, whole_image_size
from repvgg.training.progress import preparing

__all__ = ["DetectionDataBundle", "DetectionSet", "build_detection_data", "build_validation_set", "letterbox",
           "train_transform"]

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
    """Read the set's images from ``root`` (each ``file_name`` there or under ``images/``), every file checked first
    to be there, whole and of the size the annotations say
    ([`whole_image_size`][repvgg.training.images.whole_image_size]), and its size checked again when it is read (a
    file may change during a run)."""
    paths = [_image_file(root, record, coco.source) for record in coco.images]
    for path, record in preparing(zip(paths, coco.images), len(paths), f"checking the images of {coco.source}"):
        _check_size(path, whole_image_size(path), record, coco.source)

    def read(index: int) -> Tensor:
        image = F.pil_to_tensor(load_rgb(paths[index]))
        _check_size(paths[index], (image.shape[-1], image.shape[-2]), coco.images[index], coco.source)
        return image

    return read


def _check_size(path: Path, size: tuple[int, int], record: dict[str, Any], source: str) -> None:
    if size != (record["width"], record["height"]):
        raise ValueError(f"{path} is {size[0]}x{size[1]} pixels, but {source} says {record['width']}x"
                         f"{record['height']} (image {record['id']}); its boxes would be misplaced: fix the record")


def _image_file(root: Path, record: dict[str, Any], source: str) -> Path:
    """The file of an image record: its ``file_name`` in ``root`` or in ``root/images``, and only there. An absolute
    name, a ``..`` or a link that leads out of both folders is refused before the file is opened, so an annotation
    file can neither train on a file elsewhere nor tell whether one exists."""
    name = record["file_name"]
    where = f"{source}: image {record['id']} ({brief(name, 120)})"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor or ".." in parts:
        raise ValueError(f"{where}: a file_name is relative to the data folder {root} (or its images/), without "
                         "'..' or a leading '/'; give the image's path inside the folder")
    for base in (root, root / "images"):
        candidate = base / name
        if not os.path.lexists(candidate):
            continue
        resolved = Path(os.path.realpath(candidate))  # judged before it is opened: whether it exists tells nothing
        if not any(resolved.is_relative_to(os.path.realpath(b)) for b in (root, root / "images")):
            raise ValueError(f"{where}: {candidate} leads to {resolved} (through a link), outside the data folder "
                             f"{root}; copy the image into the folder")
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{where}: no such file in {root} or in {root / 'images'}")


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
    name, (train, val), (read_train, read_val) = _read_splits(data, ("train", "val"), synthetic)
    most = max(len(b) for b in (*train.boxes, *val.boxes))
    options: dict[str, Any] = dict(image_size=image_size, max_objects=most if max_objects is None else max_objects)
    return DetectionDataBundle(
        name, DetectionSet(train, read_train, transform=train_transform() if augment else None, **options),
        DetectionSet(val, read_val, **options), list(train.classes))


def build_validation_set(data: str | os.PathLike[str] | None, *, image_size: int,
                         synthetic: SyntheticConfig | None = None) -> tuple[str, DetectionSet]:
    """The name of the data and its validation split alone, checked and ready to score (``data`` as
    [`build_detection_data`][repvgg.detection.data.build_detection_data] takes it): scoring needs neither the
    training annotations nor the training images."""
    name, (val,), (read_val,) = _read_splits(data, ("val",), synthetic)
    return name, DetectionSet(val, read_val, image_size=image_size, max_objects=max(len(b) for b in val.boxes))


def _read_splits(data: str | os.PathLike[str] | None, splits: tuple[str, ...],
                 synthetic: SyntheticConfig | None) -> tuple[str, list[CocoSet], list[Reader]]:
    """The data's name, and each split's checked annotations and image reader. Every annotation file is checked (the
    splits list the same categories, the last one has a box to score against) before any image is opened."""
    if data is None:
        config = synthetic or SyntheticConfig()
        sets = [coco_from_scenes(config, split) for split in splits]
    else:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"no data folder {root}")
        sets = [read_coco(root / ANNOTATION_FILES[split]) for split in splits]
    first, scored = sets[0], sets[-1]
    for other in sets[1:]:
        if other.classes != first.classes or other.category_ids != first.category_ids:
            raise ValueError(f"{first.source} and {other.source} list different categories: {first.classes} and "
                             f"{other.classes}")
    if not any(len(b) for b in scored.boxes):
        raise ValueError(f"{scored.source} holds no (non-crowd) box: there is nothing to score detections against")
    if data is None:
        return "generated scenes", sets, [_scene_reader(config, split) for split in splits]
    return root.name, sets, [_folder_reader(root, coco) for coco in sets]

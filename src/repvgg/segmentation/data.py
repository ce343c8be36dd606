"""Segmentation data: a folder of images and label PNGs, and one factory for it and the synthetic default.

Folder layout (Cityscapes/VOC style, stems must match)::

    ROOT/
      images/train/<name>.jpg|.jpeg|.png
      images/val/<name>.jpg|.jpeg|.png
      labels/train/<name>.png      one channel (mode L, P or I), class ids 0..C-1, 255 = ignore
      labels/val/<name>.png
      classes.txt                  optional: one class name per line (gives the number of classes)

Palette PNGs (VOC's ``SegmentationClass``) hold class ids as palette indices and load as they are;
colour-coded RGB labels must be converted to ids first. For Cityscapes use the ``*_labelTrainIds``
files (19 classes, 255 = ignore), linked or renamed to the image stems.

Training images get the usual joint augmentation (random scale, crop with ignore padding, flip);
validation images are used as they are, or resized to ``val_size``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from repvgg.io import card
from repvgg.segmentation.pspnet import IGNORE_INDEX
from repvgg.training.images import load_rgb, open_image
from repvgg.segmentation.synthetic import SyntheticConfig, SyntheticShapes
from repvgg.segmentation.transforms import JointTransform, apply_joint, eval_transform, train_transform

__all__ = [
    "EXPECTED_LAYOUT",
    "IMAGE_SUFFIXES",
    "SegmentationDataBundle",
    "SegmentationFolder",
    "build_segmentation_data",
    "find_pairs",
    "load_label",
    "read_class_names",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_MODES = ("L", "P", "I", "I;16")
EXPECTED_LAYOUT = (
    "expected ROOT/images/{train,val}/<name>.jpg|.jpeg|.png and ROOT/labels/{train,val}/<name>.png "
    "(single-channel class-id PNGs with the same stem as their image, 255 = ignore), "
    "optionally ROOT/classes.txt with one class name per line"
)


def read_class_names(root: str | os.PathLike[str]) -> list[str] | None:
    """Class names from ``ROOT/classes.txt``, line N naming class N (read as ``--classes FILE`` is: distinct,
    non-empty names; blank lines at the end ignored), or None without the file."""
    path = Path(root) / "classes.txt"
    return card.read_class_names(path) if path.is_file() else None


def find_pairs(root: str | os.PathLike[str], split: str) -> list[tuple[Path, Path]]:
    """``(image, label)`` paths of one split, sorted by stem, after checking the layout.

    Raises:
        FileNotFoundError: ``root`` or its ``images/<split>`` / ``labels/<split>`` folders are missing.
        ValueError: no images, images without labels, two images with one stem, or labels without images.
    """
    root = Path(root)
    if not root.is_dir():
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"segmentation data folder {str(root)!r} {problem}; {EXPECTED_LAYOUT}")
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing; {EXPECTED_LAYOUT}")
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in images:
                raise ValueError(
                    f"two images share the stem {path.stem!r} in {image_dir}: {images[path.stem].name}, {path.name}; "
                    "keep one of them"
                )
            images[path.stem] = path
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}; {EXPECTED_LAYOUT}")
    labels = {p.stem: p for p in label_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    missing = sorted(set(images) - set(labels))
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) in {image_dir} have no label PNG with the same stem in {label_dir}, "
            f"e.g. {missing[:5]}; {EXPECTED_LAYOUT}"
        )
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise ValueError(
            f"{len(orphans)} label(s) in {label_dir} have no image with the same stem in {image_dir}, "
            f"e.g. {orphans[:5]}; remove them or add the images"
        )
    return [(images[stem], labels[stem]) for stem in sorted(images)]


def load_label(
    path: str | os.PathLike[str],
    num_classes: int,
    *,
    expected_size: tuple[int, int] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Read a class-id label PNG as an array ``(H, W)`` and check it: uint8 for 8-bit files (modes L and P),
    int64 for 16/32-bit ones.

    Args:
        path: the label file.
        num_classes: ids must lie in ``0..num_classes-1`` or equal ``ignore_index``.
        expected_size: ``(width, height)`` of the image it belongs to.

    Raises:
        ValueError: not a single-channel PNG, wrong size, or out-of-range ids; the message names the file.
    """
    with open_image(path, what="label") as img:
        if img.mode not in LABEL_MODES:
            raise ValueError(
                f"label {os.fspath(path)!r} has PIL mode {img.mode!r}; labels must be single-channel class ids "
                f"(mode {', '.join(LABEL_MODES)}). Convert colour-coded labels to class-id PNGs first."
            )
        if expected_size is not None and img.size != tuple(expected_size):
            raise ValueError(
                f"label {os.fspath(path)!r} is {img.size[0]}x{img.size[1]} but its image is "
                f"{expected_size[0]}x{expected_size[1]} (width x height); labels must have their image's size"
            )
        label = np.array(img)
    if label.dtype != np.uint8:
        label = label.astype(np.int64)
    # Two reductions decide (a pass over the pixels each); the offending ids are only looked up for the message.
    if label.max() >= num_classes or label.min() < 0:
        outside = ((label < 0) | (label >= num_classes)) & (label != ignore_index)
        if outside.any():
            bad = np.unique(label[outside])
            raise ValueError(
                f"label {os.fspath(path)!r} holds class id(s) {bad[:10].tolist()} outside 0..{num_classes - 1} "
                f"(and not the ignore index {ignore_index}); fix the file or pass the right number of classes"
            )
    return label


class SegmentationFolder(Dataset):
    """Images and class-id label PNGs of one split of a folder laid out as `EXPECTED_LAYOUT`.

    Items are ``(image, label)``: ``image`` a float tensor ``(3, H, W)`` normalised with the ImageNet
    mean and std, ``label`` a long tensor ``(H, W)``. Labels are checked when loaded
    (`load_label`); `verify` checks every file up front.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        num_classes: int,
        *,
        transform: JointTransform | None = None,
        classes: list[str] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names given for num_classes={num_classes}")
        self.root = Path(root)
        self.split = split
        self.num_classes = num_classes
        self.classes = classes or [str(i) for i in range(num_classes)]
        self.transform = transform
        self.ignore_index = ignore_index
        self.samples = find_pairs(self.root, split)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Tensor, np.ndarray]:
        """The image (uint8 ``(3, H, W)``) and checked label (`load_label`), untransformed."""
        image_path, label_path = self.samples[index]
        image = torch.from_numpy(np.array(load_rgb(image_path))).permute(2, 0, 1)
        height, width = image.shape[-2:]
        label = load_label(label_path, self.num_classes, expected_size=(width, height), ignore_index=self.ignore_index)
        return image, label

    def verify(self) -> None:
        """Load every label (and image header) once, so a bad file fails before training starts."""
        for image_path, label_path in self.samples:
            with open_image(image_path, load=False) as img:
                size = img.size
            load_label(label_path, self.num_classes, expected_size=size, ignore_index=self.ignore_index)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.load(index)
        return apply_joint(self.transform, image, torch.from_numpy(label))


@dataclass
class SegmentationDataBundle:
    """A train/val pair of segmentation datasets and what the model needs to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    classes: list[str]
    crop_size: int
    name: str
    ignore_index: int = IGNORE_INDEX
    uniform_val_size: bool = True  # False: validation images may differ in size (batch them one at a time)


def build_segmentation_data(
    data: str | os.PathLike[str] | None = None,
    *,
    num_classes: int | None = None,
    crop_size: int | None = None,
    scale_range: tuple[float, float] | None = None,
    val_size: int | tuple[int, int] | None = None,
    synthetic: SyntheticConfig | None = None,
    verify: bool = False,
) -> SegmentationDataBundle:
    """The datasets for a segmentation run: the synthetic shapes (``None`` or ``"synthetic"``) or a folder.

    Args:
        data: ``None``/``"synthetic"`` for `SyntheticShapes`, else
            a folder laid out as `EXPECTED_LAYOUT`.
        num_classes: folder data: the number of classes (or put a ``classes.txt`` in the folder).
        crop_size: training crop (default: the synthetic image size, 512 for folders).
        scale_range: random scaling before the crop (default (0.75, 1.5) synthetic, (0.5, 2.0) folders).
        val_size: resize validation images to this size (default: keep them as they are).
        synthetic: parameters of the generated data.
        verify: folder data: check every label file now instead of when it is first loaded.
    """
    val_transform = eval_transform(val_size)
    if data is None or str(data) == "synthetic":
        config = synthetic or SyntheticConfig()
        crop = crop_size or config.image_size
        train_tf = train_transform(crop, scale_range=scale_range or (0.75, 1.5), ignore_index=IGNORE_INDEX)
        return SegmentationDataBundle(
            train=SyntheticShapes("train", config, transform=train_tf),
            val=SyntheticShapes("val", config, transform=val_transform),
            num_classes=config.num_classes,
            classes=list(SyntheticShapes.classes),
            crop_size=crop,
            name="synthetic-shapes",
        )
    root = Path(data)
    names = read_class_names(root) if root.is_dir() else None
    if num_classes is None:
        if names is None:
            raise ValueError(
                f"the number of classes of {str(root)!r} is unknown: pass num_classes or write "
                f"{root / 'classes.txt'} with one class name per line"
            )
        num_classes = len(names)
    elif names is not None and len(names) != num_classes:
        raise ValueError(f"{root / 'classes.txt'} lists {len(names)} classes but num_classes={num_classes}")
    crop = crop_size or 512
    train_tf = train_transform(crop, scale_range=scale_range or (0.5, 2.0), ignore_index=IGNORE_INDEX)
    train = SegmentationFolder(root, "train", num_classes, transform=train_tf, classes=names)
    val = SegmentationFolder(root, "val", num_classes, transform=val_transform, classes=names)
    if verify:
        train.verify()
        val.verify()
    logger.info("segmentation data %s: %d train, %d val images, %d classes", root, len(train), len(val), num_classes)
    return SegmentationDataBundle(
        train=train, val=val, num_classes=num_classes, classes=train.classes, crop_size=crop, name=root.name,
        uniform_val_size=val_size is not None,
    )

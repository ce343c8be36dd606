"""Datasets for training and evaluation: the embedded digits default and ImageNet-style folders.

* Digits (`digits`): the handwritten-digit images shipped with scikit-learn.
* Folders: ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>`` (the ImageNet layout), scanned
  once, with timm's transforms resolved from the model (``create_transform``): RandomResizedCrop + flip
  (optionally AutoAugment/RandAugment, colour jitter and random erasing) for training; resize to size / crop ratio and
  centre crop for validation, the model's interpolation and mean/std.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from repvgg.io.card import (IMAGENET_MEAN, IMAGENET_STD, ModelCard, Preprocessing, check_class_names,
                            resized_size)
from repvgg.limits import check_image_pixels, check_img_size
from repvgg.training.digits import DigitsDataset, digits_preprocessing, digits_split
from repvgg.training.distributed import dataset_size
from repvgg.training.images import IMAGE_EXTENSIONS, image_files, load_rgb, pil_chw

__all__ = [
    "DatasetBundle",
    "eval_transform",
    "build_datasets",
    "check_image_folder",
    "EvalTransform",
    "ToNormalizedTensor",
    "scan_class_folders",
    "scan_image_folder",
    "CheckedImageFolder",
    "check_auto_augment",
    "collate_readable",
    "Relabelled",
]

logger = logging.getLogger(__name__)

_EXPECTED_LAYOUT = (
    "expected ROOT/train/<class_name>/<image files> and ROOT/val/<class_name>/<image files> "
    "(the ImageNet layout), with the same class folders in train/ and val/"
)


@dataclass
class DatasetBundle:
    """A train/val pair and what the model needs to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    img_size: int
    name: str
    classes: list[str]
    preprocessing: Preprocessing

    @property
    def card(self) -> ModelCard:
        """The class names and evaluation preprocessing a model trained on this data carries into its files."""
        return ModelCard(tuple(self.classes), self.preprocessing)


def _digits_bundle(img_size: int, val_fraction: float, *, augment: bool = True,
                   test_size: int | None = None) -> DatasetBundle:
    x_train, y_train, x_val, y_val = digits_split(val_fraction)
    test_size = test_size or img_size
    return DatasetBundle(
        train=DigitsDataset(x_train, y_train, img_size, train=augment),
        val=DigitsDataset(x_val, y_val, test_size, train=False),
        num_classes=10,
        img_size=img_size,
        name="sklearn-digits",
        classes=[str(i) for i in range(10)],
        preprocessing=digits_preprocessing(test_size),
    )


def scan_class_folders(split_root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and ``(image path, class index)`` samples of one split, in one pass over the tree.

    Class folders are the sub-folders of ``split_root`` (sorted, as ``torchvision.datasets.ImageFolder``
    orders them); images are files with an image extension anywhere below them. Directory links are
    followed once: a folder reached again through a link (a loop such as ``a/loop -> .``, or two links
    to one folder) is not scanned again, so no image is counted twice.
    """
    split_root = Path(split_root)
    classes = sorted(entry.name for entry in os.scandir(split_root) if entry.is_dir())
    seen: set[str] = set()
    samples = [(path, index) for index, name in enumerate(classes) for path in image_files(split_root / name, seen)]
    return classes, samples


def check_image_folder(root: str | Path) -> tuple[list[str], dict[str, int]]:
    """Validate an ImageNet-style tree; returns the class names and image counts per split.

    Raises:
        FileNotFoundError: the root does not exist.
        ValueError: missing ``train``/``val``, no class folders, classes that differ between the
            splits, or a split without images; the message states the expected layout.
    """
    classes, samples = scan_image_folder(root)
    return classes, {split: len(split_samples) for split, split_samples in samples.items()}


def scan_image_folder(root: str | Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Validate an ImageNet-style tree in one pass; the class names and each split's samples.

    Raises:
        FileNotFoundError: the root does not exist.
        ValueError: missing ``train``/``val``, no class folders, classes that differ between the
            splits, or a split without images; the message states the expected layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root} ({_EXPECTED_LAYOUT})")
    classes_by_split: dict[str, list[str]] = {}
    samples: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise ValueError(f"{root} has no '{split}' folder; {_EXPECTED_LAYOUT}")
        classes, samples[split] = scan_class_folders(folder)
        if not classes:
            raise ValueError(f"{folder} has no class sub-folders; {_EXPECTED_LAYOUT}")
        classes_by_split[split] = classes
        if not samples[split]:
            raise ValueError(f"{folder} contains no images ({', '.join(IMAGE_EXTENSIONS)}); {_EXPECTED_LAYOUT}")
        found = {index for _, index in samples[split]}
        empty = [f"{split}/{name}" for index, name in enumerate(classes) if index not in found]
        if empty:  # it would become a class the model is trained (or scored) on without a single example
            raise ValueError(f"class folder(s) without images in {root}: {', '.join(empty[:10])}"
                             f"{' ...' if len(empty) > 10 else ''}; add images to them or remove them (from both "
                             "train/ and val/)")
    if classes_by_split["train"] != classes_by_split["val"]:
        only_train = sorted(set(classes_by_split["train"]) - set(classes_by_split["val"]))
        only_val = sorted(set(classes_by_split["val"]) - set(classes_by_split["train"]))
        raise ValueError(
            f"class folders differ between train/ and val/ in {root}: only in train {only_train[:5]}, "
            f"only in val {only_val[:5]}; {_EXPECTED_LAYOUT}"
        )
    # the folder names become the model's class names: refused now, not when the trained file is read
    check_class_names(classes_by_split["train"], f"the class folders of {root / 'train'}")
    return classes_by_split["train"], samples


class CheckedImageFolder(Dataset):
    """Labelled images (from `scan_image_folder`) whose unreadable files are reported by name.

    ``bad_images="fail"`` raises a ``ValueError`` naming the file; ``"skip"`` logs a warning naming it, counts it
    (`take_skipped`, shared across loader workers) and gives ``None`` in its place, which
    `collate_readable` leaves out of the batch: a skipped image is neither trained on nor scored.
    """

    def __init__(self, root: str | Path, samples: list[tuple[str, int]], classes: list[str],
                 transform: Callable[[Any], Tensor], bad_images: str = "fail") -> None:
        self.root = Path(root)
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.bad_images = bad_images
        self._skipped = multiprocessing.Value("i", 0)

    def take_skipped(self) -> int:
        """The images skipped since the last call (over every loader worker), and start counting anew."""
        with self._skipped.get_lock():
            count, self._skipped.value = int(self._skipped.value), 0
        return count

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path, target = self.samples[index]
        try:
            return self.transform(load_rgb(path)), target
        except ValueError as err:  # unreadable, or too large to decode or resize
            if self.bad_images == "fail":
                raise ValueError(f"{err}. Remove or replace the file (train can skip unreadable images with "
                                 "--bad-images skip)") from err
            with self._skipped.get_lock():
                self._skipped.value += 1
            logger.warning("skipping unreadable image %s (%s)", path, err)
            return None


class Relabelled(Dataset):
    """``dataset`` with each label ``y`` replaced by ``label_map[y]`` (data classes matched to a model's by name)."""

    def __init__(self, dataset: Dataset, label_map: list[int]) -> None:
        self.dataset, self.label_map = dataset, label_map

    def __len__(self) -> int:
        return dataset_size(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        return None if item is None else (item[0], self.label_map[item[1]])


def collate_readable(items: list[Any]) -> Any:
    """A batch of the samples that were read (``None`` marks a skipped image; see `CheckedImageFolder`).

    Raises:
        ValueError: every image of the batch was skipped.
    """
    from torch.utils.data import default_collate

    readable = [item for item in items if item is not None]
    if not readable:
        raise ValueError(f"all {len(items)} images of a batch were unreadable and skipped; check the data folder "
                         "(the warnings above name the files)")
    return default_collate(readable)


#: The evaluation preprocessing of the official release (and timm's RepVGG weights): bilinear resize of
#: the short side to size / 0.875, centre crop, ImageNet mean and std. A model's ``pretrained_cfg`` says so too.
DEFAULT_DATA_CONFIG: dict[str, Any] = dict(interpolation="bilinear", crop_pct=0.875, crop_mode="center",
                                           mean=IMAGENET_MEAN, std=IMAGENET_STD)


class ToNormalizedTensor:
    """An RGB PIL image or uint8 tensor ``(3, H, W)`` to a contiguous float32 tensor normalised with ``mean``
    and ``std``, in one pass.

    The fused form of timm's ``MaybeToTensor`` + ``Normalize`` (the same values up to float rounding,
    about a quarter less time per image); `folder_transforms` puts it in their place, the evaluation transform and
    the segmentation pipeline end with it.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        std_t = torch.tensor(self.std, dtype=torch.float64)
        self._scale = (1 / (255 * std_t)).float().reshape(-1, 1, 1)
        self._offset = (torch.tensor(self.mean, dtype=torch.float64) / std_t).float().reshape(-1, 1, 1)

    def __call__(self, image: Any) -> Tensor:
        if not isinstance(image, Tensor):
            image = pil_chw(image)
        pixels = image.to(torch.float32, memory_format=torch.contiguous_format)
        return pixels.mul_(self._scale).sub_(self._offset)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def _fuse_to_tensor_normalize(transform: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """Replace timm's ``MaybeToTensor``, ``Normalize`` pair in a ``Compose`` by `ToNormalizedTensor`."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, list):
        return transform
    for i in range(len(steps) - 1):
        if type(steps[i]).__name__ in ("MaybeToTensor", "ToTensor") and type(steps[i + 1]).__name__ == "Normalize":
            steps[i: i + 2] = [ToNormalizedTensor(mean, std)]
            break
    return transform


#: PIL's resampling filter for each of the card's interpolations (``PIL.Image.Resampling``), as torchvision maps them.
_PIL_RESAMPLING = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def eval_transform(preprocessing: Preprocessing) -> Callable[[Any], Tensor]:
    """An RGB PIL image to the model's input as ``preprocessing`` says (timm's evaluation transform: short side
    resized, centre crop, normalised; a ``grayscale`` model's image made grey first): what ``eval``, ``predict`` and
    ``serve`` give the model, and a folder run's validation."""
    return EvalTransform(preprocessing)


class EvalTransform:
    """timm's evaluation transform in its centre-crop mode (``create_transform(is_training=False,
    crop_mode="center")``) on a PIL image, computed as torchvision computes it for one: the short side resized to
    ``preprocessing.resize`` (the long side ``int(resize * long / short)``, no resize when the size is already that),
    the centre ``img_size`` square cropped (its corner rounded as Python rounds), then `ToNormalizedTensor`. The same
    pixels and values as timm's (a test compares them), without importing torchvision: its import costs about 2 s
    of CPU (it imports ``torch._dynamo``), on every ``predict`` and ``serve`` start and in every actor of
    ``predict --ray``.

    An image whose resize would make more pixels than [`MAX_IMAGE_PIXELS`][repvgg.limits.MAX_IMAGE_PIXELS] (a very
    elongated one) is refused first."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing
        self.normalize = ToNormalizedTensor(preprocessing.mean, preprocessing.std)

    def __call__(self, image: Any) -> Tensor:
        p = self.preprocessing
        width, height = image.size
        check_image_pixels(*resized_size(width, height, p.resize),
                           f"a {width} x {height} image resized to a short side of {p.resize}")
        if p.grayscale:
            image = image.convert("L").convert("RGB")
        short, long = min(width, height), max(width, height)
        new_long = int(p.resize * long / short)  # torchvision's rule, in floating point
        size = (p.resize, new_long) if width <= height else (new_long, p.resize)
        if size != (width, height):
            image = image.resize(size, _PIL_RESAMPLING[p.interpolation])
        left, top = int(round((size[0] - p.img_size) / 2.0)), int(round((size[1] - p.img_size) / 2.0))
        return self.normalize(image.crop((left, top, left + p.img_size, top + p.img_size)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.preprocessing!r})"


def check_auto_augment(policy: str | None) -> None:
    """Refuse a timm augmentation policy timm cannot build (e.g. a typo in ``"rand-m9-mstd0.5"``), before a run
    starts.

    Raises:
        ValueError: naming the policy and the forms timm takes.
    """
    if policy is None:
        return
    from timm.data import create_transform

    try:
        create_transform(input_size=(3, 32, 32), is_training=True, auto_augment=policy)
    except Exception as err:  # timm asserts, or fails to parse, on an unknown policy
        raise ValueError(f"--auto-augment {policy!r} is not a policy timm knows ({type(err).__name__}: "
                         f"{str(err)[:120] or 'unknown policy'}); use e.g. 'rand-m9-mstd0.5' (RandAugment), "
                         "'original' or 'v0' (AutoAugment) or 'augmix-m5-w4-d2' (AugMix)") from None


def folder_transforms(img_size: int, *, auto_augment: str | None = None, random_erasing: float = 0.0,
                      color_jitter: float = 0.0,
                      data_config: dict[str, Any] | None = None) -> tuple[Callable, Callable, Preprocessing]:
    """Training and validation transforms of an image folder (timm's ``create_transform``), and the validation
    preprocessing as data.

    ``data_config`` is the model's (timm's ``resolve_data_config``: interpolation, crop ratio, mean/std),
    so evaluation matches how its weights were evaluated; training adds RandomResizedCrop and flip, a timm
    ``auto_augment`` policy (``"rand-m9-mstd0.5"`` RandAugment, ``"original"`` AutoAugment) and
    ``random_erasing`` (a probability), and ``color_jitter`` when it is above 0 (timm's own default is 0.4;
    the paper trains without). The conversion to a normalised tensor is fused into one step
    (`ToNormalizedTensor`).
    """
    from timm.data import create_transform

    cfg = {**DEFAULT_DATA_CONFIG, **{k: v for k, v in (data_config or {}).items() if k in DEFAULT_DATA_CONFIG}}
    preprocessing = Preprocessing.from_data_config(cfg, img_size)
    train = create_transform(input_size=(3, img_size, img_size), interpolation=cfg["interpolation"],
                             mean=cfg["mean"], std=cfg["std"], is_training=True, auto_augment=auto_augment,
                             # timm reads None as no colour jitter, but its annotation leaves None out
                             re_prob=random_erasing, color_jitter=color_jitter or None)  # type: ignore[arg-type]
    return _fuse_to_tensor_normalize(train, cfg["mean"], cfg["std"]), eval_transform(preprocessing), preprocessing


def build_datasets(
    data: str | None,
    *,
    img_size: int | None = None,
    val_fraction: float = 0.2,
    auto_augment: str | None = None,
    bad_images: str = "fail",
    augment: bool = True,
    random_erasing: float = 0.0,
    color_jitter: float = 0.0,
    data_config: dict[str, Any] | None = None,
    preprocessing: Preprocessing | None = None,
    test_size: int | None = None,
) -> DatasetBundle:
    """Datasets for ``data`` (an ImageFolder root) or, when ``data`` is ``None``, the embedded digits.

    ``augment=False`` gives the training split the validation preprocessing (e.g. for calibration).
    ``preprocessing`` (what a model's file records) sets the default ``img_size`` and, for a folder, the
    evaluation's resize, crop, mean and std. ``test_size`` evaluates at another resolution than ``img_size``
    trains at (RepVGGplus: 256 and 320); the validation split and ``preprocessing`` of the bundle are at it.
    """
    if test_size is not None:
        check_img_size(test_size, "test_size")
    if preprocessing is not None:
        img_size = preprocessing.img_size if img_size is None else img_size
        data_config = preprocessing.to_dict() if data_config is None else data_config
    if img_size is not None:
        check_img_size(img_size, "img_size")
    check_auto_augment(auto_augment)
    if data is None:
        ignored = [flag for flag, value in (("--auto-augment", auto_augment), ("--random-erasing", random_erasing),
                                            ("--color-jitter", color_jitter)) if value]
        if ignored and augment:
            logger.warning("%s: the embedded digits keep their own augmentation (small shifts); these options "
                           "apply to image folders (--data)", ", ".join(ignored))
        return _digits_bundle(32 if img_size is None else img_size, val_fraction, augment=augment,
                              test_size=test_size)
    classes, samples = scan_image_folder(data)
    counts = {split: len(split_samples) for split, split_samples in samples.items()}
    size = 224 if img_size is None else img_size
    train_tf, val_tf, preprocessing = folder_transforms(size, auto_augment=auto_augment, color_jitter=color_jitter,
                                                        random_erasing=random_erasing, data_config=data_config)
    if test_size is not None and test_size != size:
        preprocessing = dataclasses.replace(preprocessing, img_size=test_size)
        val_tf = eval_transform(preprocessing)
    root = Path(data)
    bundle = DatasetBundle(
        train=CheckedImageFolder(root / "train", samples["train"], classes, train_tf if augment else val_tf,
                                 bad_images),
        val=CheckedImageFolder(root / "val", samples["val"], classes, val_tf, bad_images),
        num_classes=len(classes),
        img_size=size,
        name=str(root),
        classes=classes,
        preprocessing=preprocessing,
    )
    logger.info("%s: %d classes, %d train / %d val images", root, len(classes), counts["train"], counts["val"])
    return bundle

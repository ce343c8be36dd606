"""Joint image/label transforms for segmentation, on tensors.

Every transform takes and returns ``(image, label)``: ``image`` a float tensor ``(C, H, W)``
(already normalised, so zero padding is the mean colour), ``label`` a long tensor ``(H, W)`` of
class ids. Geometry is applied to both; images are resampled bilinearly, labels by nearest neighbour
(class ids must not be blended), and padding of labels uses the ignore index so padded pixels count
in neither loss nor metrics. Randomness comes from the global torch RNG, so a seeded training loop
(and DataLoader worker seeding) makes augmentation reproducible.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalize_image",
    "JointTransform",
    "Compose",
    "RandomScale",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "train_transform",
]

JointTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_image(image: Tensor) -> Tensor:
    """``(3, H, W)`` RGB in [0, 1] to mean 0 / std 1 with the ImageNet statistics (pretrained backbones)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).reshape(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).reshape(3, 1, 1)
    return (image - mean) / std


def _resize_pair(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    if tuple(image.shape[-2:]) == size:
        return image, label
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


class Compose:
    """Apply joint transforms in order."""

    def __init__(self, transforms: Sequence[JointTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        for transform in self.transforms:
            image, label = transform(image, label)
        return image, label

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomScale:
    """Resize by a factor drawn uniformly from ``scale_range`` (PSPNet uses 0.5 to 2.0)."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        self.scale_range = (float(low), float(high))

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(()).item()
        h, w = image.shape[-2:]
        return _resize_pair(image, label, (max(1, round(h * scale)), max(1, round(w * scale))))

    def __repr__(self) -> str:
        return f"RandomScale({self.scale_range})"


class RandomCrop:
    """Crop ``size`` at a random position; smaller inputs are first padded (image 0, label ignore)."""

    def __init__(self, size: int | tuple[int, int], ignore_index: int = 255) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"crop size must be a positive int or (height, width), got {size!r}")
        self.ignore_index = ignore_index

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        ch, cw = self.size
        h, w = image.shape[-2:]
        pad_h, pad_w = max(0, ch - h), max(0, cw - w)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
            h, w = h + pad_h, w + pad_w
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        return image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, ignore_index={self.ignore_index})"


class RandomHorizontalFlip:
    """Mirror image and label left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        if torch.rand(()).item() < self.p:
            return image.flip(-1), label.flip(-1)
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize to a fixed ``(height, width)`` (or a square ``size``)."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        return _resize_pair(image, label, self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


def train_transform(
    crop_size: int | tuple[int, int],
    *,
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    flip: bool = True,
    ignore_index: int = 255,
) -> Compose:
    """The usual segmentation training augmentation: random scale, crop (ignore padding), flip."""
    steps: list[JointTransform] = []
    if scale_range is not None:
        steps.append(RandomScale(scale_range))
    steps.append(RandomCrop(crop_size, ignore_index))
    if flip:
        steps.append(RandomHorizontalFlip())
    return Compose(steps)

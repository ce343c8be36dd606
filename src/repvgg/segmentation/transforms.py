"""Joint image/label transforms for segmentation, built on ``torchvision.transforms.v2``.

Datasets hand over the image as a uint8 `Image` ``(3, H, W)`` and the
class ids as a `Mask` ``(H, W)``. Geometry (random scale, pad, crop,
flip, resize) runs jointly on those uint8 tensors: v2 resamples images bilinearly and masks by nearest
neighbour (class ids must not be blended). Conversion to float and normalisation come last
(`to_model_input`), on the crop only, so the costly float work is done on the pixels the model
sees. Padding is the ImageNet mean colour for images (close to 0 after normalisation) and the ignore
index for labels, so padded pixels count in neither loss nor metrics. Randomness comes from the
global torch RNG, so a seeded training loop (and DataLoader worker seeding) makes augmentation
reproducible.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from repvgg.training.data import IMAGENET_MEAN, IMAGENET_STD, ToNormalizedTensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "JointTransform",
    "PadToSize",
    "apply_joint",
    "RandomScale",
    "eval_transform",
    "to_model_input",
    "train_transform",
]

#: A callable taking and returning ``(image, mask)``; `torchvision.transforms.v2.Compose` is one.
JointTransform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[Tensor, Tensor]]

MEAN_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)
_NORMALIZE = ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)


def _spatial_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for item in flat_inputs:
        if isinstance(item, (tv_tensors.Image, tv_tensors.Mask)):
            height, width = TF.get_size(item)
            return height, width
    raise TypeError("segmentation transforms need a tv_tensors.Image or tv_tensors.Mask among their inputs")


class RandomScale(v2.Transform):
    """Resize image and mask by one factor drawn uniformly from ``scale_range`` (PSPNet: 0.5 to 2.0)."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        self.scale_range = (float(low), float(high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(()).item()
        height, width = _spatial_size(flat_inputs)
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, params["size"], antialias=True)


class PadToSize(v2.Transform):
    """Pad bottom and right up to ``size`` (images with the mean colour, masks with ``ignore_index``)."""

    def __init__(self, size: int | tuple[int, int], ignore_index: int = 255) -> None:
        super().__init__()
        self.size = _pair(size)
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _spatial_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size[1] - width), max(0, self.size[0] - height)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]) or not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else list(MEAN_FILL)
        return TF.pad(inpt, params["padding"], fill=fill)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return pair[0], pair[1]


def train_transform(
    crop_size: int | tuple[int, int],
    *,
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    flip: bool = True,
    ignore_index: int = 255,
) -> v2.Compose:
    """The usual segmentation training augmentation on uint8: random scale, pad, crop, flip."""
    crop = _pair(crop_size)
    steps: list[v2.Transform] = []
    if scale_range is not None:
        steps.append(RandomScale(scale_range))
    steps += [PadToSize(crop, ignore_index), v2.RandomCrop(crop)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def eval_transform(size: int | tuple[int, int] | None = None) -> v2.Compose | None:
    """Validation geometry: resize to ``size`` (bilinear image, nearest mask), or nothing."""
    return None if size is None else v2.Compose([v2.Resize(_pair(size), antialias=True)])


def to_model_input(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The last step of every pipeline: the uint8 image to a contiguous float32 tensor normalised with the
    ImageNet statistics (pretrained backbones), in one pass; class ids to int64. Plain tensors out."""
    return _NORMALIZE(image.as_subclass(Tensor)), mask.as_subclass(Tensor).long()


def apply_joint(transform: JointTransform | None, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Wrap a uint8 ``(3, H, W)`` image and ``(H, W)`` mask, apply ``transform`` jointly, then
    `to_model_input`."""
    image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
    if transform is not None:
        image, mask = transform(image, mask)
    return to_model_input(image, mask)

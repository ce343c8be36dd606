"""The embedded default data: the real handwritten-digit images shipped with scikit-learn (1,797 8x8 images,
10 classes), split once with a fixed seed (stratified) and upscaled to a small RGB resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from repvgg.io.card import Preprocessing

__all__ = ["DIGITS_SPLIT_SEED", "DigitsDataset", "digits_preprocessing", "digits_split"]

DIGITS_SPLIT_SEED = 0


def digits_preprocessing(img_size: int) -> Preprocessing:
    """The digits' evaluation preprocessing as it applies to an image file: grey, the whole image resized
    (bilinear) to ``img_size``, ``(x - 0.5) / 0.5``; bright strokes on a dark ground, as in the data."""
    return Preprocessing(img_size=img_size, crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                         std=(0.5, 0.5, 0.5), grayscale=True)


def digits_split(val_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits images (float, 0..1, shape ``(N, 8, 8)``) split into train and val, stratified.

    The split seed is fixed (`DIGITS_SPLIT_SEED`), so every run sees the same validation set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    try:
        idx_train, idx_val = train_test_split(list(range(len(labels))), test_size=val_fraction,
                                              random_state=DIGITS_SPLIT_SEED, stratify=labels.numpy())
    except ValueError as err:  # a split too small to hold every digit
        raise ValueError(f"--val-fraction {val_fraction} does not split the {len(labels)} digits into two sets that "
                         f"each hold all 10 classes ({err}); choose a fraction from about 0.01 to 0.99") from None
    return images[idx_train], labels[idx_train], images[idx_val], labels[idx_val]


class DigitsDataset(Dataset):
    """Digits upscaled (bilinear) to ``img_size`` and repeated to 3 channels, normalised to mean 0 / std 1.

    Each image is upscaled when it is read, so a large ``img_size`` allocates one image at a time, not the whole
    set. Training augmentation: a random shift of up to ``img_size // 16`` pixels (zero fill), drawn from the global
    torch RNG, so it is reproducible under the training loop's seeding.
    """

    def __init__(self, images: Tensor, labels: Tensor, img_size: int, *, train: bool) -> None:
        self.small = images
        self.labels = labels
        self.img_size = img_size
        self.train = train
        self.max_shift = max(1, img_size // 16)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        size = self.img_size
        big = F.interpolate(self.small[index][None, None], size=(size, size), mode="bilinear", align_corners=False)
        image = ((big[0] - 0.5) / 0.5).expand(3, -1, -1)
        if self.train:
            pad = self.max_shift
            dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            padded = F.pad(image, (pad, pad, pad, pad), value=-1.0)
            image = padded[:, dy:dy + size, dx:dx + size]
        return image.contiguous(), int(self.labels[index])

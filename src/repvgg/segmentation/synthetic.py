"""The generated shape scenes ([`repvgg.dense.scenes`][repvgg.dense.scenes]) as a segmentation data set: images with
per-pixel labels (255 = ignore on object borders)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from repvgg.dense.scenes import IGNORE_INDEX, SHAPE_CLASSES, SPLITS, SyntheticConfig, render_scene, scene
from repvgg.segmentation.transforms import JointTransform, apply_joint

__all__ = ["IGNORE_INDEX", "SHAPE_CLASSES", "SyntheticConfig", "SyntheticShapes", "render_scene"]


class SyntheticShapes(Dataset):
    """The generated scenes of one split as ``(image, label)`` pairs.

    ``image`` is a float tensor ``(3, H, W)`` normalised with the ImageNet mean and std, ``label``
    a long tensor ``(H, W)``. Scenes are generated on access (a fraction of a millisecond each),
    stored as uint8 like a decoded file, and are identical for the same ``config``; ``transform``
    (e.g. `train_transform`) augments them jointly on uint8
    before the normalisation.
    """

    classes = SHAPE_CLASSES

    def __init__(
        self,
        split: str = "train",
        config: SyntheticConfig | None = None,
        *,
        transform: JointTransform | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        self.split = split
        self.config = config or SyntheticConfig()
        self.transform = transform
        self.num_classes = self.config.num_classes
        self.ignore_index = IGNORE_INDEX

    def __len__(self) -> int:
        return self.config.num_train if self.split == "train" else self.config.num_val

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The scene before normalisation and transforms (for inspection and plots)."""
        image, label, _, _ = scene(self.config, self.split, index)
        return image, label

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_np, label_np = self.raw(index)
        image = torch.from_numpy(np.rint(image_np * 255).astype(np.uint8)).permute(2, 0, 1)
        return apply_joint(self.transform, image, torch.from_numpy(label_np))

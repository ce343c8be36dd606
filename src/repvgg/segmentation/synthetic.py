"""An embedded segmentation data set: coloured shapes on textured backgrounds, generated from a seed.

Each scene is drawn with numpy from a generator seeded by ``(seed, split, index)``, so an image is
the same whatever order it is requested in, and train and val never share a scene. Shapes are
circles, squares, triangles and crosses (classes 1-4, class 0 is the background), of random size,
rotation and position, overlapping in random order. Their colours come from a per-class hue with
jitter, so colour is a cue but not a perfect one, and the textured background (gratings, smooth
noise) is of low saturation. Edges are anti-aliased; the one-pixel band around every shape outline
is labelled 255 (ignore), as Cityscapes and VOC leave object borders unlabelled.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from repvgg.segmentation.pspnet import IGNORE_INDEX
from repvgg.segmentation.transforms import JointTransform, apply_joint

__all__ = [
    "SHAPE_CLASSES",
    "SyntheticConfig",
    "SyntheticShapes",
    "render_scene",
]

#: Class names, index = class id.
SHAPE_CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle", "cross")
_CLASS_HUES = {1: 0.0, 2: 0.33, 3: 0.6, 4: 0.13}  # red, green, blue, orange-yellow
_SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generated data (the defaults train on 2 CPU cores in a few minutes).

    Attributes:
        image_size: height and width of every scene.
        num_train: training scenes.
        num_val: validation scenes.
        seed: base seed; scenes are a pure function of ``(seed, split, index)``.
        max_shapes: shapes per scene are drawn from 1..max_shapes.
        size_range: shape radius as a fraction of ``image_size``.
        hue_jitter: standard deviation of a shape's hue around its class hue.
        border_ignore: half-width in pixels of the ignore band around outlines (0 = none).
        noise: standard deviation of the per-pixel Gaussian noise on the [0, 1] image.
    """

    image_size: int = 64
    num_train: int = 400
    num_val: int = 100
    seed: int = 0
    max_shapes: int = 4
    size_range: tuple[float, float] = (0.1, 0.25)
    hue_jitter: float = 0.06
    border_ignore: float = 0.5
    noise: float = 0.03

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.num_train < 1 or self.num_val < 1 or self.max_shapes < 1:
            raise ValueError("num_train, num_val and max_shapes must be positive")
        low, high = self.size_range
        if not 0 < low <= high < 1:
            raise ValueError(f"size_range must satisfy 0 < low <= high < 1, got {self.size_range!r}")

    @property
    def num_classes(self) -> int:
        return len(SHAPE_CLASSES)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _box_sdf(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
    qu, qv = np.abs(u) - half_u, np.abs(v) - half_v
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return outside + np.minimum(np.maximum(qu, qv), 0)


def _shape_sdf(cls: int, x: np.ndarray, y: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Signed distance in pixels to the outline (negative inside) of a shape centred at the origin."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    if cls == 1:  # circle
        return np.hypot(x, y) - radius
    if cls == 2:  # square, circumradius ~ radius
        return _box_sdf(u, v, 0.8 * radius, 0.8 * radius)
    if cls == 3:  # equilateral triangle (circumradius 1.25 * radius): three half-planes
        normals = [angle + k * 2 * np.pi / 3 for k in range(3)]
        return np.max([np.cos(a) * x + np.sin(a) * y for a in normals], axis=0) - 1.25 * radius / 2
    if cls == 4:  # cross: union of two bars
        return np.minimum(_box_sdf(u, v, radius, 0.3 * radius), _box_sdf(u, v, 0.3 * radius, radius))
    raise AssertionError(f"no shape for class {cls}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.9))
    other = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.9))
    freq, theta, phase = rng.uniform(1.5, 8.0), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    grating = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    coarse = rng.random((5, 5)).astype(np.float32)
    idx = np.minimum((np.arange(size) * 4 / size), 3.999)
    i0, frac = idx.astype(int), (idx - idx.astype(int)).astype(np.float32)
    rows = coarse[i0] * (1 - frac)[:, None] + coarse[i0 + 1] * frac[:, None]  # bilinear upsampling
    smooth = rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]
    mix = np.clip(rng.uniform(0.2, 0.8) * grating + (1 - rng.uniform(0.2, 0.8)) * smooth, 0, 1)[..., None]
    return base * (1 - mix) + other * mix


def render_scene(rng: np.random.Generator, config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """One scene: an RGB float32 image ``(H, W, 3)`` in [0, 1] and uint8 labels ``(H, W)`` (255 = ignore)."""
    size = config.image_size
    image = _background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for _ in range(int(rng.integers(1, config.max_shapes + 1))):
        cls = int(rng.integers(1, len(SHAPE_CLASSES)))
        radius = rng.uniform(*config.size_range) * size
        cx, cy = rng.uniform(0.1, 0.9, size=2) * size
        sdf = _shape_sdf(cls, xx - cx, yy - cy, radius, rng.uniform(0, 2 * np.pi))
        colour = _hsv(_CLASS_HUES[cls] + rng.normal(0, config.hue_jitter), rng.uniform(0.55, 1.0),
                      rng.uniform(0.5, 1.0))
        coverage = np.clip(0.5 - sdf, 0, 1)[..., None]  # anti-aliased edge
        image = image * (1 - coverage) + colour * coverage
        label[sdf <= config.border_ignore] = IGNORE_INDEX
        label[sdf < -config.border_ignore] = cls
    image = image + rng.normal(0, config.noise, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), label


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
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        self.split = split
        self.config = config or SyntheticConfig()
        self.transform = transform
        self.num_classes = self.config.num_classes
        self.ignore_index = IGNORE_INDEX

    def __len__(self) -> int:
        return self.config.num_train if self.split == "train" else self.config.num_val

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The scene before normalisation and transforms (for inspection and plots)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} {self.split} scenes")
        rng = np.random.default_rng([self.config.seed, _SPLITS[self.split], index])
        return render_scene(rng, self.config)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_np, label_np = self.raw(index)
        image = torch.from_numpy(np.rint(image_np * 255).astype(np.uint8)).permute(2, 0, 1)
        return apply_joint(self.transform, image, torch.from_numpy(label_np))

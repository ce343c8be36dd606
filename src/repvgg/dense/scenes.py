"""Generated scenes for the dense tasks: coloured shapes on textured backgrounds, from a seed.

One generator serves segmentation (per-pixel labels) and detection (each visible shape's class and box). A scene is
drawn with numpy from a generator seeded by ``(seed, split, index)``, so it is the same whatever order it is
requested in, and train and val never share a scene. Shapes are circles, squares, triangles and crosses (classes
1-4, class 0 is the background), of random size, rotation and position, overlapping in random order. Their colours
come from a per-class hue with jitter, so colour is a cue but not a perfect one, and the textured background
(gratings, smooth noise) is of low saturation. Edges are anti-aliased; the one-pixel band around every shape outline
is labelled 255 (ignore), as Cityscapes and VOC leave object borders unlabelled. A shape's box bounds the pixels it
still shows once the shapes drawn after it are in place, as COCO's boxes bound visible objects.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["IGNORE_INDEX", "SHAPE_CLASSES", "SPLITS", "Scene", "SyntheticConfig", "render_scene", "scene"]

#: Label of pixels no loss or metric counts (object borders).
IGNORE_INDEX = 255
SPLITS = {"train": 0, "val": 1}


class Scene(NamedTuple):
    """A generated scene: ``image`` float32 ``(H, W, 3)`` in [0, 1], ``label`` uint8 ``(H, W)`` (255 = ignore),
    ``boxes`` float32 ``(N, 4)`` as ``x1, y1, x2, y2`` pixels and ``classes`` int64 ``(N,)`` (1-4) of the visible
    shapes."""

    image: np.ndarray
    label: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray


#: Class names, index = class id.
SHAPE_CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle", "cross")
_CLASS_HUES = {1: 0.0, 2: 0.33, 3: 0.6, 4: 0.13}  # red, green, blue, orange-yellow


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
        min_box: a shape whose visible part is narrower than this many pixels gets no box (detection).
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
    min_box: int = 3

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


def render_scene(rng: np.random.Generator, config: SyntheticConfig) -> Scene:
    """One scene: the image, its per-pixel labels, and each visible shape's class and box."""
    size = config.image_size
    image = _background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int16)  # which shape each pixel shows (later shapes cover earlier)
    classes = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for index in range(int(rng.integers(1, config.max_shapes + 1))):
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
        owner[sdf < 0] = index
        classes.append(cls)
    image = image + rng.normal(0, config.noise, size=image.shape).astype(np.float32)
    return Scene(np.clip(image, 0, 1).astype(np.float32), label, *_visible_boxes(owner, classes, config.min_box))


def _visible_boxes(owner: np.ndarray, classes: list[int], min_box: int) -> tuple[np.ndarray, np.ndarray]:
    """Each shape's box around the pixels it still shows, ``(x1, y1, x2, y2)`` in pixels (x2, y2 exclusive, as COCO
    counts them); shapes showing less than ``min_box`` pixels across either side are left out."""
    boxes, kept = [], []
    for index, cls in enumerate(classes):
        shown = owner == index
        ys, xs = np.flatnonzero(shown.any(axis=1)), np.flatnonzero(shown.any(axis=0))
        if ys.size == 0:
            continue
        x1, y1, x2, y2 = xs[0], ys[0], xs[-1] + 1, ys[-1] + 1
        if min(x2 - x1, y2 - y1) >= min_box:
            boxes.append((x1, y1, x2, y2))
            kept.append(cls)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(kept, dtype=np.int64)


def scene(config: SyntheticConfig, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split`` (``"train"`` or ``"val"``): a pure function of ``(config, split, index)``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    count = config.num_train if split == "train" else config.num_val
    if not 0 <= index < count:
        raise IndexError(f"index {index} out of range for {count} {split} scenes")
    return render_scene(np.random.default_rng([config.seed, SPLITS[split], index]), config)

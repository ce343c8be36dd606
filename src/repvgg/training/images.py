"""Reading image files: the one way this package opens an image (bounded, errors naming the file) and finds the
images in a folder."""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from repvgg.limits import LimitExceeded, check_image_pixels
from repvgg.serialization import input_file

__all__ = ["IMAGE_EXTENSIONS", "NEVER_OPENED", "as_rgb", "image_files", "load_rgb", "open_image", "pil_chw",
           "rgb_tensor", "whole_image_size"]

#: What counts as an image file in a folder: torchvision's ``ImageFolder`` extensions (a test keeps them equal),
#: spelled out so that listing a folder does not import torchvision (about 1.2 s of a ``predict`` on the cluster's
#: driver, which decodes nothing).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


#: Formats Pillow reads that are never opened: reading an EPS file runs Ghostscript, an external program, on a file
#: that may come from anyone (an upload to ``repvgg serve``).
NEVER_OPENED = ("EPS",)


@functools.lru_cache(maxsize=1)
def _readable_formats() -> tuple[str, ...]:
    """The formats an image is opened as: every one Pillow reads but `NEVER_OPENED`."""
    from PIL import Image

    Image.init()
    return tuple(name for name in Image.OPEN if name not in NEVER_OPENED)


def open_image(path: str | os.PathLike[str] | bytes, *, what: str = "image", load: bool = True) -> Any:
    """The PIL image in ``path`` (its pixels read, or only its header with ``load=False``); close it after use.
    ``path`` may also be an image's encoded bytes (an upload), then named by ``what`` alone.

    Every format Pillow reads is opened but EPS (`NEVER_OPENED`: its reading runs Ghostscript). An image of more
    pixels than [`MAX_IMAGE_PIXELS`][repvgg.limits.MAX_IMAGE_PIXELS] is refused from its header, before
    its pixels are decoded (a few hundred KB of PNG can decode to gigabytes). Any failure (a missing, empty, truncated,
    foreign or too large file, a dangling or looping link) is a ValueError naming ``what`` and the file; a too large
    one is a [`LimitExceeded`][repvgg.limits.LimitExceeded].
    """
    from PIL import Image

    named = what if isinstance(path, bytes) else f"{what} {os.fspath(path)}"
    try:
        # a pipe would block the read and a device never ends: refused by input_file before opening
        image = Image.open(io.BytesIO(path) if isinstance(path, bytes) else input_file(path, what),
                           formats=_readable_formats())
    except Image.UnidentifiedImageError as err:
        if not isinstance(path, bytes):
            raise ValueError(f"cannot read {named}: {err}") from err
        raise ValueError(f"cannot read {named}: not an image format Pillow reads (PNG, JPEG, BMP, GIF, WebP, ...)") \
            from err
    except Image.DecompressionBombError as err:  # Pillow's own limit, far above ours, refuses from the header too
        raise LimitExceeded(f"{named} has more pixels than an image may have ({err}); resize it first") from err
    except Exception as err:  # PIL and the OS raise several types for empty, truncated, foreign or missing files
        raise ValueError(f"cannot read {named}: {err}") from err
    try:
        check_image_pixels(*image.size, named)
        if load:
            image.load()
        return image
    except LimitExceeded:
        image.close()
        raise
    except Exception as err:
        image.close()
        raise ValueError(f"cannot read {named}: {err}") from err


def whole_image_size(path: str | os.PathLike[str], *, what: str = "image") -> tuple[int, int]:
    """The ``(width, height)`` of the image file ``path``, from its header, once the file is known to be whole: a
    check of many files before a run, much cheaper than decoding them. A PNG's chunks are read and their checksums
    verified without decompressing; a JPEG is decoded at an eighth of its size (every byte of it is still read); other
    formats are decoded. A missing, foreign, damaged or cut-short file is a ValueError naming ``what`` and the file, as
    [`open_image`][repvgg.training.images.open_image] says."""
    with open_image(path, what=what, load=False) as image:
        size = image.size
        try:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))
                image.load()
        except Exception as err:  # PIL raises several types for a damaged or cut-short file
            raise ValueError(f"cannot read {what} {os.fspath(path)}: {err} (the file is damaged or cut short)") \
                from err
    return size


def load_rgb(path: str | os.PathLike[str] | bytes, *, what: str = "image") -> Any:
    """Open an image file (or an image's encoded bytes, named by ``what``) as an 8-bit RGB PIL image; any failure is a
    ValueError naming the file.

    16-bit grey images (PNG mode ``I;16``, or ``I`` holding 0..65535) are scaled to 8 bits rather
    than clipped (``convert("RGB")`` alone turns them all white); other integer or float images are
    refused, since their range is unknown.
    """
    with open_image(path, what=what) as image:
        return as_rgb(image, what if isinstance(path, bytes) else f"{what} {os.fspath(path)}")


def as_rgb(image: Any, what: str = "the image") -> Any:
    """An image (a file's, or one given in memory) as 8-bit RGB, as [`load_rgb`][repvgg.training.images.load_rgb]
    reads files: bounded by [`MAX_IMAGE_PIXELS`][repvgg.limits.MAX_IMAGE_PIXELS], 16-bit grey scaled, an unknown
    range refused; any failure is a ValueError naming ``what``."""
    width, height = image.size
    check_image_pixels(width, height, what)
    try:
        return _converted(image)
    except Exception as err:  # an unknown range, or PIL failing to convert
        raise ValueError(f"cannot read {what}: {err}") from err


def rgb_tensor(image: Any, what: str = "the image") -> Any:
    """A PIL image (converted as [`as_rgb`][repvgg.training.images.as_rgb] converts it: a 16-bit one scaled, not
    clipped) or a uint8 ``(3, H, W)`` tensor, as the uint8 ``(3, H, W)`` tensor a file of it reads as.

    Raises:
        ValueError: another tensor (a float one would be scaled again), or an image ``as_rgb`` refuses.
    """
    import torch

    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{what} is a {str(image.dtype).removeprefix('torch.')} tensor of shape "
                             f"{tuple(image.shape)}: give a uint8 (3, H, W) tensor of 0..255 values, or a PIL image")
        return image
    return pil_chw(as_rgb(image, what))


def pil_chw(image: Any) -> Any:
    """A PIL image's bytes as a uint8 ``(C, H, W)`` tensor, as torchvision's ``pil_to_tensor`` gives them (one channel
    for a grey image)."""
    import torch

    pixels = np.array(image, dtype=np.uint8)
    return torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1)


def _converted(image: Any) -> Any:
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image)  # uint16 or int32: no wider copy of a large image
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{image.mode} image with values outside 0..65535 (convert it to 8-bit)")
        scaled = (values.astype(np.uint32) * 2 + 257) // 514  # round(v / 257) in integers
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point image (convert it to 8-bit)")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_files(folder: str | Path, seen: set[str] | None = None) -> list[str]:
    """The image files ([`IMAGE_EXTENSIONS`][repvgg.training.images.IMAGE_EXTENSIONS]) anywhere below ``folder``,
    sorted folder by folder.

    Directory links are followed once: a folder already in ``seen`` (real paths, shared between calls that must not
    count an image twice) is skipped, so a loop such as ``a/loop -> .`` ends.
    """
    seen = set() if seen is None else seen
    found: list[str] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found

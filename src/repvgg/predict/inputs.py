"""What ``repvgg predict`` reads: image files, folders and glob patterns expanded in a stable order, and a dataset
that decodes them in DataLoader workers, reporting an unreadable file instead of raising in the worker."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from repvgg.training.images import IMAGE_EXTENSIONS, image_files, load_rgb

__all__ = ["ImageFiles", "collate_images", "expand_inputs"]

_GLOB_CHARS = set("*?[")


def expand_inputs(inputs: Iterable[str | os.PathLike[str]], *, stdin: Iterable[str] | None = None) -> list[str]:
    """The image files ``inputs`` name, in order: a file as it is (whatever its name), a folder's images
    ([`IMAGE_EXTENSIONS`][repvgg.training.images.IMAGE_EXTENSIONS], recursive, sorted), a glob
    pattern's matches (sorted; ``**`` recurses), and for ``-`` the paths in ``stdin``, one a line. A file named
    twice (``a.png``, ``./a.png``, its absolute path or a link to it) is read once, where it was first named.

    Raises:
        FileNotFoundError: a path that does not exist, or a pattern that matches nothing.
        ValueError: a folder without images, or nothing to read at all.
    """
    paths: list[str] = []
    for item in inputs:
        text = os.fspath(item)
        if text == "-":
            if stdin is None:
                raise ValueError("'-' reads paths from standard input, which is not available here")
            paths.extend(expand_inputs([line.strip() for line in stdin if line.strip()]))
            continue
        path = Path(text)
        if path.is_dir():
            images = image_files(path)
            if not images:
                raise ValueError(f"{text} holds no images ({', '.join(IMAGE_EXTENSIONS)}, in any sub-folder)")
            paths.extend(images)
        elif path.exists() or path.is_symlink():  # a link to nowhere is an unreadable image, said as one
            paths.append(text)
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            files = [m for m in matches if Path(m).is_file() and m.lower().endswith(IMAGE_EXTENSIONS)]
            files += [i for m in matches if Path(m).is_dir() for i in image_files(Path(m))]
            if not files:
                raise FileNotFoundError(f"no image matches the pattern {text} (a pattern and a folder give the files "
                                        f"named {', '.join(IMAGE_EXTENSIONS)}; name a file of another format Pillow "
                                        "reads, such as GIF, to predict it)")
            paths.extend(files)
        else:
            raise FileNotFoundError(f"no such file or folder: {text}")
    unique: list[str] = []
    seen: set[str] = set()
    for name in paths:
        real = os.path.realpath(name)
        if real not in seen:
            seen.add(real)
            unique.append(name)
    if not unique:
        raise ValueError("no images to predict: name image files, folders or glob patterns (or - for stdin)")
    return unique


class ImageFiles(Dataset):
    """``(input tensor or None, index, error)`` per image: decoded (8-bit RGB; 16-bit grey scaled, not clipped)
    and prepared by ``transform``; a file that cannot be read gives ``None`` and the reason, naming the file."""

    def __init__(self, paths: list[str], transform: Callable[[Any], Tensor]) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, str]:
        try:
            return self.transform(load_rgb(self.paths[index])), index, ""
        except ValueError as err:
            return None, index, str(err)


def collate_images(items: list[tuple[Tensor | None, int, str]]) -> tuple[Tensor | None, list[int],
                                                                         list[tuple[int, str]]]:
    """A batch of `ImageFiles` items: ``(the readable images stacked, their indices, (index, error) of the
    others)``."""
    good = [(image, index) for image, index, _ in items if image is not None]
    bad = [(index, error) for image, index, error in items if image is None]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, [index for _, index in good], bad

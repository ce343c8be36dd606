"""Bounds on the sizes a user can ask for, and the one check of each: flags, config fields and file metadata.

A value outside its bounds is refused with a message naming the option before anything is built or
allocated (an input of 100,000 x 100,000 pixels would ask for hundreds of GB; a file declaring 40,000
layers per stage would take minutes to describe). The ceilings are generous for real use: the paper
trains at 224 and evaluates segmentation at 1024 x 2048 crops of 713 and 1024; RepVGG-B3 has 16 layers
in its deepest stage and 2,560 channels in its widest.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_IMG_SIZE", "MAX_STAGE_DEPTH", "MAX_CHANNELS", "MIN_OPSET", "check_int", "check_img_size"]

#: Largest input side (pixels) of any command: training, evaluation, export, benchmarks.
MAX_IMG_SIZE = 4096
#: Most layers in one stage of a RepVGG spec.
MAX_STAGE_DEPTH = 256
#: Most channels in one layer of a RepVGG spec.
MAX_CHANNELS = 16384
#: Oldest ONNX opset ``repvgg export`` writes (the ``torch.export``-based exporter's own minimum).
MIN_OPSET = 18


def check_int(value: Any, name: str, *, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; otherwise a ValueError naming ``name`` and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def check_img_size(value: Any, name: str = "img_size", *, low: int = 8) -> int:
    """An input side in pixels: at least ``low`` and at most :data:`MAX_IMG_SIZE`."""
    return check_int(value, name, low=low, high=MAX_IMG_SIZE)

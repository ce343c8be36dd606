"""Where and in which precision a run trains: the memory format and ``--amp``'s autocast type for a device."""

from __future__ import annotations

import logging

import torch

from repvgg.measure.environment import cpu_features

__all__ = ["autocast_dtype", "training_memory_format"]

logger = logging.getLogger(__name__)


def training_memory_format(channels_last: bool, device: torch.device) -> torch.memory_format:
    """The memory format to train in: channels-last only where it was asked for and the device is CUDA.

    On CPUs without AVX-512, oneDNN's channels-last backward of a 1x1 convolution with 3 input channels
    (the stem's 1x1 branch) can spin forever and ignores signals; on CPU the contiguous format is also
    as fast for training, so channels-last there is declined with a log line, as ``--sync-bn`` is.
    """
    if not channels_last:
        return torch.contiguous_format
    if device.type != "cuda":
        logger.info("--channels-last applies to CUDA only; training in the contiguous format on %s", device)
        return torch.contiguous_format
    return torch.channels_last


def autocast_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """The precision ``--amp`` trains in on ``device``: float16 on CUDA (with a gradient scaler), bfloat16 on a
    CPU that computes it natively (AVX512-BF16 or AMX), else ``None`` with a log line saying why: emulated
    bfloat16 would train slower than float32. The final conversion check compares float32 models either way."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_features().native_bf16:
        return torch.bfloat16
    logger.info("--amp: this %s has no native BF16 (%s; bfloat16 needs AVX512-BF16 or AMX) and would train slower "
                "emulated; training in float32", device.type, cpu_features().describe())
    return None

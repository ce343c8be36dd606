"""Where a measurement runs: the CPU or GPU, the library versions, and what the device computes natively."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["cpu_name", "device_supports_dtype", "environment", "set_tf32"]

log = logging.getLogger(__name__)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str, *, tf32: bool = False) -> dict[str, Any]:
    """Where a measurement ran: device, CPU, threads, and the versions of torch and the runtimes."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["tf32"] = tf32
    for package in ("onnxruntime", "openvino", "torchvision", "timm"):
        try:
            env[package] = __import__(package).__version__
        except Exception as err:  # noqa: BLE001 - optional packages
            log.debug("%s not reported: %s", package, err)
    return env


def device_supports_dtype(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether convolutions in ``dtype`` are supported (and accelerated) on ``device``."""
    device = torch.device(device)
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        if dtype == torch.bfloat16:
            return bool(mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False
    return False


def set_tf32(enabled: bool) -> None:
    """Allow or forbid TensorFloat-32 in cuDNN convs and cuBLAS matmuls (float32 means IEEE by default here)."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled

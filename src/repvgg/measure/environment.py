"""Where a measurement runs: the CPU or GPU, the library versions, and what the device computes natively."""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CPUFeatures", "cpu_features", "cpu_name", "device_supports_dtype", "environment", "native_bf16", "set_tf32"]

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


@dataclass(frozen=True)
class CPUFeatures:
    """The instruction sets of this CPU that decide which precisions run fast (read, never assumed).

    ``avx512_bf16`` and ``amx_bf16`` compute BF16 natively; ``vnni`` (AVX512-VNNI or AVX-VNNI) and ``amx_int8``
    compute INT8 dot products natively. Without them a runtime emulates the precision, usually slower than FP32.
    """

    avx2: bool = False
    avx512: bool = False
    avx512_bf16: bool = False
    vnni: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16

    @property
    def native_int8(self) -> bool:
        return self.vnni or self.amx_int8

    def describe(self) -> str:
        """E.g. ``"AVX2"``, ``"AVX-512, VNNI"`` or ``"AVX-512, AVX512-BF16, VNNI, AMX"``."""
        names = [("AVX-512" if self.avx512 else "AVX2" if self.avx2 else "no AVX2")]
        names += [label for flag, label in ((self.avx512_bf16, "AVX512-BF16"), (self.vnni, "VNNI"),
                                            (self.amx_bf16 or self.amx_int8, "AMX")) if flag]
        return ", ".join(names)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "native_bf16": self.native_bf16, "native_int8": self.native_int8,
                "summary": self.describe()}


@functools.lru_cache(maxsize=1)
def cpu_features() -> CPUFeatures:
    """This CPU's `CPUFeatures`: from PyTorch's own CPU probe (``torch.cpu.get_capabilities``) where it
    exists, else from the ``flags`` line of ``/proc/cpuinfo``; nothing is assumed."""
    probe = getattr(torch.cpu, "get_capabilities", None)
    if probe is not None:
        try:
            caps = probe()
            return CPUFeatures(avx2=bool(caps.get("avx2")), avx512=bool(caps.get("avx512_f")),
                               avx512_bf16=bool(caps.get("avx512_bf16")),
                               vnni=bool(caps.get("avx512_vnni") or caps.get("avx_vnni")),
                               amx_bf16=bool(caps.get("amx_bf16")), amx_int8=bool(caps.get("amx_int8")))
        except Exception as err:  # noqa: BLE001 - a private probe; fall back to the kernel's view
            log.debug("torch.cpu.get_capabilities failed (%s); reading /proc/cpuinfo", err)
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        flags = set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    return CPUFeatures(avx2="avx2" in flags, avx512="avx512f" in flags, avx512_bf16="avx512_bf16" in flags,
                       vnni=bool({"avx512_vnni", "avx_vnni"} & flags), amx_bf16="amx_bf16" in flags,
                       amx_int8="amx_int8" in flags)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes BF16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_features().native_bf16


def environment(device: torch.device | str, *, tf32: bool = False) -> dict[str, Any]:
    """Where a measurement ran: device, CPU, threads, and the versions of torch and the runtimes."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_features": cpu_features().as_dict(),
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
    if mkldnn is None:
        return False
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

"""What ``repvgg bench`` measures and how hard it tries, as typed data (its flags are made from it; no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from repvgg.limits import MAX_IMG_SIZE, check_batch_memory, check_unique
from repvgg.options import RunConfig, check_device_name, option

__all__ = ["BenchConfig", "DTYPES"]

#: The precisions a benchmark can run in.
DTYPES = ("float32", "float16", "bfloat16", "int8")


@dataclass(frozen=True)
class BenchConfig(RunConfig):
    """What to benchmark and how hard to try (``repvgg bench``'s flags); ``None`` fields take the device's default.

    Defaults: batch 8 on the CPU and 128 on CUDA (the paper's), 2 warm-up + 10 timed rounds on the
    CPU, 50 + 50 on CUDA (the paper's), float32 only; a 50 ms idle pause before each timed CPU call
    lets runtimes' spinning worker threads settle so that they do not slow the next candidate.
    """

    models: tuple[str, ...] = option(("repvgg_a0",), "comma-separated RepVGG names")
    baselines: tuple[str, ...] = option(("resnet18",), "comma-separated baselines: torchvision classifiers "
                                                       "(resnet50, efficientnet_b0, regnet_x_3_2gf, vgg16, ...) or "
                                                       "timm:NAME, conv-BN folded; or 'none'")
    peer: bool = option(True, "time timm's re-parameterized RepVGG of the same name too")
    device: str = option("cpu", "cpu or cuda[:N]")
    batch_size: int | None = option(None, "throughput batch size", default_help="8 on CPU, 128 on CUDA", low=1)
    img_size: int = option(224, "input resolution", low=32, high=MAX_IMG_SIZE)
    dtypes: tuple[str, ...] = option(("float32",), "comma-separated among float32, float16, bfloat16 and int8 (INT8 "
                                                   "calibrated on generated images; a precision the device does not "
                                                   "compute natively is skipped, and the report says why)")
    warmup: int | None = option(None, "warm-up calls per model", default_help="2 CPU / 50 CUDA", low=0)
    rounds: int | None = option(None, "timed rounds", default_help="10 CPU / 50 CUDA", low=1)
    latency: bool = option(True, "time the batch-1 latency too")
    memory: bool = option(True, "measure the peak forward memory too")
    fast: bool = option(True, "time the fast inference path too")
    fast_only: bool = option(False, "time the fast path only: no training-time, eager converted, eager fused or timm "
                                    "rows, and only the chosen runtime of each model (a fraction of the memory and "
                                    "time)")
    candidates: tuple[str, ...] | None = option(None, "fast-path candidates to weigh, comma-separated",
                                                default_help="all available on the device")
    reference_conv: bool = option(True, "time one large 3x3 conv, the FLOP rate's reference", cli=False)
    tf32: bool = option(False, "allow TensorFloat-32 for float32 on CUDA (off: true fp32)")
    pause_s: float | None = option(None, "idle seconds before each timed CPU call", cli=False, low=0, high=60)
    num_classes: int = option(1000, "classifier outputs of every model", cli=False, low=1)

    def __post_init__(self) -> None:
        self._check_types()
        check_device_name(self.device)
        if self.fast_only and not self.fast:
            raise ValueError("--fast-only times the fast path: it cannot go with --no-fast")
        if self.device == "auto":
            raise ValueError("device must be cpu or cuda[:N] (a benchmark names the device it times)")

    @property
    def batch(self) -> int:
        """The throughput batch size of a resolved config (`resolved()` fills in the device's default)."""
        if self.batch_size is None:
            raise ValueError("this BenchConfig has no batch size yet: use config.resolved()")
        return self.batch_size

    def resolved(self) -> BenchConfig:
        """This config with every device default filled in (and the arguments checked)."""

        from repvgg.training.distributed import resolve_device

        device = resolve_device(self.device)
        from repvgg.nn.baselines import check_baseline_name
        from repvgg.nn.registry import canonical_name, get_spec

        for name in self.models:
            get_spec(name)  # unknown names fail here, with close matches, before any work
        models = tuple(canonical_name(name) for name in self.models)
        for name in self.baselines:
            check_baseline_name(name)  # unknown names fail here, with close matches, before any work
        unknown = [d for d in self.dtypes if d not in DTYPES]
        if unknown or not self.dtypes:
            raise ValueError(f"dtypes must be among {', '.join(DTYPES)}, got {list(self.dtypes)}")
        for flag, given, names in (("--models", self.models, models), ("--baselines", self.baselines, self.baselines),
                                   ("--dtypes", self.dtypes, self.dtypes)):
            check_unique(given, flag, names)
        cuda = device.type == "cuda"
        resolved = replace(
            self,
            models=models,
            device=str(device),
            candidates=self.candidates or None,
            batch_size=(128 if cuda else 8) if self.batch_size is None else self.batch_size,
            warmup=(50 if cuda else 2) if self.warmup is None else self.warmup,
            rounds=(50 if cuda else 10) if self.rounds is None else self.rounds,
            pause_s=(0.0 if cuda else 0.05) if self.pause_s is None else self.pause_s,
        )
        check_batch_memory(resolved.batch, (3, self.img_size, self.img_size), "--batch-size")
        return resolved

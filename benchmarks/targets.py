"""The CPU speed targets this project sets itself for RepVGG-A0 (docs "Speed"), by ratio name.

Keys are those of :func:`repvgg.perf.bench.check_targets`; the targets are for a small CPU at batch 8,
224x224, and say nothing about other devices. The fastest accepted row's target against timm's eager float32
A0 depends on what the CPU computes natively: INT8 and BF16 matrix units (AMX) give the most, INT8 dot
products (VNNI) less, AVX2 alone least.
"""

from repvgg.measure.environment import CPUFeatures


def cpu_targets(features: CPUFeatures) -> dict[str, dict[str, float]]:
    """The targets for a CPU with ``features``."""
    fastest = 4.0 if features.amx_int8 or features.amx_bf16 else 2.5 if features.vnni else 1.5
    return {"repvgg_a0": {"plain_vs_train": 1.4, "fast_vs_timm": 1.3, "fast_vs_baseline_fast": 1.3,
                          "flop_rate": 0.7, "fastest_vs_timm": fastest}}

"""The CPU speed targets this project sets itself for RepVGG-A0 (README "Speed"), by ratio name.

Keys are those of :func:`repvgg.perf.bench.check_targets`; the targets are for a small CPU at batch 8,
224x224, float32, and say nothing about other devices.
"""

CPU_TARGETS: dict[str, dict[str, float]] = {
    "repvgg_a0": {"plain_vs_train": 1.4, "fast_vs_timm": 1.3, "fast_vs_baseline_fast": 1.3, "flop_rate": 0.7},
}

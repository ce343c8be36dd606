"""Inference speed: the fast inference path (runtimes and precisions weighed), the benchmark and the paper's speed
claims; it measures with [`repvgg.measure`][repvgg.measure]."""

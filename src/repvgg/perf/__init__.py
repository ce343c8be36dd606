"""Inference speed: interleaved timing, peak memory, the fast inference path and the benchmark."""

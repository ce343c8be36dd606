"""INT8 deployment: post-training quantization and quantization-aware training, measured on real data."""

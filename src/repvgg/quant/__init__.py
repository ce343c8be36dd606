"""INT8: post-training quantization (`ptq`), quantization-aware training
(`qat`) and the QDQ format both write (`qdq`)."""

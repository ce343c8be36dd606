"""INT8: post-training quantization (:mod:`~repvgg.quant.ptq`), quantization-aware training
(:mod:`~repvgg.quant.qat`) and the QDQ format both write (:mod:`~repvgg.quant.qdq`)."""

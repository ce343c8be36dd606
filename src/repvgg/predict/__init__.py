"""Using a trained model: image inputs expanded and decoded (`inputs`) and the
[`Predictor`][repvgg.predict.predictor.Predictor] that classifies them with any artifact (``repvgg predict``)."""

#: ``runtime=``: ``auto`` (the fast path's choice, or ONNX Runtime for an ONNX file) or one runtime by name.
RUNTIMES = ("auto", "eager", "channels_last", "torchscript", "onnxruntime", "openvino", "compile")
#: ``dtype=``: what [`optimize_for_inference`][repvgg.perf.fast.optimize_for_inference] computes in (model files only);
#: ``auto`` is the fastest of the three that the accuracy guard accepts.
DTYPES = ("float32", "bfloat16", "int8", "auto")

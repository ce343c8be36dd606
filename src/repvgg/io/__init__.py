"""File formats and what reads or writes them: weights, training checkpoints, model loading, ONNX export."""

"""RepVGG: train a multi-branch VGG-style ConvNet, deploy it as a plain stack of 3x3 convs and ReLUs.

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021.
"""

from repvgg.lazy import lazy_exports

__version__ = "0.1.0"

#: Public name -> the module that defines it. Imported on first use, so ``import repvgg`` (and the
#: ``repvgg`` command's start-up and ``--help``) does not pay for torch until a model is needed.
_EXPORTS = {
    "ModelCard": "repvgg.io.card",
    "Prediction": "repvgg.predict.predictor",
    "Predictor": "repvgg.predict.predictor",
    "Preprocessing": "repvgg.io.card",
    "RepVGG": "repvgg.nn.model",
    "RepVGGBlock": "repvgg.nn.block",
    "RepVGGSpec": "repvgg.nn.spec",
    "SEBlock": "repvgg.nn.block",
    "create_model": "repvgg.io.loading",
    "export_onnx": "repvgg.io.export",
    "get_spec": "repvgg.nn.registry",
    "list_models": "repvgg.nn.registry",
    "load_model": "repvgg.io.loading",
    "load_weights": "repvgg.io.weights",
    "optimize_for_inference": "repvgg.perf.fast",
    "read_checkpoint": "repvgg.io.weights",
    "register_model": "repvgg.nn.registry",
    "reparameterize_model": "repvgg.nn.convert",
    "save_weights": "repvgg.io.weights",
}

__all__ = [*_EXPORTS, "__version__"]


__getattr__, __dir__ = lazy_exports("repvgg", globals(), _EXPORTS)

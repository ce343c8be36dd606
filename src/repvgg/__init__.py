"""RepVGG: train a multi-branch VGG-style ConvNet, deploy it as a plain stack of 3x3 convs and ReLUs.

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021.
"""

from repvgg.nn.block import RepVGGBlock, SEBlock
from repvgg.nn.convert import reparameterize_model
from repvgg.io.export import export_onnx
from repvgg.perf.fast import optimize_for_inference
from repvgg.nn.model import RepVGG, RepVGGSpec
from repvgg.nn.registry import build_model, get_spec, list_models, register_model
from repvgg.io.loading import create_model, load_model
from repvgg.io.weights import load_weights, read_checkpoint, save_weights

__version__ = "0.1.0"

__all__ = [
    "RepVGG",
    "RepVGGBlock",
    "RepVGGSpec",
    "SEBlock",
    "build_model",
    "create_model",
    "export_onnx",
    "get_spec",
    "list_models",
    "load_model",
    "load_weights",
    "optimize_for_inference",
    "read_checkpoint",
    "register_model",
    "reparameterize_model",
    "save_weights",
    "__version__",
]

"""``torch.hub.load("<this repository>", "repvgg_a0", pretrained=True)``: every registered model by name.

Each entry point is ``repvgg.create_model(name, pretrained=..., **kwargs)``; ``pretrained=True`` loads
timm's ImageNet weights through the Hugging Face hub cache (see README, "Where weights come from").
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from repvgg import create_model, list_models  # noqa: E402

dependencies = ["torch", "safetensors", "huggingface_hub"]


def _entry_point(name):
    def build(pretrained=False, **kwargs):
        return create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = name
    build.__doc__ = f"RepVGG {name} (``pretrained=True``: ImageNet weights from the Hugging Face hub)."
    return build


globals().update({name: _entry_point(name) for name in list_models()})

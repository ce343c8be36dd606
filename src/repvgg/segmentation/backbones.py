"""Dilated backbones for dense prediction: RepVGG (normal and "fast") and torchvision ResNet-50/101.

Every backbone here maps an image to two feature maps, ``[aux_features, features]``: the outputs of
the last two stages (RepVGG stages 3 and 4, ResNet ``layer3`` and ``layer4``), both at
``output_stride`` (8 by default). PSPNet puts its pyramid pooling on the second and its auxiliary
head on the first (Zhao et al., PSPNet, CVPR 2017; Ding et al., RepVGG, CVPR 2021, Sec. 4.3).

RepVGG (paper stages counted from 1 = the stem, so paper stages 4 and 5 are our stage indices 3 and 4):
the first layers of the last two stages get stride 1 and their 3x3 convs dilation 2 and 4, padding
equal to the dilation; the 1x1 branch keeps stride 1 and padding 0, so it stays aligned with the
centre tap and still folds into the dilated 3x3 kernel. The "fast" variant dilates only the last 5
layers of the network (the last 4 of paper stage 4 and the single layer of paper stage 5). All of
this is expressed through [`RepVGGSpec`][repvgg.nn.spec.RepVGGSpec] fields (``strides``, ``dilations``,
``dilated_layers``), never by editing conv attributes after construction.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from repvgg.nn.fusion import fuse_conv_bn_modules, is_batchnorm
from repvgg.nn.model import RepVGG
from repvgg.io.loading import create_model
from repvgg.io.safe_load import safe_load

__all__ = [
    "RESNET_DEPTHS",
    "ResNetBackbone",
    "dilated_stage_settings",
    "create_repvgg_backbone",
]

#: The ResNet baselines of the paper's segmentation table.
RESNET_DEPTHS: dict[str, int] = {"resnet50": 50, "resnet101": 101}

#: The two stages the segmenter reads (auxiliary head, pyramid pooling).
FEATURE_STAGES = (3, 4)


def dilated_stage_settings(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-stage ``(strides, dilations)`` of a 5-stage backbone with the given output stride.

    8: the last two stages keep the resolution and dilate by 2 and 4 (PSPNet, DeepLab);
    16: only the last stage does, with dilation 2; 32: the classification network.
    """
    settings = {
        8: ((2, 2, 2, 1, 1), (1, 1, 1, 2, 4)),
        16: ((2, 2, 2, 2, 1), (1, 1, 1, 1, 2)),
        32: ((2, 2, 2, 2, 2), (1, 1, 1, 1, 1)),
    }
    if output_stride not in settings:
        raise ValueError(f"output_stride must be one of {sorted(settings)}, got {output_stride!r}")
    return settings[output_stride]


def create_repvgg_backbone(
    name: str,
    *,
    output_stride: int = 8,
    dilated_layers: int | None = None,
    in_chans: int = 3,
    deploy: bool = False,
    weights: str | os.PathLike[str] | None = None,
) -> RepVGG:
    """A registered RepVGG as a dilated feature extractor returning ``[stage 3, stage 4]`` maps.

    Args:
        name: any registered RepVGG name (see [`repvgg.list_models`][repvgg.nn.registry.list_models]).
        output_stride: 8 (the paper), 16 or 32.
        dilated_layers: only the last ``dilated_layers`` layers use their stage's dilation
            (5 = the paper's "fast" backbones); ``None`` dilates every layer of the dilated stages.
        in_chans: input image channels.
        deploy: build the fused form (to load a converted segmenter's state dict).
        weights: an ImageNet checkpoint for the backbone (official, timm or this package's format);
            the classifier in the file is ignored. Strides and dilations do not change any
            weight shape, so classification weights load as they are.
    """
    strides, dilations = dilated_stage_settings(output_stride)
    return create_model(
        name,
        weights=weights,
        in_chans=in_chans,
        deploy=deploy,
        features_only=True,
        out_indices=FEATURE_STAGES,
        strides=strides,
        dilations=dilations,
        dilated_layers=dilated_layers,
    )


class ResNetBackbone(nn.Module):
    """torchvision's ResNet-50/101 with dilated last stages, returning ``[layer3, layer4]`` maps.

    Attribute names are torchvision's (``conv1``, ``bn1``, ``layer1`` .. ``layer4``), so a torchvision
    ImageNet state dict (without ``fc.*``) loads into it. Randomly initialised unless ``weights``
    names a local file; nothing is downloaded.

    `reparameterize` folds every conv-BN pair into one biased conv, as the RepVGG paper does
    for its baselines when timing them; ``deploy=True`` builds that fused form directly.
    """

    def __init__(
        self,
        depth: int = 50,
        *,
        output_stride: int = 8,
        in_chans: int = 3,
        deploy: bool = False,
        weights: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models import resnet101, resnet50

        builders = {50: resnet50, 101: resnet101}
        if depth not in builders:
            raise ValueError(f"ResNet depth must be 50 or 101, got {depth!r}")
        strides, _ = dilated_stage_settings(output_stride)
        # torchvision's flags are per stage after layer1: True turns the stride-2 of that stage into
        # dilation (layer2, layer3, layer4 = our stages 2, 3, 4).
        replace = [strides[2] == 1, strides[3] == 1, strides[4] == 1]
        net = builders[depth](weights=None, replace_stride_with_dilation=replace)
        if weights is not None:
            _load_torchvision_resnet(net, weights)
        self.depth = depth
        self.name = f"resnet{depth}"
        self.conv1 = net.conv1 if in_chans == 3 else nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        reduction = [2, 4, 4 * strides[2], 4 * strides[2] * strides[3], 4 * strides[2] * strides[3] * strides[4]]
        channels = [64, 256, 512, 1024, 2048]
        self.feature_info: list[dict[str, Any]] = [
            dict(num_chs=c, reduction=r, module=m)
            for c, r, m in zip(channels, reduction, ["relu", "layer1", "layer2", "layer3", "layer4"])
        ]
        if deploy:
            self.reparameterize()

    @property
    def deploy(self) -> bool:
        """True once every conv-BN pair is folded."""
        return isinstance(self.bn1, nn.Identity)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        aux = self.layer3(x)
        return [aux, self.layer4(aux)]

    def _conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        pairs: list[tuple[nn.Module, str, str]] = [(self, "conv1", "bn1")]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]  # Bottleneck blocks
                if block.downsample is not None:
                    pairs.append((block.downsample, "0", "1"))
        return pairs

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every BN into its conv (inference-time statistics). Idempotent."""
        if self.deploy:
            return
        for parent, conv_name, bn_name in self._conv_bn_pairs():
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            assert isinstance(conv, nn.Conv2d) and is_batchnorm(bn)
            setattr(parent, conv_name, fuse_conv_bn_modules(conv, bn))
            setattr(parent, bn_name, nn.Identity())


def _load_torchvision_resnet(net: nn.Module, path: str | os.PathLike[str]) -> None:
    state = safe_load(path, what="a ResNet weights file")
    if not isinstance(state, dict):
        raise ValueError(f"{os.fspath(path)!r} does not hold a state dict")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    own = {k for k in net.state_dict() if not k.startswith("fc.")}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(
            f"{os.fspath(path)!r} is not a torchvision ResNet state dict of this depth: "
            f"{len(missing)} missing key(s) e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}"
        )
    net.load_state_dict(state, strict=False)

"""The backbones' feature taps for dense prediction: RepVGG (normal and "fast") and torchvision's ResNets, each
returning the maps of the stages in ``out_indices`` at an ``output_stride``, described by a timm-style
[`FeatureInfo`][repvgg.nn.features.FeatureInfo].

Segmentation reads the last two stages at output stride 8 (PSPNet puts its pyramid pooling on the last and its
auxiliary head on the one before; Zhao et al., PSPNet, CVPR 2017; Ding et al., RepVGG, CVPR 2021, Sec. 4.3);
detection reads stages 2-4 at their natural strides 8, 16 and 32 for a feature pyramid.

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

import torch
from torch import Tensor, nn

from repvgg.io.loading import create_model
from repvgg.io.safe_load import safe_load
from repvgg.nn.features import FeatureInfo
from repvgg.nn.fusion import fuse_conv_bn_modules, is_batchnorm
from repvgg.nn.model import RepVGG

__all__ = [
    "RESNET_DEPTHS",
    "ResNetBackbone",
    "dilated_stage_settings",
    "create_repvgg_backbone",
]

#: torchvision's ResNets, the baselines the dense tasks are timed against (BN folded as RepVGG's is).
RESNET_DEPTHS: dict[str, int] = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}

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
    out_indices: tuple[int, ...] = FEATURE_STAGES,
) -> RepVGG:
    """A registered RepVGG as a (dilated) feature extractor returning the maps of ``out_indices``.

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
        out_indices: the stages returned (default: stages 3 and 4, what the segmenter reads).
    """
    strides, dilations = dilated_stage_settings(output_stride)
    return create_model(
        name,
        weights=weights,
        in_chans=in_chans,
        deploy=deploy,
        features_only=True,
        out_indices=out_indices,
        strides=strides,
        dilations=dilations,
        dilated_layers=dilated_layers,
    )


class ResNetBackbone(nn.Module):
    """torchvision's ResNet-18/34/50/101 (the deeper two with dilated last stages), returning the maps of
    ``out_indices`` (stage 1 = ``layer1`` ... stage 4 = ``layer4``; ``[layer3, layer4]`` by default).

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
        out_indices: tuple[int, ...] = FEATURE_STAGES,
        in_chans: int = 3,
        deploy: bool = False,
        weights: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models import resnet18, resnet34, resnet50, resnet101

        builders = {18: resnet18, 34: resnet34, 50: resnet50, 101: resnet101}
        if depth not in builders:
            raise ValueError(f"ResNet depth must be one of {sorted(builders)}, got {depth!r}")
        if not out_indices or not set(out_indices) <= {1, 2, 3, 4} or sorted(set(out_indices)) != list(out_indices):
            raise ValueError(f"out_indices must be increasing stage indices among 1-4, got {out_indices!r}")
        strides, _ = dilated_stage_settings(output_stride)
        if depth < 50 and output_stride != 32:
            raise ValueError(f"ResNet-{depth}'s basic blocks cannot dilate: use output_stride 32 (or ResNet-50/101)")
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
        width = 4 if depth >= 50 else 1  # a bottleneck block widens its output 4 times
        channels = [64, 64 * width, 128 * width, 256 * width, 512 * width]
        self.out_indices = tuple(out_indices)
        self.feature_info = FeatureInfo(
            [dict(num_chs=c, reduction=r, module=m)
             for c, r, m in zip(channels, reduction, ["relu", "layer1", "layer2", "layer3", "layer4"])],
            self.out_indices)
        if deploy:
            self.reparameterize()

    @property
    def deploy(self) -> bool:
        """True once every conv-BN pair is folded."""
        return isinstance(self.bn1, nn.Identity)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        return [maps[i - 1] for i in self.out_indices]

    def _conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        pairs: list[tuple[nn.Module, str, str]] = [(self, "conv1", "bn1")]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
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

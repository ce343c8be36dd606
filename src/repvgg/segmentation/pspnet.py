"""PSPNet on a RepVGG or ResNet backbone, its configuration as data, and its training loss.

Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017: a dilated backbone at output stride 8, a
pyramid pooling module (average pooling to 1x1, 2x2, 3x3 and 6x6, a 1x1 conv each, upsampled and
concatenated with the features), a 3x3 conv classifier, an auxiliary classifier on the second-last
stage weighted 0.4 in the loss while training, and bilinear upsampling to the input size. The RepVGG
paper (Sec. 4.3) swaps in RepVGG backbones, optionally "fast" ones that dilate only the last 5 layers.

[`PSPNet.reparameterize`][repvgg.segmentation.pspnet.PSPNet.reparameterize] drops the auxiliary head and fuses the
backbone, so ``repvgg.reparameterize_model(segmenter)`` converts the whole segmenter.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repvgg.dense.scenes import IGNORE_INDEX
from repvgg.serialization import DictMixin
from repvgg.nn.convert import is_reparameterizable
from repvgg.nn.model import RepVGG
from repvgg.nn.registry import canonical_name as normalise_model_name
from repvgg.nn.registry import get_spec, list_models
from repvgg.dense.backbones import RESNET_DEPTHS as _ALL_RESNETS
from repvgg.dense.backbones import ResNetBackbone, create_repvgg_backbone
from repvgg.segmentation.config import AUX_LOSS_WEIGHT, FAST_DILATED_LAYERS

__all__ = [
    "IGNORE_INDEX",
    "SegmenterConfig",
    "SegmentationOutput",
    "PyramidPooling",
    "PSPNet",
    "create_segmenter",
    "build_segmenter",
    "list_backbones",
    "segmentation_loss",
    "main_logits",
]

#: The ResNet baselines of the paper's segmentation table (their bottleneck blocks dilate to output stride 8).
RESNET_DEPTHS = {name: _ALL_RESNETS[name] for name in ("resnet50", "resnet101")}
#: Weight of the auxiliary loss (PSPNet).


class SegmentationOutput(NamedTuple):
    """What a segmenter returns in training mode when it has an auxiliary head (both at input size)."""

    logits: Tensor
    aux_logits: Tensor


@dataclass(frozen=True)
class SegmenterConfig(DictMixin):
    """Everything that defines a segmenter, as plain data (stored in checkpoints to rebuild it).

    Attributes:
        backbone: a registered RepVGG name (``"repvgg_b1g2"``, ``"a0"``, ...) or ``"resnet50"`` /
            ``"resnet101"``.
        num_classes: output classes (the ignore label 255 is not a class).
        dilated_layers: RepVGG only: dilate only the last N layers (5 = the paper's "fast"
            backbones); ``None`` dilates every layer of the last two stages.
        output_stride: resolution of the backbone features relative to the input (8 in the paper).
        bins: pyramid pooling output sizes.
        head_channels: width of the classifier's 3x3 conv (512 in PSPNet).
        aux_channels: width of the auxiliary head's 3x3 conv (256 in PSPNet); 0 = no auxiliary head.
        dropout: Dropout2d before the last 1x1 convs.
        in_chans: input image channels.
    """

    backbone: str
    num_classes: int
    dilated_layers: int | None = None
    output_stride: int = 8
    bins: tuple[int, ...] = (1, 2, 3, 6)
    head_channels: int = 512
    aux_channels: int = 256
    dropout: float = 0.1
    in_chans: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "bins", tuple(self.bins))
        object.__setattr__(self, "backbone", _normalise_backbone(self.backbone))
        for name in ("num_classes", "head_channels", "in_chans"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.aux_channels, int) or self.aux_channels < 0:
            raise ValueError(f"aux_channels must be an int >= 0 (0 = no auxiliary head), got {self.aux_channels!r}")
        if not self.bins or not all(isinstance(b, int) and b >= 1 for b in self.bins):
            raise ValueError(f"bins must be positive ints, got {self.bins!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.dilated_layers is not None:
            if self.backbone in RESNET_DEPTHS:
                raise ValueError(
                    f"dilated_layers (the 'fast' variants) applies to RepVGG backbones only, not {self.backbone!r}"
                )
            if not isinstance(self.dilated_layers, int) or self.dilated_layers < 0:
                raise ValueError(f"dilated_layers must be an int >= 0 or None, got {self.dilated_layers!r}")

    @property
    def is_resnet(self) -> bool:
        return self.backbone in RESNET_DEPTHS



def list_backbones() -> list[str]:
    """Every backbone name [`create_segmenter`][repvgg.segmentation.pspnet.create_segmenter] accepts: the registered
    RepVGGs and the ResNets."""
    return sorted([*list_models(), *RESNET_DEPTHS])


def _normalise_backbone(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key in RESNET_DEPTHS:
        return key
    try:
        get_spec(name)
    except ValueError:
        candidates = list_backbones()
        close = difflib.get_close_matches(name.strip().lower().replace("-", "_"), candidates, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown backbone {name!r}.{hint} Available backbones: {', '.join(candidates)}.") from None
    return normalise_model_name(name)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class PyramidPooling(nn.Module):
    """Average-pool to each bin size, 1x1 conv + BN + ReLU, upsample, concatenate with the input.

    Output channels: ``in_channels + len(bins) * (in_channels // len(bins))``. The 1x1-bin branch
    has BatchNorm over a single position per image, so training needs at least 2 images per batch.
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        branch_channels = max(1, in_channels // len(bins))
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *_conv_bn_relu(in_channels, branch_channels, 1)) for b in bins
        )
        self.out_channels = in_channels + branch_channels * len(bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False) for branch in self.branches]
        return torch.cat([x, *pooled], dim=1)


def _classifier(in_channels: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        *_conv_bn_relu(in_channels, hidden, 3),
        nn.Dropout2d(dropout),
        nn.Conv2d(hidden, num_classes, 1),
    )


class PSPNet(nn.Module):
    """PSPNet around any backbone whose forward returns ``[aux_features, features]``.

    ``forward(x)`` returns logits of shape ``(N, num_classes, H, W)`` (the input's size). In training
    mode, when the model has an auxiliary head, it returns a
    [`SegmentationOutput`][repvgg.segmentation.pspnet.SegmentationOutput] with the auxiliary logits too (as
    torchvision's GoogLeNet does); [`segmentation_loss`][repvgg.segmentation.pspnet.segmentation_loss] takes either.

    Args:
        backbone: the feature extractor (see ``repvgg.dense.backbones``).
        feature_channels: channels of ``(aux_features, features)``.
        config: the [`SegmenterConfig`][repvgg.segmentation.pspnet.SegmenterConfig] it was built from (kept for
            checkpoints).
        deploy: build without the auxiliary head (the converted form).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: tuple[int, int],
        config: SegmenterConfig,
        *,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.backbone = backbone
        self.ppm = PyramidPooling(feature_channels[1], config.bins)
        self.classifier = _classifier(self.ppm.out_channels, config.head_channels, config.num_classes, config.dropout)
        self.aux_head: nn.Sequential | None = None
        if config.aux_channels and not deploy:
            self.aux_head = _classifier(feature_channels[0], config.aux_channels, config.num_classes, config.dropout)

    @property
    def name(self) -> str:
        return f"pspnet_{self.config.backbone}"

    @property
    def deploy(self) -> bool:
        """True once the auxiliary head is gone and every backbone part that can fuse is fused."""
        return self.aux_head is None and all(
            getattr(m, "deploy", True) for m in self.backbone.modules() if is_reparameterizable(m)
        )

    def forward(self, x: Tensor) -> Tensor | SegmentationOutput:
        size = x.shape[-2:]
        aux_features, features = self.backbone(x)
        logits = self.classifier(self.ppm(features))
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if self.training and self.aux_head is not None:
            aux = F.interpolate(self.aux_head(aux_features), size=size, mode="bilinear", align_corners=False)
            return SegmentationOutput(logits, aux)
        return logits

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Drop the auxiliary head (it only serves training) and fuse every backbone block. Idempotent.

        The pyramid pooling and classifier are left as they are. ``repvgg.reparameterize_model``
        calls this (it is the first module it visits) and then finds the blocks already fused.
        """
        self.aux_head = None
        for module in list(self.backbone.modules()):
            if is_reparameterizable(module):
                module.reparameterize()


def build_segmenter(
    config: SegmenterConfig,
    *,
    deploy: bool = False,
    backbone_weights: str | os.PathLike[str] | None = None,
) -> PSPNet:
    """Build the PSPNet described by ``config``.

    Args:
        config: the architecture.
        deploy: build the converted form (fused backbone, no auxiliary head), e.g. to load the
            state dict of ``repvgg.reparameterize_model(segmenter)``.
        backbone_weights: ImageNet weights for the backbone: any RepVGG checkpoint format this
            package reads, or a torchvision ResNet state dict file. Nothing is downloaded.
    """
    if config.is_resnet:
        backbone: ResNetBackbone | RepVGG = ResNetBackbone(
            RESNET_DEPTHS[config.backbone], output_stride=config.output_stride, in_chans=config.in_chans,
            deploy=deploy, weights=backbone_weights,
        )
    else:
        backbone = create_repvgg_backbone(
            config.backbone, output_stride=config.output_stride, dilated_layers=config.dilated_layers,
            in_chans=config.in_chans, deploy=deploy, weights=backbone_weights,
        )
    info = backbone.feature_info
    assert info[-1]["reduction"] == config.output_stride, info
    return PSPNet(backbone, (info[3]["num_chs"], info[4]["num_chs"]), config, deploy=deploy)


def create_segmenter(
    backbone: str,
    num_classes: int,
    *,
    fast: bool = False,
    dilated_layers: int | None = None,
    deploy: bool = False,
    backbone_weights: str | os.PathLike[str] | None = None,
    **options: Any,
) -> PSPNet:
    """Build a PSPNet segmenter by backbone name.

    Args:
        backbone: any registered RepVGG name (see [`list_backbones`][repvgg.segmentation.pspnet.list_backbones]), or
            ``"resnet50"`` / ``"resnet101"`` (torchvision, dilated like PSPNet, random init unless weights are given).
        num_classes: output classes.
        fast: the paper's "fast" RepVGG backbone: dilate only the last 5 layers
            (shorthand for ``dilated_layers=5``).
        dilated_layers: dilate only the last N layers of a RepVGG backbone.
        deploy: build the converted form (fused backbone, no auxiliary head).
        backbone_weights: ImageNet weights file for the backbone.
        **options: other [`SegmenterConfig`][repvgg.segmentation.pspnet.SegmenterConfig] fields (``output_stride``,
            ``bins``, ``head_channels``, ``aux_channels``, ``dropout``, ``in_chans``).

    Example::

        model = create_segmenter("repvgg_b1g2", num_classes=19, fast=True)
        deployed = repvgg.reparameterize_model(model)   # same logits, plain 3x3 convs, no aux head
    """
    if fast:
        if dilated_layers is not None and dilated_layers != FAST_DILATED_LAYERS:
            raise ValueError(
                f"fast=True means dilated_layers={FAST_DILATED_LAYERS}; got dilated_layers={dilated_layers}. "
                "Pass one or the other."
            )
        dilated_layers = FAST_DILATED_LAYERS
    known = {f.name for f in dataclasses.fields(SegmenterConfig)} - {"backbone", "num_classes", "dilated_layers"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown argument(s) {unknown} for create_segmenter; options are {sorted(known)}")
    config = SegmenterConfig(backbone, num_classes, dilated_layers=dilated_layers, **options)
    return build_segmenter(config, deploy=deploy, backbone_weights=backbone_weights)


def main_logits(output: Tensor | SegmentationOutput) -> Tensor:
    """The main logits of a segmenter's output in either mode."""
    return output.logits if isinstance(output, SegmentationOutput) else output


def segmentation_loss(
    output: Tensor | SegmentationOutput,
    target: Tensor,
    *,
    aux_weight: float = AUX_LOSS_WEIGHT,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Per-pixel cross-entropy over the labelled pixels, plus ``aux_weight`` times the auxiliary loss.

    ``output`` is what the segmenter returned (logits ``(N, C, H, W)`` or a
    [`SegmentationOutput`][repvgg.segmentation.pspnet.SegmentationOutput]); ``target`` holds class ids ``(N, H, W)``,
    ``ignore_index`` where unlabelled. Pixels labelled ``ignore_index`` contribute nothing; a batch with no labelled
    pixel gives a zero loss (still connected to the graph) rather than NaN.
    """
    logits = main_logits(output)
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
            "expected (N, H, W) class ids at the logits' resolution"
        )
    target = target.long()
    aux = output.aux_logits if isinstance(output, SegmentationOutput) else None
    if not (target != ignore_index).any():
        # Zero, but every output stays in the graph (distributed training expects gradients for all).
        return logits.sum() * 0.0 + (aux.sum() * 0.0 if aux is not None else 0.0)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
    if aux is not None:
        loss = loss + aux_weight * F.cross_entropy(aux, target, ignore_index=ignore_index)
    return loss

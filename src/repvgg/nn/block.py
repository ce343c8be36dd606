"""The RepVGG building block and its exact conversion to a single 3x3 convolution.

Training time (Ding et al., RepVGG, CVPR 2021, Fig. 4)::

    y = ReLU(SE(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)))

The quantization-friendly block of QARepVGG (Chu et al., "Make RepVGG Greater Again: A
Quantization-aware Approach", AAAI 2024; ``quant_friendly=True``) keeps BN on the 3x3 branch only and
normalises the sum instead, which keeps the fused kernel's range narrow for INT8::

    y = ReLU(BN(BN(conv3x3(x)) + conv1x1(x) + x))

Inference time, after [`RepVGGBlock.reparameterize`][repvgg.nn.block.RepVGGBlock.reparameterize]::

    y = ReLU(SE(conv3x3_with_bias(x)))

Submodule names are those of the official release, because they are the checkpoint format:

==================  ==========================================================
``rbr_dense``       3x3 conv + BN branch (``.conv``, ``.bn``)
``rbr_1x1``         1x1 conv + BN branch (the QA block: no BN), or ``None`` when switched off
``rbr_identity``    identity branch (a BN, or ``nn.Identity`` without BN), or ``None``
``rbr_reparam``     the fused 3x3 conv; present if and only if the block is fused
``se``              squeeze-and-excitation (RepVGG-D2se), ``nn.Identity`` otherwise
``post_bn``         one BN after the branch sum (ablation variant, QA block), or ``None``
==================  ==========================================================
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repvgg.nn.fusion import fold_batchnorm, fold_norm, fuse_conv_bn_modules, identity_kernel, pad_kernel_to

__all__ = ["RepVGGBlock", "SEBlock", "ConvBN", "ConvBNReLU", "aux_head"]


class ConvBN(nn.Sequential):
    """A bias-free convolution followed by BatchNorm (keys ``conv.*`` and ``bn.*``).

    With ``norm=False`` the BN is replaced by ``nn.Identity`` (used by the post-addition-BN variant).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        norm: bool = True,
    ) -> None:
        super().__init__()
        # assigned in order (keys conv.*, bn.*) as typed attributes; Sequential(OrderedDict(...)) leaves them untyped
        self.conv: nn.Conv2d = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=False,
        )
        self.bn: nn.Module = nn.BatchNorm2d(out_channels) if norm else nn.Identity()

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias (float64) of one conv equal to this conv + BN at inference time."""
        return fold_norm(self.conv.weight, self.bn)


class ConvBNReLU(nn.Module):
    """A plain conv, BatchNorm and ReLU (YOLOv6's ``SimConv``) that folds its BN into the conv when reparameterized,
    so that [`reparameterize_model`][repvgg.nn.convert.reparameterize_model] converts a network of these and RepVGG
    blocks into bare convs and ReLUs (keys ``conv.*``, ``bn.*``; after folding ``conv.*`` with a bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, stride: int = 1,
                 deploy: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                              bias=deploy)
        self.bn: nn.Module = nn.Identity() if deploy else nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    @property
    def deploy(self) -> bool:
        """True once the BN is folded into the conv."""
        return isinstance(self.bn, nn.Identity)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BN into the conv (inference-time statistics, float64). Idempotent."""
        if self.deploy:
            return
        self.conv = fuse_conv_bn_modules(self.conv, self.bn)
        self.bn = nn.Identity()


class SEBlock(nn.Module):
    """Squeeze-and-excitation as in the official RepVGG-D2se (keys ``down.*``, ``up.*``).

    Average-pool, 1x1 conv down to ``channels // reduction``, ReLU, 1x1 conv up, sigmoid, scale.
    It acts after the branch sum and before the ReLU, so it is kept as is at conversion.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.down = nn.Conv2d(channels, hidden, 1, bias=True)
        self.up = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = torch.sigmoid(self.up(F.relu(self.down(scale))))
        return x * scale


class RepVGGBlock(nn.Module):
    """A RepVGG block: three parallel branches at training time, one 3x3 conv after fusion.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the 3x3 and 1x1 convs (the 1x1 conv stays aligned with the 3x3 centre).
        groups: groups of the 3x3 and 1x1 convs (RepVGG's g2/g4 variants).
        dilation: dilation of the 3x3 conv; padding follows it so the spatial size is that of a
            plain ``padding=1`` conv at ``dilation=1``.
        use_se: squeeze-and-excitation before the ReLU (RepVGG-D2se).
        post_se: squeeze-and-excitation after the ReLU, a quarter of the channels wide (RepVGGplus's "pse",
            key ``post_se``); kept as it is at conversion, like ``use_se``.
        use_identity: keep the identity branch (it exists only when ``in_channels == out_channels``
            and ``stride == 1``).
        use_1x1: keep the 1x1 branch.
        identity_bn: the identity branch has its own BN (the paper's block); ``False`` gives the
            "identity w/o BN" variant of the paper's Table 7.
        post_bn: no BN inside the branches, one BN after their sum (Table 7's "post-addition BN");
            it still folds into the fused conv.
        quant_friendly: the QARepVGG block (BN on the 3x3 branch, a bare 1x1 conv without bias, a bare
            identity, one BN after the sum); replaces ``identity_bn`` and ``post_bn``.
        deploy: build the inference-time form directly (``rbr_reparam`` only), e.g. to load a
            fused state dict.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        use_se: bool = False,
        post_se: bool = False,
        use_identity: bool = True,
        use_1x1: bool = True,
        identity_bn: bool = True,
        post_bn: bool = False,
        quant_friendly: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("stride", stride), ("groups", groups), ("dilation", dilation)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide both in_channels={in_channels} and out_channels={out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.groups = groups
        self.dilation = dilation
        self.has_identity = use_identity and in_channels == out_channels and stride == 1

        self.se: nn.Module = SEBlock(out_channels) if use_se else nn.Identity()
        self.post_se: nn.Module = SEBlock(out_channels, reduction=4) if post_se else nn.Identity()
        self.nonlinearity = nn.ReLU(inplace=True)  # its input is always a fresh tensor: saves one activation

        self.rbr_reparam: nn.Conv2d | None = None
        self.rbr_dense: ConvBN | None = None
        self.rbr_1x1: ConvBN | None = None
        self.rbr_identity: nn.Module | None = None
        self.post_bn: nn.BatchNorm2d | None = None
        if deploy:
            self.rbr_reparam = self._make_fused_conv()
            return
        if quant_friendly and (post_bn or not identity_bn):
            raise ValueError("quant_friendly sets the block's norms itself; leave identity_bn and post_bn at their "
                             "defaults")
        branch_norm = not post_bn
        self.rbr_dense = ConvBN(
            in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation,
            groups=groups, norm=branch_norm,
        )
        if use_1x1:
            self.rbr_1x1 = ConvBN(in_channels, out_channels, 1, stride=stride, groups=groups,
                                  norm=branch_norm and not quant_friendly)
        if self.has_identity:
            with_bn = identity_bn and branch_norm and not quant_friendly
            self.rbr_identity = nn.BatchNorm2d(out_channels) if with_bn else nn.Identity()
        if post_bn or quant_friendly:
            self.post_bn = nn.BatchNorm2d(out_channels)

    @property
    def deploy(self) -> bool:
        """True once the block is a single fused conv (built with ``deploy=True`` or reparameterized)."""
        return self.rbr_reparam is not None

    def _make_fused_conv(self, *, initialize: bool = True, **factory: Any) -> nn.Conv2d:
        """The block's single 3x3 conv; ``initialize=False`` leaves its memory unset (it is about to be filled)."""
        build = nn.Conv2d if initialize else functools.partial(torch.nn.utils.skip_init, nn.Conv2d)
        return build(self.in_channels, self.out_channels, 3, stride=self.stride, padding=self.dilation,
                     dilation=self.dilation, groups=self.groups, bias=True, **factory)

    def forward(self, x: Tensor) -> Tensor:
        if self.rbr_reparam is not None:
            return self.post_se(self.nonlinearity(self.se(self.rbr_reparam(x))))
        assert self.rbr_dense is not None
        out = self.rbr_dense(x)
        if self.rbr_1x1 is not None:
            out = out + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        if self.post_bn is not None:
            out = self.post_bn(out)
        return self.post_se(self.nonlinearity(self.se(out)))

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The 3x3 kernel and bias of the single conv equal to this block's branches at inference time.

        Differentiable (usable in a training loss, e.g. a penalty on the fused kernel, or for
        quantization-aware training). Uses BN running statistics. The sum
        is formed in float64 and returned in the block's parameter dtype.
        """
        if self.rbr_reparam is not None:
            assert self.rbr_reparam.bias is not None  # the fused conv is always built with a bias
            return self.rbr_reparam.weight, self.rbr_reparam.bias
        assert self.rbr_dense is not None
        dtype = self.rbr_dense.conv.weight.dtype
        kernel, bias = self.rbr_dense.equivalent_kernel_bias()
        if self.rbr_1x1 is not None:
            k1, b1 = self.rbr_1x1.equivalent_kernel_bias()
            kernel = kernel + pad_kernel_to(k1, 3)
            bias = bias + b1
        if self.rbr_identity is not None:
            eye = identity_kernel(self.out_channels, self.groups, 3, device=kernel.device)
            if not isinstance(self.rbr_identity, nn.Identity):
                scale, shift = fold_batchnorm(None, self.rbr_identity)
                eye = eye * scale.reshape(-1, 1, 1, 1)
                bias = bias + shift
            kernel = kernel + eye
        if self.post_bn is not None:
            scale, shift = fold_batchnorm(None, self.post_bn)
            kernel = kernel * scale.reshape(-1, 1, 1, 1)
            bias = bias * scale + shift
        return kernel.to(dtype), bias.to(dtype)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches by one biased 3x3 conv computing the same function (inference-time BN).

        Idempotent: a fused block is left as it is. The new conv lives on the block's device and
        dtype; the branch modules are dropped.
        """
        if self.rbr_reparam is not None:
            return
        kernel, bias = self.equivalent_kernel_bias()
        fused = self._make_fused_conv(initialize=False, device=kernel.device, dtype=kernel.dtype)
        assert fused.bias is not None  # built with bias=True
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        self.rbr_reparam = fused
        self.rbr_dense = None
        self.rbr_1x1 = None
        self.rbr_identity = None
        self.post_bn = None

    @torch.no_grad()
    def load_fused(self, kernel: Tensor, bias: Tensor) -> None:
        """Set this block to compute a fused conv's ``kernel`` and ``bias`` at inference time: the inverse of
        [`reparameterize`][repvgg.nn.block.RepVGGBlock.reparameterize], so that a converted model can train again.

        Every BN passes its input through (mean 0, variance 1 - eps, weight 1, bias 0); the 1x1 and identity
        branches start at zero where they have weights; the 3x3 branch holds the rest (the fused kernel, less the
        QA block's parameter-free identity), and the bias sits in the last BN.
        """
        if self.rbr_reparam is not None:
            self.rbr_reparam.weight.copy_(kernel)
            assert self.rbr_reparam.bias is not None
            self.rbr_reparam.bias.copy_(bias)
            return
        assert self.rbr_dense is not None
        norms = [m for m in (self.rbr_dense.bn, self.rbr_1x1 and self.rbr_1x1.bn, self.post_bn)
                 if isinstance(m, nn.BatchNorm2d)]
        for norm in norms:
            _pass_through(norm, weight=1.0)
        if isinstance(self.rbr_identity, nn.BatchNorm2d):
            _pass_through(self.rbr_identity, weight=0.0)
        if self.rbr_1x1 is not None:
            self.rbr_1x1.conv.weight.zero_()
        self.rbr_dense.conv.weight.zero_()
        rest_kernel, rest_bias = self.equivalent_kernel_bias()  # what has no weights to zero (QA's identity)
        self.rbr_dense.conv.weight.copy_(kernel - rest_kernel)
        norms[-1].bias.copy_(bias - rest_bias)

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}", f"stride={self.stride}"]
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.dilation != 1:
            parts.append(f"dilation={self.dilation}")
        parts.append(f"deploy={self.deploy}")
        return ", ".join(parts)


def _pass_through(norm: nn.BatchNorm2d, *, weight: float) -> None:
    """Set ``norm`` to compute ``weight * x`` at inference time (mean 0, variance 1 - eps, bias 0)."""
    assert norm.running_mean is not None and norm.running_var is not None  # a BN of the block tracks statistics
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0 - norm.eps)
    norm.weight.fill_(weight)
    norm.bias.zero_()


def aux_head(channels: int, num_classes: int) -> nn.Sequential:
    """An auxiliary classifier as RepVGGplus builds it: a stride-2 3x3 conv-BN-ReLU (keys ``0.conv``, ``0.bn``),
    global average pooling, flattening and a linear layer (``3``)."""
    downsample = nn.Sequential()
    downsample.add_module("conv", nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False))
    downsample.add_module("bn", nn.BatchNorm2d(channels))
    downsample.add_module("relu", nn.ReLU())
    return nn.Sequential(downsample, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

"""The RepVGG network: its description ([`RepVGGSpec`][repvgg.nn.model.RepVGGSpec]) and the one module building it.

Five stages of [`RepVGGBlock`][repvgg.nn.block.RepVGGBlock] (the first stage is the single-layer stem); the
first layer of each stage has stride 2; widths ``min(64, 64a), 64a, 128a, 256a, 512b``; global average
pooling and a linear head (Ding et al., RepVGG, CVPR 2021, Sec. 3.4, Table 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from repvgg.limits import MAX_CHANNELS, MAX_STAGE_DEPTH
from repvgg.nn.block import RepVGGBlock, aux_head
from repvgg.nn.fusion import is_batchnorm
from repvgg.options import check_field_types
from repvgg.serialization import DictMixin

__all__ = ["AUX_POSITIONS", "RepVGGSpec", "RepVGG"]

NUM_STAGES = 5
#: Where a training-only auxiliary classifier can sit: after stage 1, after stage 2, after the first half of stage
#: 3 (RepVGGplus's ``stage1_aux``, ``stage2_aux``, ``stage3_first_aux``).
AUX_POSITIONS = ("stage1", "stage2", "stage3_first")


@dataclass(frozen=True)
class RepVGGSpec(DictMixin):
    """Everything that defines a RepVGG architecture, as plain data.

    Attributes:
        depths: layers per stage; stage 0 is the stem (A: 1, 2, 4, 14, 1; B: 1, 4, 6, 16, 1).
        width_multipliers: ``(a, b)``; ``a`` scales stages 0-3, ``b`` the last stage.
        groups: groups of the groupwise layers (1 = dense everywhere).
        groupwise_start: 1-based index of the first groupwise layer, counting the stem as layer 1;
            every second layer after it is groupwise too (the paper's 3rd, 5th, 7th, ...).
        use_se: squeeze-and-excitation in every block (RepVGG-D2se).
        post_se: squeeze-and-excitation after every block's ReLU (RepVGGplus's "pse").
        aux_heads: where training-only auxiliary classifiers sit, among `AUX_POSITIONS` (RepVGGplus:
            after stage 1, after stage 2, after the first half of stage 3); each is a stride-2 3x3
            conv-BN-ReLU, global pooling and a linear layer, and conversion removes them.
        base_widths: widths before scaling (the paper's 64, 64, 128, 256, 512).
        strides: stride of the first layer of each stage.
        dilations: dilation of the 3x3 convs of each stage (used for dense prediction).
        dilated_layers: if set, only the last ``dilated_layers`` layers of the network use their
            stage's dilation (the paper's "fast" segmentation backbones); ``None`` = all of them.
        use_identity, use_1x1, identity_bn, post_bn: training-time branch switches of every
            block (see [`RepVGGBlock`][repvgg.nn.block.RepVGGBlock]); the fused network is the same for all.
        quant_friendly: QARepVGG's quantization-friendly block in every layer (the ``qarepvgg_*``
            models); it also fuses to the same plain network.
    """

    depths: tuple[int, ...]
    width_multipliers: tuple[float, float]
    groups: int = 1
    groupwise_start: int = 3
    use_se: bool = False
    post_se: bool = False
    aux_heads: tuple[str, ...] = ()
    base_widths: tuple[int, ...] = (64, 64, 128, 256, 512)
    strides: tuple[int, ...] = (2, 2, 2, 2, 2)
    dilations: tuple[int, ...] = (1, 1, 1, 1, 1)
    dilated_layers: int | None = None
    use_identity: bool = True
    use_1x1: bool = True
    identity_bn: bool = True
    post_bn: bool = False
    quant_friendly: bool = False

    def __post_init__(self) -> None:
        for name in ("depths", "base_widths", "strides", "dilations", "width_multipliers", "aux_heads"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_field_types(self)  # a spec from a file or a --spec flag: true is a flag, "no" is not
        for name in ("depths", "base_widths", "strides", "dilations"):
            values = getattr(self, name)
            if len(values) != NUM_STAGES or not all(isinstance(v, int) and v >= 1 for v in values):
                raise ValueError(f"{name} must be {NUM_STAGES} positive ints (one per stage), got {values!r}")
        if len(self.width_multipliers) != 2 or not all(0 < m < MAX_CHANNELS for m in self.width_multipliers):
            raise ValueError(f"width_multipliers must be two positive numbers (a, b), got {self.width_multipliers!r}")
        if self.groups < 1 or (self.dilated_layers or 0) < 0:  # their types are checked above
            raise ValueError(f"groups must be >= 1, dilated_layers >= 0, got {self.groups}, {self.dilated_layers}")
        unknown = [h for h in self.aux_heads if h not in AUX_POSITIONS]
        if unknown or len(set(self.aux_heads)) != len(self.aux_heads):
            raise ValueError(f"aux_heads must be distinct positions among {', '.join(AUX_POSITIONS)}, got "
                             f"{self.aux_heads!r}")
        if "stage3_first" in self.aux_heads and self.depths[3] < 2:
            raise ValueError("an auxiliary head after the first half of stage 3 needs at least 2 layers there")
        # Bounds first, so that a file's metadata declaring an absurd network is refused in microseconds.
        if max(self.depths) > MAX_STAGE_DEPTH:
            raise ValueError(f"depths must be at most {MAX_STAGE_DEPTH} layers per stage, got {self.depths!r}")
        if max(self.widths) > MAX_CHANNELS or min(self.widths) < 1:
            raise ValueError(f"the widths {self.widths} (base_widths x width_multipliers) must be between 1 and "
                             f"{MAX_CHANNELS} channels")

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of each stage."""
        a, b = self.width_multipliers
        stem = min(self.base_widths[0], int(self.base_widths[0] * a))
        body = [int(w * a) for w in self.base_widths[1:-1]]
        return (stem, *body, int(self.base_widths[-1] * b))

    @property
    def num_layers(self) -> int:
        return sum(self.depths)

    def layer_configs(self) -> list[dict[str, int]]:
        """Per-layer ``stage``, ``in_channels``, ``out_channels``, ``stride``, ``groups``, ``dilation``."""
        layers: list[dict[str, int]] = []
        in_ch = -1  # filled with in_chans by the network
        first_dilated = self.num_layers - self.dilated_layers if self.dilated_layers is not None else 0
        for stage, (depth, width) in enumerate(zip(self.depths, self.widths)):
            for i in range(depth):
                index = len(layers)
                one_based = index + 1
                groupwise = (
                    self.groups > 1 and one_based >= self.groupwise_start
                    and (one_based - self.groupwise_start) % 2 == 0
                )
                layers.append(dict(
                    stage=stage,
                    in_channels=in_ch,
                    out_channels=width,
                    stride=self.strides[stage] if i == 0 else 1,
                    groups=self.groups if groupwise else 1,
                    dilation=self.dilations[stage] if index >= first_dilated else 1,
                ))
                in_ch = width
        return layers



class RepVGG(nn.Module):
    """A RepVGG network built from a [`RepVGGSpec`][repvgg.nn.model.RepVGGSpec].

    Attribute and state-dict names follow the official release: ``stage0`` (the stem, one block),
    ``stage1`` .. ``stage4`` (``nn.Sequential`` of blocks), ``gap`` and ``linear``.

    Args:
        spec: the architecture.
        num_classes: classifier outputs.
        in_chans: input image channels.
        deploy: build the fused, inference-time form directly.
        features_only: drop the head; ``forward`` returns the feature maps of ``out_indices``.
        out_indices: stage indices (0-4) returned by ``forward`` when ``features_only``
            (strides 2, 4, 8, 16, 32 with the default spec).
        name: registry name (kept for checkpoints and summaries).
        frozen_stages: stages ``0..frozen_stages`` are frozen (no gradients, BN in eval mode); -1 = none.
            With ``norm_eval`` these are mmdetection/mmsegmentation's backbone options.
        norm_eval: keep every BatchNorm in eval mode while training (fine-tuning with small batches).
    """

    # Python-only conveniences TorchScript need not compile (``torch.jit.script`` works on both forms).
    __jit_unused_properties__ = ["deploy", "stages"]
    __jit_ignored_attributes__ = ["feature_info", "spec", "pretrained_cfg", "card", "aux_positions"]

    def __init__(
        self,
        spec: RepVGGSpec,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        deploy: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
        name: str = "repvgg_custom",
        frozen_stages: int = -1,
        norm_eval: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages < NUM_STAGES:
            raise ValueError(f"frozen_stages must be -1 (none) or a stage index 0..{NUM_STAGES - 1}, "
                             f"got {frozen_stages!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: pooled features, no classifier), "
                             f"got {num_classes!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(NUM_STAGES) for i in out_indices):
            raise ValueError(f"out_indices must be stage indices in 0..{NUM_STAGES - 1}, got {out_indices!r}")
        self.spec = spec
        self.name = name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.features_only = features_only
        self.out_indices: list[int] = list(out_indices)
        self.grad_checkpointing = False
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        layers = spec.layer_configs()
        layers[0]["in_channels"] = in_chans
        stages: list[list[RepVGGBlock]] = [[] for _ in range(NUM_STAGES)]
        for cfg in layers:
            stage = cfg.pop("stage")
            stages[stage].append(RepVGGBlock(
                **cfg, use_se=spec.use_se, post_se=spec.post_se, use_identity=spec.use_identity, use_1x1=spec.use_1x1,
                identity_bn=spec.identity_bn, post_bn=spec.post_bn, quant_friendly=spec.quant_friendly,
                deploy=deploy,
            ))
        if len(stages[0]) != 1:
            # The official format stores the stem as a bare block, not a Sequential.
            raise ValueError(f"the stem (stage 0) must have exactly one layer, got depths={spec.depths}")
        self.stage0 = stages[0][0]
        self.stage1 = nn.Sequential(*stages[1])
        self.stage2 = nn.Sequential(*stages[2])
        self.stage3 = nn.Sequential(*stages[3])
        self.stage4 = nn.Sequential(*stages[4])

        reduction = 1
        info = []
        for i, (stride, width) in enumerate(zip(spec.strides, spec.widths)):
            reduction *= stride
            info.append(dict(num_chs=width, reduction=reduction, module=f"stage{i}"))
        self.feature_info = FeatureInfo(info)
        # What timm's data helpers (resolve_model_data_config) read: the official evaluation preprocessing.
        self.pretrained_cfg: dict[str, Any] = dict(
            input_size=(in_chans, 224, 224), interpolation="bilinear", crop_pct=0.875, crop_mode="center",
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=num_classes,
            first_conv="stage0.rbr_dense.conv", classifier="linear",
        )
        self.num_features = spec.widths[-1]
        self.head_hidden_size = self.num_features

        if features_only:
            self.gap = None
            self.linear = None
        else:
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        # Training-only classifiers (RepVGGplus), named as the official release names them.
        self.aux_positions: list[str] = [] if deploy or features_only or num_classes == 0 else list(spec.aux_heads)
        for position in self.aux_positions:
            width = spec.widths[3] if position == "stage3_first" else spec.widths[int(position[-1])]
            setattr(self, f"{position}_aux", aux_head(width, num_classes))
        self._freeze()

    @property
    def stages(self) -> list[nn.Module]:
        return [self.stage0, self.stage1, self.stage2, self.stage3, self.stage4]

    @property
    def deploy(self) -> bool:
        """True when every block is fused and no training-only head is left."""
        return not self.aux_positions and all(b.deploy for b in self.modules() if isinstance(b, RepVGGBlock))

    def reparameterize(self) -> None:
        """Drop the training-only auxiliary heads ([`reparameterize_model`][repvgg.nn.convert.reparameterize_model]
        calls this and fuses every block); the model then returns a tensor in every mode."""
        for position in self.aux_positions:
            delattr(self, f"{position}_aux")
        self.aux_positions = []

    def _freeze(self) -> None:
        for stage in self.stages[: self.frozen_stages + 1]:
            stage.eval()
            for param in stage.parameters():
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> RepVGG:
        """As ``nn.Module.train``, keeping frozen stages and (with ``norm_eval``) every BatchNorm in eval mode."""
        super().train(mode)
        if mode:
            self._freeze()
            if self.norm_eval:
                for module in self.modules():
                    if is_batchnorm(module):
                        module.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory while training."""
        self.grad_checkpointing = enable

    def switch_to_deploy(self) -> None:
        """Fuse every block in place and drop the auxiliary heads (the name other RepVGG code bases' export
        scripts call)."""
        self.reparameterize()
        for module in self.modules():
            if isinstance(module, RepVGGBlock):
                module.reparameterize()

    # --- timm's model interface -------------------------------------------------------------------

    def get_classifier(self) -> nn.Module:
        """The classifier (``nn.Identity`` when built with ``num_classes=0``)."""
        if self.linear is None:
            raise RuntimeError("this model was built with features_only=True and has no classifier head")
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` outputs (0: none, the model returns pooled features)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"RepVGG pools by average only, got global_pool={global_pool!r}")
        if self.features_only:
            raise RuntimeError("this model was built with features_only=True and has no classifier head")
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for position in self.aux_positions:  # the auxiliary classifiers follow the main one
            setattr(self, f"{position}_aux", aux_head(getattr(self, f"{position}_aux")[3].in_features, num_classes))
        if num_classes == 0:
            self.reparameterize()

    @torch.jit.unused
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, as timm's layer-wise learning-rate decay reads them."""
        return dict(stem=r"^stage0\.", blocks=r"^stage(\d+)" if coarse else [(r"^stage(\d+)\.(\d+)", None)])

    @torch.jit.unused
    def _checkpointed(self, x: Tensor, last: int) -> list[Tensor]:
        outputs = []
        for stage in self.stages[: last + 1]:
            blocks = stage if isinstance(stage, nn.Sequential) else [stage]
            for block in blocks:
                x = checkpoint(block, x, use_reentrant=False)
            outputs.append(x)
        return outputs

    def _all_stages(self, x: Tensor, last: int) -> list[Tensor]:
        """The output of every stage up to ``last`` (written out: TorchScript cannot loop over them)."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self._checkpointed(x, last)
        outputs: list[Tensor] = []
        x = self.stage0(x)
        outputs.append(x)
        if last >= 1:
            x = self.stage1(x)
            outputs.append(x)
        if last >= 2:
            x = self.stage2(x)
            outputs.append(x)
        if last >= 3:
            x = self.stage3(x)
            outputs.append(x)
        if last >= 4:
            x = self.stage4(x)
            outputs.append(x)
        return outputs

    def forward_stages(self, x: Tensor, out_indices: list[int] | None = None) -> list[Tensor]:
        """Feature maps after the stages in ``out_indices`` (default: this model's ``out_indices``)."""
        wanted = self.out_indices if out_indices is None else out_indices
        outputs = self._all_stages(x, max(wanted))
        return [outputs[i] for i in wanted]

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map, before pooling."""
        return self._all_stages(x, 4)[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the last feature map and classify it (``pre_logits``: the pooled features only)."""
        if self.gap is None or self.linear is None:
            raise RuntimeError("this model was built with features_only=True and has no classifier head")
        x = torch.flatten(self.gap(x), 1)
        return x if pre_logits else self.linear(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's ``forward_intermediates``: stage feature maps (``indices``: the last n stages, or stage
        indices), and the final feature map unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"RepVGG gives NCHW feature maps, got output_fmt={output_fmt!r}")
        if indices is None:
            wanted = [0, 1, 2, 3, 4]
        elif isinstance(indices, int):
            wanted = list(range(NUM_STAGES - indices, NUM_STAGES))
        else:
            wanted = [i % NUM_STAGES for i in indices]
        last = max(wanted) if (stop_early or intermediates_only) else NUM_STAGES - 1
        outputs = self._all_stages(x, last)
        intermediates = [outputs[i] for i in wanted]
        if intermediates_only:
            return intermediates
        return outputs[-1], intermediates

    @torch.jit.unused
    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's companion of ``forward_intermediates``: drop the stages after the last one needed."""
        wanted = list(range(NUM_STAGES - indices, NUM_STAGES)) if isinstance(indices, int) else list(indices)
        for i in range(max(wanted) + 1, NUM_STAGES):
            setattr(self, f"stage{i}", nn.Sequential())
        if prune_head:
            self.reset_classifier(0)
        return wanted

    @torch.jit.unused
    def forward_with_aux(self, x: Tensor) -> dict[str, Tensor]:
        """The main logits and each auxiliary head's (``main``, ``stage1_aux``, ``stage2_aux``,
        ``stage3_first_aux``), as the official RepVGGplus returns them in training."""
        outputs: dict[str, Tensor] = {}

        def run(blocks: list[nn.Module], x: Tensor) -> Tensor:
            for block in blocks:
                use_checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
                x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
            return x

        x = run([self.stage0, *self.stage1], x)
        for position, blocks in (("stage1", []), ("stage2", list(self.stage2)),
                                 ("stage3_first", list(self.stage3)[: len(self.stage3) // 2])):
            x = run(blocks, x)
            if position in self.aux_positions:
                outputs[f"{position}_aux"] = getattr(self, f"{position}_aux")(x)
        x = run([*list(self.stage3)[len(self.stage3) // 2:], *self.stage4], x)
        return {"main": self.forward_head(x), **outputs}

    def forward(self, x: Tensor) -> Any:
        """The logits (``features_only``: the stage feature maps); in training, a model with auxiliary heads returns
        [`forward_with_aux`][repvgg.nn.model.RepVGG.forward_with_aux]'s dict."""
        if self.features_only:
            return self.forward_stages(x)
        if not torch.jit.is_scripting():  # (TorchScript compiles the inference forward only)
            if self.training and self.aux_positions:
                return self.forward_with_aux(x)
        return self.forward_head(self.forward_features(x))


class FeatureInfo(list):
    """Stage descriptions (``num_chs``, ``reduction``, ``module``) as timm's ``FeatureInfo`` answers them: a
    list of dicts (what timm's feature wrappers read) with ``channels()``, ``reduction()`` and
    ``module_name()``."""

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [info[key] for info in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

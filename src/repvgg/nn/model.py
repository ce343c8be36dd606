"""The RepVGG network: the one module building a [`RepVGGSpec`][repvgg.nn.spec.RepVGGSpec].

Five stages of [`RepVGGBlock`][repvgg.nn.block.RepVGGBlock] (the first stage is the single-layer stem); the
first layer of each stage has stride 2; widths ``min(64, 64a), 64a, 128a, 256a, 512b``; global average
pooling and a linear head (Ding et al., RepVGG, CVPR 2021, Sec. 3.4, Table 2).
"""

# No postponed annotations here: torch.fx copies ``forward``'s annotations into the code it generates, and
# TorchScript cannot read a string there (timm's FX-then-script test).
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from repvgg.nn.block import RepVGGBlock, aux_head
from repvgg.nn.features import FeatureInfo
from repvgg.nn.fusion import is_batchnorm
from repvgg.nn.spec import AUX_POSITIONS, NUM_STAGES, RepVGGSpec

__all__ = ["AUX_POSITIONS", "RepVGGSpec", "RepVGG"]  # the spec re-exported: where users have imported it from


class RepVGG(nn.Module):
    """A RepVGG network built from a [`RepVGGSpec`][repvgg.nn.spec.RepVGGSpec].

    Attribute and state-dict names follow the official release: ``stage0`` (the stem, one block),
    ``stage1`` .. ``stage4`` (``nn.Sequential`` of blocks), ``gap`` and ``linear``.

    Args:
        spec: the architecture.
        num_classes: classifier outputs.
        in_chans: input image channels.
        deploy: build the fused, inference-time form directly.
        features_only: drop the head; ``forward`` returns the feature maps of ``out_indices``.
        out_indices: stage indices (0-4) returned by ``forward`` when ``features_only``
            (strides 2, 4, 8, 16, 32 with the default spec); ``feature_info`` describes these maps.
        global_pool: ``"avg"``, or ``""`` for no pooling: with ``num_classes=0`` the model then returns the last
            stage's unpooled map (timm's convention).
        name: registry name (kept for checkpoints and summaries).
        frozen_stages: stages ``0..frozen_stages`` are frozen (no gradients, BN in eval mode); -1 = none.
            With ``norm_eval`` these are mmdetection/mmsegmentation's backbone options.
        norm_eval: keep every BatchNorm in eval mode while training (fine-tuning with small batches).
    """

    # Python-only conveniences TorchScript need not compile (``torch.jit.script`` works on both forms).
    __jit_unused_properties__ = ["deploy", "stages"]
    __jit_ignored_attributes__ = ["feature_info", "spec", "pretrained_cfg", "default_cfg", "card", "aux_positions"]

    def __init__(
        self,
        spec: RepVGGSpec,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        deploy: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
        global_pool: str = "avg",
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
        if not isinstance(features_only, bool):  # "no" would be true
            raise TypeError(f"features_only must be True or False, got {features_only!r}")
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(NUM_STAGES) for i in out_indices):
            raise ValueError(f"out_indices must be stage indices in 0..{NUM_STAGES - 1}, got {out_indices!r}")
        _check_global_pool(global_pool, num_classes)
        self.spec = spec
        self.name = name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.features_only = features_only
        self.out_indices: list[int] = list(out_indices)
        self.grad_checkpointing = False
        self.aux_outputs = False
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

        reduction, side = 1, 224
        info = []
        for i, (stride, width) in enumerate(zip(spec.strides, spec.widths)):
            reduction, side = reduction * stride, -(-side // stride)  # a padded 3x3 conv of stride s: ceil(n / s)
            info.append(dict(num_chs=width, reduction=reduction, module=f"stage{i}"))
        self.feature_info = FeatureInfo(info, out_indices if features_only else range(NUM_STAGES))
        # What timm reads: its data helpers (resolve_model_data_config) the official evaluation preprocessing, its
        # model tests the architecture and the final map's size at that input.
        self.pretrained_cfg: dict[str, Any] = dict(
            architecture=name, input_size=(in_chans, 224, 224), pool_size=(side, side), interpolation="bilinear",
            crop_pct=0.875, crop_mode="center", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            num_classes=num_classes, first_conv="stage0.rbr_dense.conv", classifier="linear",
        )
        self.default_cfg = self.pretrained_cfg  # the older name timm's tools still read
        self.num_features = spec.widths[-1]
        self.head_hidden_size = self.num_features

        self.global_pool = global_pool
        if features_only:
            self.gap = None
            self.linear = None
        else:
            self.gap = _pooling(global_pool)
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

    def train(self, mode: bool = True) -> "RepVGG":
        """As ``nn.Module.train``, keeping frozen stages and (with ``norm_eval``) every BatchNorm in eval mode."""
        super().train(mode)
        if mode:
            self._freeze()
            if self.norm_eval:
                for module in self.modules():
                    if is_batchnorm(module):
                        module.eval()
        return self

    def set_aux_outputs(self, enable: bool = True) -> None:
        """In training, return the auxiliary heads' logits too (the dict of
        [`forward_with_aux`][repvgg.nn.model.RepVGG.forward_with_aux]), as the official RepVGGplus does; off by default,
        so the model answers with a tensor like any timm model."""
        self.aux_outputs = enable

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
        """A fresh classifier for ``num_classes`` outputs (0: none, the model returns pooled features, or with
        ``global_pool=""`` the unpooled map)."""
        if self.features_only:
            raise RuntimeError("this model was built with features_only=True and has no classifier head")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}")
        self.__dict__.pop("card", None)  # the names a loaded file gave its old outputs
        if global_pool is not None:
            _check_global_pool(global_pool, num_classes)
            self.global_pool, self.gap = global_pool, _pooling(global_pool)
        else:
            _check_global_pool(self.global_pool, num_classes)
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
        """Pool the last feature map and classify it (``pre_logits``: the pooled features only; with
        ``global_pool=""``, the map unpooled)."""
        if self.gap is None or self.linear is None:
            raise RuntimeError("this model was built with features_only=True and has no classifier head")
        if self.global_pool:
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
        wanted = list(range(NUM_STAGES)) if indices is None else _stage_indices(indices)
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
        wanted = _stage_indices(indices)
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
        """The logits (``features_only``: the stage feature maps); in training, after
        [`set_aux_outputs`][repvgg.nn.model.RepVGG.set_aux_outputs], a model with auxiliary heads returns
        [`forward_with_aux`][repvgg.nn.model.RepVGG.forward_with_aux]'s dict."""
        if self.features_only:
            return self.forward_stages(x)
        if not torch.jit.is_scripting():  # (TorchScript compiles the inference forward only)
            if self.training and self.aux_outputs and self.aux_positions:
                return self.forward_with_aux(x)
        return self.forward_head(self.forward_features(x))


def _check_global_pool(global_pool: str, num_classes: int) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    if global_pool == "" and num_classes:
        raise ValueError("global_pool='' leaves the feature map unpooled, which a linear classifier cannot take: "
                         "give num_classes=0 with it")


def _pooling(global_pool: str) -> nn.Module:
    return nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()


def _stage_indices(indices: int | list[int]) -> list[int]:
    """timm's reading of ``indices``: the last n stages (an int), or stage indices (negative ones from the end)."""
    if isinstance(indices, int):
        if isinstance(indices, bool) or not 1 <= indices <= NUM_STAGES:
            raise ValueError(f"indices as a count takes the last 1 to {NUM_STAGES} stages, got {indices!r}")
        return list(range(NUM_STAGES - indices, NUM_STAGES))
    wanted = list(indices)
    if not wanted or any(isinstance(i, bool) or not isinstance(i, int) or not -NUM_STAGES <= i < NUM_STAGES
                         for i in wanted):
        raise ValueError(f"stage indices run from {-NUM_STAGES} to {NUM_STAGES - 1}, got {indices!r}")
    return [i % NUM_STAGES for i in wanted]

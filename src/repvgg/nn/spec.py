"""What defines a RepVGG architecture, as plain data: [`RepVGGSpec`][repvgg.nn.spec.RepVGGSpec] (depths, widths,
groups, SE, strides and dilations, branch switches), checked and bounded when it is made."""

from __future__ import annotations

from dataclasses import dataclass

from repvgg.limits import MAX_CHANNELS, MAX_STAGE_DEPTH
from repvgg.options import check_field_types
from repvgg.serialization import DictMixin

__all__ = ["AUX_POSITIONS", "NUM_STAGES", "RepVGGSpec"]

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

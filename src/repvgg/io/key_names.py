"""The key names of other RepVGG releases (timm, mmpretrain, the official RepVGGplus layout), translated to and from
the official names this package's models use (``stage0.rbr_dense.conv.weight``, ``linear.weight``, ...).

timm's naming: ``stem``, ``stages``, ``conv_kxk``, ``conv_1x1``, ``identity``, ``reparam_conv``, ``attn.fc1``,
``head.fc``; mmpretrain's: ``backbone.stem``, ``backbone.stage_N``, ``branch_3x3`` / ``branch_1x1`` with ``conv`` +
``norm``, ``branch_norm``, ``branch_reparam``, ``se_layer``, ``head.fc``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from torch import Tensor

__all__ = ["timm_to_official", "official_to_timm", "mmpretrain_to_official", "repvggplus_to_official",
           "is_timm_format", "is_mmpretrain_format", "is_repvggplus_format"]

StateDict = dict[str, Tensor]

_TIMM_TO_OFFICIAL: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"^stem\.", "stage0."),
    (r"^stages\.(\d+)\.", lambda m: f"stage{int(m[1]) + 1}."),
    (r"\.conv_kxk\.", ".rbr_dense."),
    (r"\.conv_1x1\.", ".rbr_1x1."),
    (r"\.identity\.", ".rbr_identity."),
    (r"\.reparam_conv\.", ".rbr_reparam."),
    (r"\.attn\.fc1\.", ".se.down."),
    (r"\.attn\.fc2\.", ".se.up."),
    (r"^head\.fc\.", "linear."),
]
_OFFICIAL_TO_TIMM: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"^stage0\.", "stem."),
    (r"^stage(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}."),
    (r"\.rbr_dense\.", ".conv_kxk."),
    (r"\.rbr_1x1\.", ".conv_1x1."),
    (r"\.rbr_identity\.", ".identity."),
    (r"\.rbr_reparam\.", ".reparam_conv."),
    (r"\.se\.down\.", ".attn.fc1."),
    (r"\.se\.up\.", ".attn.fc2."),
    (r"^linear\.", "head.fc."),
]

#: mmpretrain's RepVGG (``backbone.stem``, ``backbone.stage_N``, ``branch_3x3`` / ``branch_1x1`` with
#: ``conv`` + ``norm``, ``branch_norm``, ``branch_reparam``, ``se_layer``, ``head.fc``).
_MMPRETRAIN_TO_OFFICIAL: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"^backbone\.stem\.", "stage0."),
    (r"^backbone\.stage_(\d+)\.", lambda m: f"stage{m[1]}."),
    (r"\.branch_3x3\.norm\.", ".rbr_dense.bn."),
    (r"\.branch_3x3\.", ".rbr_dense."),
    (r"\.branch_1x1\.norm\.", ".rbr_1x1.bn."),
    (r"\.branch_1x1\.", ".rbr_1x1."),
    (r"\.branch_norm\.", ".rbr_identity."),
    (r"\.branch_reparam\.", ".rbr_reparam."),
    (r"\.se_layer\.conv1\.conv\.", ".se.down."),
    (r"\.se_layer\.conv2\.conv\.", ".se.up."),
    (r"^head\.fc\.", "linear."),
]


def _rename(state_dict: Mapping[str, Tensor], rules: list[tuple[str, Any]]) -> StateDict:
    out: StateDict = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def timm_to_official(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Rename a timm RepVGG state dict to the official (and this package's) key names."""
    return _rename(state_dict, _TIMM_TO_OFFICIAL)


def official_to_timm(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Rename official-format keys to timm's RepVGG names (e.g. to load our weights into timm)."""
    return _rename(state_dict, _OFFICIAL_TO_TIMM)


def mmpretrain_to_official(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Rename an mmpretrain RepVGG state dict (classifier or backbone) to the official key names."""
    return _rename(state_dict, _MMPRETRAIN_TO_OFFICIAL)


def is_repvggplus_format(keys: list[str]) -> bool:
    return any(k.startswith(("stage1.blocks.", "stage3_first.blocks.")) for k in keys)


def repvggplus_to_official(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Rename the official RepVGGplus layout (``stageN.blocks.i``, stage 3 split into ``stage3_first`` and
    ``stage3_second``) to this package's (``stageN.i``; ``stage3`` in one, the second half numbered on).

    The auxiliary heads (``stage1_aux`` ...), the post-SE (``post_se``), the stem and the head keep their names.
    """
    first = {int(k.split(".")[2]) for k in state_dict if k.startswith("stage3_first.blocks.")}
    offset = max(first) + 1 if first else 0

    def rename(key: str) -> str:
        match = re.match(r"^stage3_(first|second)\.blocks\.(\d+)\.(.*)$", key)
        if match:
            index = int(match[2]) + (offset if match[1] == "second" else 0)
            return f"stage3.{index}.{match[3]}"
        return re.sub(r"^stage(\d)\.blocks\.", r"stage\1.", key)

    return {rename(k): v for k, v in state_dict.items()}


def is_mmpretrain_format(keys: list[str]) -> bool:
    return any(k.startswith(("backbone.stem.", "backbone.stage_")) for k in keys)


def is_timm_format(keys: list[str]) -> bool:
    return any(k.startswith(("stem.", "stages.")) for k in keys)

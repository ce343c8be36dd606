"""A backbone's feature taps, described as timm describes them: [`FeatureInfo`][repvgg.nn.features.FeatureInfo].

Dense heads (an FPN for detection, pyramid pooling for segmentation) size themselves from it, so it must answer
as timm's ``FeatureInfo`` does: the list holds every stage, and ``channels()`` / ``reduction()`` without an index
answer for the maps ``forward`` returns (``out_indices``), in that order.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["FeatureInfo"]


class FeatureInfo(list):
    """Stage descriptions (``num_chs``, ``reduction``, ``module``), one dict per stage, and the stages a
    features-only model returns (``out_indices``).

    ``channels()``, ``reduction()`` and ``module_name()`` without ``idx`` list the returned stages; with an int or a
    sequence they answer for those stages of the whole network (timm's ``FeatureInfo.get``).
    """

    def __init__(self, info: Iterable[dict[str, Any]], out_indices: Sequence[int]) -> None:
        super().__init__(info)
        if not out_indices or any(not 0 <= i < len(self) for i in out_indices):
            raise ValueError(f"out_indices must be stage indices in 0..{len(self) - 1}, got {tuple(out_indices)!r}")
        self.out_indices = tuple(out_indices)

    def from_other(self, out_indices: Sequence[int]) -> FeatureInfo:
        """The same stages, returning ``out_indices``."""
        return FeatureInfo([dict(info) for info in self], out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self[i][key] for i in self.out_indices]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        """The returned stages' dicts (or those of ``idx``), restricted to ``keys`` when given."""
        def pick(info: dict[str, Any]) -> dict[str, Any]:
            return dict(info) if keys is None else {k: info[k] for k in keys}

        if isinstance(idx, int):
            return pick(self[idx])
        return [pick(self[i]) for i in (self.out_indices if idx is None else idx)]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

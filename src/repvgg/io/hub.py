"""Weights from the Hugging Face hub: timm's RepVGG ImageNet weights, or any ``hf-hub:ORG/REPO`` reference.

Files go through ``huggingface_hub``'s normal cache (``HF_HOME`` / ``HF_HUB_CACHE``), so a file fetched once
is reused offline. Without a network (or with ``HF_HUB_OFFLINE=1``) a file that is not cached yet is a
``FileNotFoundError`` that names the file and the cache folder it is expected in. Needs the ``hub`` extra.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HUB_PREFIX", "OFFICIAL_ONLY", "PRETRAINED", "cached_file", "hub_file", "pretrained_file"]

HUB_PREFIX = "hf-hub:"

#: Registry name -> the hub repository of timm's ImageNet-1k weights (the official release's, converted).
PRETRAINED: dict[str, str] = {
    name: f"timm/{name}.rvgg_in1k"
    for name in ("repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g4", "repvgg_b2",
                 "repvgg_b2g4", "repvgg_b3", "repvgg_b3g4", "repvgg_d2se")
}

#: Registry name -> (file, where it lives) for weights published only by the official release (not on the hub):
#: pass the downloaded file as ``weights=PATH``; it loads as it is, its architecture inferred.
OFFICIAL_ONLY: dict[str, tuple[str, str]] = {
    "repvggplus_l2pse": ("RepVGGplus-L2pse-train256-acc84.06.pth",
                         "the Google Drive and Baidu links of https://github.com/DingXiaoH/RepVGG's README"),
}

_DEFAULT_FILE = "model.safetensors"


def _parts(reference: str) -> tuple[str, str]:
    """``(repo_id, filename)`` of ``hf-hub:ORG/REPO[/FILE]``.

    Raises:
        ValueError: a malformed reference.
    """
    if not reference.startswith(HUB_PREFIX):
        raise ValueError(f"a hub reference starts with {HUB_PREFIX!r}, got {reference!r}")
    parts = reference[len(HUB_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"expected {HUB_PREFIX}ORG/REPO or {HUB_PREFIX}ORG/REPO/FILE, got {reference!r}")
    return "/".join(parts[:2]), "/".join(parts[2:]) or _DEFAULT_FILE


def cached_file(reference: str) -> Path | None:
    """The local file of hub reference ``reference`` if the Hugging Face cache holds it (nothing is downloaded), for
    the output rule: a command never writes over a file it reads, a cached one included. ``None`` otherwise, or
    without ``huggingface_hub``."""
    try:
        repo_id, filename = _parts(reference)
        from huggingface_hub import try_to_load_from_cache
    except (ValueError, ImportError):
        return None
    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


def hub_file(reference: str) -> Path:
    """The local path of ``hf-hub:ORG/REPO`` (its ``model.safetensors``) or ``hf-hub:ORG/REPO/FILE``,
    downloaded into the Hugging Face cache if it is not there yet.

    Raises:
        ValueError: a malformed reference.
        FileNotFoundError: not cached and not downloadable (offline, no network, no such file).
    """
    repo_id, filename = _parts(reference)
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename))
    except (LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError, OSError) as err:
        cache = os.environ.get("HF_HUB_CACHE", constants.HF_HUB_CACHE)
        raise FileNotFoundError(
            f"{filename} of {repo_id} is not in the Hugging Face cache ({cache}) and could not be downloaded "
            f"({type(err).__name__}). On a machine with network: `huggingface-cli download {repo_id} {filename}` "
            f"and copy its cache folder to {cache}, or pass the file itself as weights=PATH."
        ) from err


def pretrained_file(name: str) -> Path:
    """The ImageNet weights file of registered model ``name`` (timm's, from the hub or its cache).

    Raises:
        ValueError: no published weights for ``name`` (the list says which have them).
    """
    if name in OFFICIAL_ONLY:
        filename, where = OFFICIAL_ONLY[name]
        raise ValueError(f"{name}'s ImageNet weights are published by the official release only, as {filename} "
                         f"({where}), not on the Hugging Face hub: download it and pass weights=PATH")
    if name not in PRETRAINED:
        raise ValueError(f"no pretrained weights are published for {name!r}; models with ImageNet weights: "
                         f"{', '.join(sorted(PRETRAINED))}")
    return hub_file(HUB_PREFIX + PRETRAINED[name])

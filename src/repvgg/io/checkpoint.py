"""Resumable training checkpoints: atomic writes and exact RNG state.

A checkpoint is a plain dict of tensors and primitive values (loadable with ``weights_only=True``), written
by [`repvgg.training.engine.fit`][repvgg.training.engine.fit]: ``task`` (the subcommand), ``model`` (official-format
state dict), the task's fields to rebuild the model (``arch``, ``spec``, ``num_classes``, ``in_chans`` for
classification), ``config``, ``optimizer``, ``ema``, ``epoch``, ``step_in_epoch``, ``global_step``,
``best_score``, ``history`` and ``rng``. A classification checkpoint loads with
``repvgg.create_model(..., weights=...)`` / ``repvgg.load_model``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repvgg.io.safe_load import safe_load
from repvgg.serialization import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state"]


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``payload`` atomically: a kill at any moment leaves the previous file intact."""
    # torch.save reports a short write (no space, a file-size limit) as a RuntimeError
    with atomic_write(path, errors=(OSError, RuntimeError)) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], command: str | None = None) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only=True``: no pickled code runs); with ``command``, one that command
    resumes (its ``task``: ``train``, ``seg-train``, ``det-train``, ...)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (pass a run folder or its last.pt)")
    payload = safe_load(path, what="a training checkpoint")
    required = {"model", "optimizer", "config", "epoch", "step_in_epoch", "global_step", "best_score", "history",
                "rng"}
    if not isinstance(payload, dict) or not required <= set(payload):
        raise ValueError(
            f"{path} is not a resumable training checkpoint (needs {sorted(required)}); "
            "to start from its weights use --weights instead of --resume"
        )
    task = payload.get("task", command)
    if command is not None and task != command:
        raise ValueError(f"{path} is a `repvgg {task}` checkpoint; resume it with `repvgg {task} --resume`")
    return payload


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and primitives."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global RandomState is an MT19937, whose legacy state is a tuple
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((
        "MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
        np_state["has_gauss"], np_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

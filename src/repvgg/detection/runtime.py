"""The fastest verified way to run a detector, chosen by measuring, as
[`optimize_for_inference`][repvgg.perf.fast.optimize_for_inference] chooses for classifiers.

The candidates are the whole detector (resize and normalisation, network, decoding, NMS) in PyTorch eager
(channels-last), and its graph as `repvgg export` writes it, run by ONNX Runtime and by OpenVINO where installed.
Each graph must detect what PyTorch does on the sample images
(`repvgg.detection.export.runtime_parity`: the same labels, boxes within 1e-3 px) before it is
timed; the accepted candidates are timed on the same images in interleaved rounds, and the fastest is kept. The graph
is written to a temporary folder that lives as long as the runner (OpenVINO compiles it again for each new image
shape). An exported file weighs ONNX Runtime and OpenVINO the same way, OpenVINO held to ONNX Runtime's detections.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from repvgg.detection.export import onnx_detector, runtime_parity, write_detector_graph
from repvgg.errors import ConversionMismatch
from repvgg.io.onnx_run import ONNX_RUNTIMES, installed_runtimes
from repvgg.measure.timing import choice_timer, time_interleaved

__all__ = ["DETECTOR_RUNTIMES", "DetectorRunner", "detector_runner", "graph_runner"]

log = logging.getLogger(__name__)

#: Where a detector file can run: ``auto`` weighs the others.
DETECTOR_RUNTIMES = ("auto", "pytorch", "onnxruntime", "openvino")
#: Interleaved timed rounds over the sample images when weighing the candidates.
ROUNDS = 3

Detect = Callable[[Tensor], "dict[str, Tensor]"]


@dataclass
class DetectorRunner:
    """One float ``(3, H, W)`` image in [0, 1] in, its ``boxes``, ``scores`` and ``labels`` out, through ``backend``;
    ``reason`` says why it was chosen, ``images_per_s`` what each candidate measured (empty when nothing was
    timed)."""

    run: Detect
    backend: str
    reason: str
    images_per_s: dict[str, float] = field(default_factory=dict)
    folder: Any = None  # the temporary folder holding the graph, kept while the runner lives

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        return self.run(image)


def detector_runner(model: Any, samples: Sequence[Tensor], runtime: str = "auto", *,
                    measure: bool = True) -> DetectorRunner:
    """The runner of the converted, CPU ``model`` in ``runtime`` (one of `DETECTOR_RUNTIMES`): ``auto`` weighs
    PyTorch and the installed ONNX runtimes on ``samples`` (float images in [0, 1], say 2 to 8 of the images to be
    detected) and keeps the fastest whose graph detects what PyTorch does; with ``measure=False`` it is PyTorch.

    Raises:
        ValueError: an unknown ``runtime``, or one that is not installed; no ``samples`` to weigh on.
        ConversionMismatch: the named ONNX runtime does not detect what PyTorch does on ``samples``.
    """
    _check_request(runtime)
    model = model.eval().to(memory_format=torch.channels_last)
    eager = _eager(model)
    weighed = list(installed_runtimes()) if runtime == "auto" and measure else []
    wanted = [runtime] if runtime in ONNX_RUNTIMES else weighed
    if not wanted:
        why = "asked for" if runtime == "pytorch" else "not weighed" if not measure else "no ONNX runtime installed"
        return DetectorRunner(eager, "pytorch", why)
    _require(samples)
    folder = tempfile.TemporaryDirectory(prefix="repvgg-detector-")
    path = Path(folder.name) / "detector.onnx"
    with torch.no_grad():
        write_detector_graph(model, samples[0], path)
    candidates = {} if runtime != "auto" else {"pytorch": eager}
    return _choose(candidates, path, wanted, model, samples, runtime, folder)


def graph_runner(path: str | os.PathLike[str], samples: Sequence[Tensor], runtime: str = "auto", *,
                 measure: bool = True) -> DetectorRunner:
    """The runner of an exported detector graph: ONNX Runtime, or OpenVINO when asked; ``auto`` with ``measure``
    also weighs OpenVINO where installed, held to detecting what ONNX Runtime does on ``samples``.

    Raises:
        ValueError: ``pytorch`` (a graph has no PyTorch form), an unknown runtime or one not installed.
    """
    if runtime == "pytorch":
        raise ValueError("an ONNX detector runs on onnxruntime or openvino; predict its det-train file for pytorch")
    _check_request(runtime)
    if runtime != "auto":
        return DetectorRunner(onnx_detector(path, runtime), runtime, "asked for")
    if not measure or "openvino" not in installed_runtimes():
        return DetectorRunner(onnx_detector(path), "onnxruntime", "the reference runtime of an ONNX file")
    reference = onnx_detector(path)
    candidates = {"onnxruntime": reference}
    return _choose(candidates, Path(path), ["openvino"], lambda images: [reference(images[0])], samples, runtime,
                   None)


def _check_request(runtime: str) -> None:
    if runtime not in DETECTOR_RUNTIMES:
        raise ValueError(f"a detector runs on {', '.join(DETECTOR_RUNTIMES)}, not {runtime!r}")
    if runtime in ONNX_RUNTIMES and runtime not in installed_runtimes():
        raise ValueError(f"{runtime} is not installed; install the deploy extra (pip install 'repvgg[deploy]')")


def _require(samples: Sequence[Tensor]) -> None:
    if not samples:
        raise ValueError("no sample images to check and time the detector's runtimes on")


def _choose(candidates: dict[str, Detect], path: Path, wanted: list[str], reference: Any, samples: Sequence[Tensor],
            runtime: str, folder: Any) -> DetectorRunner:
    """Add each ``wanted`` runtime running ``path`` to ``candidates`` once it detects what ``reference`` does (a
    refused one fails the call when it was named, else it is left out), then keep the fastest."""
    _require(samples)
    for name in wanted:
        run = onnx_detector(path, name)
        try:
            with torch.no_grad():
                runtime_parity(run, name, reference, list(samples))
        except Exception as err:  # noqa: BLE001 - a runtime failing on the graph is refused like a wrong one
            refused = err if isinstance(err, ConversionMismatch) else ConversionMismatch(
                f"{name} could not run the detector's graph on the sample images: {err}")
            if runtime != "auto" and refused is err:
                raise
            if runtime != "auto":
                raise refused from err
            log.info("%s left out: %s", name, refused)
            continue
        candidates[name] = run
    if len(candidates) == 1:
        (name, run), = candidates.items()
        why = "asked for" if runtime != "auto" else "the only runtime that detects as the reference does"
        return DetectorRunner(run, name, why, folder=folder if name != "pytorch" else None)
    return _fastest(candidates, samples, folder)


def _eager(model: Any) -> Detect:
    def run(image: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            return model([image])[0]
    return run


def _fastest(candidates: dict[str, Detect], samples: Sequence[Tensor], folder: Any) -> DetectorRunner:
    """Time ``candidates`` over ``samples`` in interleaved rounds (the first run of each, which compiles, untimed)."""
    calls = {name: (lambda run=run: [run(image) for image in samples]) for name, run in candidates.items()}
    timer, ranked_by = choice_timer(samples[0].device)
    timed = time_interleaved(calls, warmup=1, rounds=ROUNDS, pause_s=0.05, timer=timer)
    speeds = {name: len(samples) / timing.median for name, timing in timed.items()}
    best = max(speeds, key=speeds.__getitem__)
    others = ", ".join(f"{name} {rate:.1f}" for name, rate in speeds.items() if name != best)
    unit = "images/s" if ranked_by == "fastest" else "images per CPU second"
    reason = f"the {ranked_by} that detects as the reference does: {speeds[best]:.1f} {unit} ({others})"
    log.info("detector runtime: %s, %s", best, reason)
    return DetectorRunner(candidates[best], best, reason, speeds, folder if best != "pytorch" else None)

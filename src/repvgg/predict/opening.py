"""How a [`Predictor`][repvgg.predict.predictor.Predictor] opens its artifact: a model file through the fast path
([`optimize_for_inference`][repvgg.perf.fast.optimize_for_inference]), a reduced precision held to the accuracy guard on
the inputs; an ONNX file through ONNX Runtime or OpenVINO, its size and outputs checked. Where many predictors of one
model file start at once (the actors of a Ray cluster), [`export_graph`][repvgg.predict.opening.export_graph] makes the
ONNX graph they build their ONNX runtimes from once."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repvgg.io.card import (ModelCard, Preprocessing, card_from_metadata, load_onnx_proto, read_onnx_metadata,
                            resolve_card)
from repvgg.io.onnx_run import ONNX_RUNTIMES, onnx_runner
from repvgg.limits import MAX_CHANNELS, MAX_IMG_SIZE, check_batch_memory, check_int
from repvgg.quant.guard import Guard

__all__ = ["CALIBRATION_IMAGES", "builds_from_graph", "candidates", "export_graph", "open_onnx", "open_weights"]

logger = logging.getLogger(__name__)

#: Images of the inputs that calibrate INT8 when a model file is asked to run in ``int8`` (as many more judge it).
CALIBRATION_IMAGES = 64


def export_graph(artifact: str | os.PathLike[str], path: str | os.PathLike[str], *, batch_size: int = 32) -> Path:
    """Write to ``path`` the float32 ONNX graph that ``Predictor(artifact, batch_size=batch_size)`` builds its ONNX
    runtimes from (the model fused and prepared as the fast path prepares it), and return ``path``: made once and given
    to each of many predictors (``Predictor(..., graph=path)``), which check every runtime built from it against the
    model as usual."""
    from repvgg.io.export import export_onnx_file
    from repvgg.perf.fast import prepare_for_inference

    _, plain, _, example = _classifier(artifact, batch_size)
    return export_onnx_file(prepare_for_inference(plain, torch.device("cpu")), example, path)


def candidates(runtime: str, dtype: str, measure: bool) -> list[str] | None:
    """The runtimes a model file's predictor weighs (``None``: the fast path's defaults)."""
    if runtime != "auto":
        return [runtime]
    if not measure and dtype == "float32":
        return ["eager"]  # for a few images, building another runtime costs more than it saves
    return None


def builds_from_graph(runtime: str, dtype: str, measure: bool) -> bool:
    """Whether a model file's predictor builds a runtime from its ONNX graph (an ONNX runtime is among its
    [`candidates`][repvgg.predict.opening.candidates])."""
    from repvgg.perf.runtimes import default_candidates

    return any(name in ONNX_RUNTIMES for name in candidates(runtime, dtype, measure) or default_candidates("cpu"))


def _classifier(path: Path | str | os.PathLike[str], batch_size: int) -> tuple[Any, Any, ModelCard, Tensor]:
    """The classifier in a model file (as loaded, and fused), its card, and the example batch its runtimes are built
    and weighed at (``batch_size`` bounded by this machine's memory)."""
    from repvgg.io.loading import load_model, model_card
    from repvgg.nn.convert import reparameterize_model

    model = load_model(path).eval()
    if getattr(model, "features_only", False) or not getattr(model, "num_classes", 0):
        raise ValueError(f"{path} holds a backbone without a classifier; predict needs a model with its head")
    card = model_card(model)
    size = card.preprocessing.img_size
    check_batch_memory(batch_size, (model.in_chans, size, size), "--batch-size")
    plain = reparameterize_model(model) if not model.deploy else model
    return model, plain, card, torch.randn(batch_size, model.in_chans, size, size,
                                           generator=torch.Generator().manual_seed(0))


def open_weights(path: Path | str, runtime: str, dtype: str, device: str, batch_size: int, measure: bool,
                 calibration_images: Callable[[Preprocessing], Tensor], guard: Guard,
                 graph: str | os.PathLike[str] | None
                 ) -> tuple[ModelCard, Callable[[Tensor], Tensor], str, str, str, str]:
    """A model file through the fast path: ``(card, runner, backend, dtype, why it was chosen, model name)``; the
    ONNX runtimes built from ``graph`` when given ([`export_graph`][repvgg.predict.opening.export_graph])."""
    from repvgg.perf.fast import optimize_for_inference
    from repvgg.training.distributed import resolve_device

    target = resolve_device(device)
    model, plain, card, example = _classifier(path, batch_size)
    calibration = validation = None
    if dtype != "float32":  # a reduced precision is held to the guard on the inputs; INT8 calibrates on them too
        calibration, validation = _reduced_precision_evidence(plain, calibration_images(card.preprocessing))
        calibration = calibration if dtype in ("int8", "auto") else None
    runner = optimize_for_inference(plain, example.to(target), dtype=dtype, calibration=calibration,
                                    validation=validation, candidates=candidates(runtime, dtype, measure),
                                    measure=measure,
                                    min_agreement=guard.min_agreement, max_top1_drop=guard.max_top1_drop, graph=graph)
    precision = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(runner.dtype,
                                                                                                  "int8")

    def run(batch: Tensor) -> Tensor:
        return runner(batch.to(target)).float().cpu()

    return card, run, runner.backend, precision, runner.reason, str(getattr(model, "name", None) or "model")


def _reduced_precision_evidence(plain: torch.nn.Module, images: Tensor
                                ) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """INT8's calibration batches and the guard's validation batches from prepared ``images`` (spread over the inputs),
    labelled with the float32 model's own predictions (what INT8 must agree with): every other image calibrates and
    the rest judge, so both come from every part of the inputs; with no more than `CALIBRATION_IMAGES`, every
    image does both, and the log says so."""
    if len(images) > CALIBRATION_IMAGES:
        calibrate, judge = images[0::2], images[1::2]
    else:
        calibrate = judge = images
        logger.warning("the reduced precision is judged on the %d image(s) INT8 would calibrate on (more than %d "
                       "inputs give it images of its own)", len(images), CALIBRATION_IMAGES)
    with torch.no_grad():
        labels = plain(judge).argmax(1)
    return [calibrate], [(judge, labels)]


def open_onnx(path: Path, runtime: str, dtype: str, batch_size: int
               ) -> tuple[ModelCard, Callable[[Tensor], Tensor], str, str, str]:
    """An ONNX file through ONNX Runtime (or OpenVINO): ``(card, runner, backend, dtype, why)``."""
    if dtype != "float32":
        raise ValueError(f"an ONNX file runs in the precision it was written in; --dtype {dtype} applies to model "
                         "files (quantize to INT8 with `repvgg quantize`)")
    backend = "onnxruntime" if runtime == "auto" else runtime
    if backend not in ONNX_RUNTIMES:
        raise ValueError(f"an ONNX file runs on {' or '.join(ONNX_RUNTIMES)}, not {runtime}")
    from repvgg.quant.qdq import quantized_conv_count

    metadata = read_onnx_metadata(path)
    batch, channels, height, width, input_type = _onnx_input(path)
    _, recorded = card_from_metadata(metadata, path, None)  # the size the file says it takes, checked
    size = height or width or (recorded.img_size if recorded else 224)
    # what one forward pass of the graph's own batch allocates, bounded before the probe runs it
    check_batch_memory(batch or 1, (channels or 3, size, size), f"{path}: the graph's batch")
    runner = onnx_runner(path, backend)
    probe = runner(torch.zeros(batch or 1, channels or 3, size, size))
    if not isinstance(probe, Tensor) or probe.dim() != 2:
        raise ValueError(f"{path} does not look like a classifier: its output is not one (batch, classes) tensor")
    card = resolve_card(metadata, path, int(probe.shape[1]), default=Preprocessing(img_size=size))
    if height and card.preprocessing.img_size not in (height, width):
        raise ValueError(f"{path}: metadata field 'preprocessing' gives img_size {card.preprocessing.img_size}, but "
                         f"the graph takes {height}x{width} inputs; the file is inconsistent")
    check_batch_memory(batch_size, (channels or 3, card.preprocessing.img_size, card.preprocessing.img_size),
                       "--batch-size")
    precision = "int8" if quantized_conv_count(path)[0] else input_type
    return card, runner, backend, precision, "an ONNX file runs on " + backend


def _onnx_input(path: Path) -> tuple[int | None, int | None, int | None, int | None, str]:
    """The first input's static batch, channels, height and width (``None`` where dynamic), each checked to be a
    size this package runs (a channel count up to `MAX_CHANNELS`, sides from 8 to `MAX_IMG_SIZE`), and its type."""
    import onnx

    tensor_type = load_onnx_proto(path).graph.input[0].type.tensor_type
    values = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if len(values) != 4:
        raise ValueError(f"{path} takes a {len(values)}-d input; an image classifier takes (batch, 3, H, W)")
    batch, channels, height, width = values
    for value, name, low, high in ((batch, "batch", 1, None), (channels, "channels", 1, MAX_CHANNELS),
                                   (height, "height", 8, MAX_IMG_SIZE), (width, "width", 8, MAX_IMG_SIZE)):
        if value is not None:
            check_int(value, f"{path}: the input's {name}", low=low, high=high)
    return batch, channels, height, width, "float16" if tensor_type.elem_type == onnx.TensorProto.FLOAT16 \
        else "float32"

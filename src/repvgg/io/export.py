"""ONNX export of the converted (plain) model, checked with the ONNX checker and run with ONNX Runtime.

The deployed RepVGG is a stack of 3x3 convs and ReLUs, which every inference runtime handles well; the
exported graph has a dynamic batch dimension. ``onnx`` and ``onnxruntime`` are imported only here,
inside the functions, so ``import repvgg`` needs torch alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repvgg.errors import ConversionMismatch, RunFailed
from repvgg.io.config import ExportConfig
from repvgg.io.onnx_run import onnxruntime_session
from repvgg.limits import MIN_OPSET, check_batch_memory, check_int
from repvgg.nn.convert import (CONVERSION_TOLERANCE, OutputDeviation, check_conversion, is_reparameterizable,
                               reparameterize_model)
from repvgg.serialization import check_output_path, commit_staged, make_folder, staging_folder

__all__ = ["ExportReport", "export_onnx", "export_onnx_file", "needs_conversion", "noticing_interrupts",
           "onnxruntime_session", "resolve_model"]

log = logging.getLogger(__name__)

#: Largest relative deviation of an FP16 export from the float32 model (half precision keeps ~3 digits).
FP16_TOLERANCE = 1e-2

#: Models larger than this keep their weights in a separate file (protobuf's 2 GiB limit).
_EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass(frozen=True)
class ExportReport:
    """What [`export_onnx`][repvgg.io.export.export_onnx] wrote and how closely ONNX Runtime reproduced PyTorch."""

    path: str
    converted: bool
    input_shape: tuple[int | str, ...]
    dtype: str
    check_sizes: list[int]
    check_batch_size: int
    max_abs_diff: float
    max_rel_diff: float
    relative_error: float
    opset: int
    metadata: tuple[str, ...] = ()  # what the file records of its use (``classes``, ``preprocessing``)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def needs_conversion(model: nn.Module) -> bool:
    """True if ``model`` still has unfused blocks (a training-time model)."""
    return any(is_reparameterizable(m) and not getattr(m, "deploy", False) for m in model.modules())


def resolve_model(model_or_path: nn.Module | str | os.PathLike[str], *, num_classes: int | None = None) -> nn.Module:
    """A model from a module, a checkpoint file, or a registered name (random weights, said in the log).

    Raises:
        ValueError: if ``model_or_path`` is neither an existing file nor a registered model name.
    """
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    from repvgg.io.loading import load_model
    from repvgg.nn.registry import build_model

    path = Path(model_or_path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name a model file (of a run folder: {path / 'deploy.safetensors'} or "
                         f"{path / 'best.pt'}) or a registered model name")
    if path.is_file():
        model = load_model(path)
        if num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
            raise ValueError(f"{path} has {model.num_classes} classes, not the requested {num_classes}")
        return model
    name = str(model_or_path)
    if any(sep in name for sep in (os.sep, ".pth", ".pt", ".safetensors")):
        raise FileNotFoundError(f"checkpoint {name!r} does not exist")
    model = build_model(name, num_classes=1000 if num_classes is None else num_classes)
    log.info("%s: no checkpoint given, exporting randomly initialised weights", name)
    return model


def _input_channels(model: nn.Module) -> int:
    in_chans = getattr(model, "in_chans", None)
    if isinstance(in_chans, int):
        return in_chans
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError(f"cannot tell the input channels of {type(model).__name__}; pass an example input")


@contextlib.contextmanager
def _quiet_exporter_logs(level: int = logging.WARNING) -> Iterator[None]:
    """Hold the exporter's own INFO chatter (graph-pass statistics) back from the caller's log."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


def export_onnx_file(
    model: nn.Module,
    example: Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_hw: bool = False,
) -> Path:
    """Export ``model`` (as it is, in eval mode) to ``path`` with ``torch.onnx.export``.

    The batch dimension is dynamic by default; ``dynamic_hw`` makes height and width dynamic too. The graph of a
    dynamic batch does not depend on the batch it is traced at (the checks of it on a real batch would show one that
    did), so it is traced at two rows of ``example`` (a batch-1 example doubled: ``torch.export`` specialises sizes
    0 and 1): writing A0's graph at 224 x 224 for a batch of 32 (``predict``'s and ``serve``'s) took 2.25 s of CPU
    traced at all 32 rows and 0.96 s at two, on a 2-core AVX2 EPYC. Every caller checks the file it keeps, or each
    runtime it builds from it, on a real batch. Uses the TorchScript-based exporter and falls back to the
    ``torch.export``-based one if that fails. Models over ~1.8 GB keep weights in a side file (written by the
    second).
    """
    path = make_folder(Path(path).parent) / Path(path).name
    model = model.eval()
    if dynamic_batch:
        example = example[:2] if example.shape[0] >= 2 else torch.cat([example, example])
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = nbytes > _EXTERNAL_DATA_BYTES
    with noticing_interrupts() as interrupted:
        _export(model, example, path, opset=opset, dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw,
                external=external, interrupted=interrupted)
    if interrupted:  # an interrupt the exporter caught and carried on after
        raise KeyboardInterrupt("interrupted during the ONNX export")
    return path


@contextlib.contextmanager
def noticing_interrupts() -> Iterator[list[int]]:
    """Note a SIGINT that arrives in the block to stop the program (and let it raise as usual): the exporter catches
    much of what happens inside it, an interrupt included, and neither it nor the fallback must carry on after one. A
    handler of the caller's (a run finishing its files first) keeps its say; an ignored SIGINT stays ignored."""
    import signal
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.getsignal(signal.SIGINT)

    def note(signum: int, frame: Any) -> None:
        if previous in (signal.default_int_handler, signal.SIG_DFL):  # an interrupt that stops the program
            received.append(signum)
            raise KeyboardInterrupt
        if callable(previous):  # a handler of the caller's (a run finishing its files first): its decision
            previous(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _export(model: nn.Module, example: Tensor, path: Path, *, opset: int | None, dynamic_batch: bool,
            dynamic_hw: bool, external: bool, interrupted: list[int]) -> None:
    """The TorchScript-based exporter (as detectors and segmenters are written), else the ``torch.export``-based one,
    unless the user interrupted the first. On a plain network they write the same convolutions; the first takes
    about 0.05 s where the second takes 1-3 s (it rebuilds its operator table on every call), a cost each ``predict``
    and each server start paid. The second writes what the first cannot: an opset newer than it knows (24 and up
    with PyTorch 2.14), weights in a side file (``external``), and graphs in a PyTorch that no longer ships the
    first."""
    exporters = [_torch_export] if external else [_torchscript_export, _torch_export]
    for i, exporter in enumerate(exporters):
        try:
            exporter(model, example, path, opset=opset, dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw,
                     external=external)
            return
        except Exception as err:  # noqa: BLE001 - an exporter fails in many ways; the next one is tried
            if interrupted:
                raise KeyboardInterrupt("interrupted during the ONNX export; nothing was written") from err
            if i == len(exporters) - 1:
                raise
            log.info("the TorchScript-based ONNX export failed (%s: %s); using the torch.export-based exporter",
                     type(err).__name__, err)


def _torchscript_export(model: nn.Module, example: Tensor, path: Path, *, opset: int | None, dynamic_batch: bool,
                        dynamic_hw: bool, external: bool) -> None:
    import warnings

    axes = {0: "batch"} if dynamic_batch else {}
    if dynamic_hw:
        axes |= {2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # its notice that it is the older of the two exporters
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset or MIN_OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": axes, "output": {0: "batch"} if dynamic_batch else {}} if axes
                          else None)


def _torch_export(model: nn.Module, example: Tensor, path: Path, *, opset: int | None, dynamic_batch: bool,
                  dynamic_hw: bool, external: bool) -> None:
    from torch.export import Dim

    dims = {0: Dim("batch", min=1)} if dynamic_batch else {}
    if dynamic_hw:
        dims |= {2: Dim("height", min=8, max=16384), 3: Dim("width", min=8, max=16384)}
    # The exporter reports progress on stdout even when quiet; stdout belongs to the caller's table.
    with contextlib.redirect_stdout(io.StringIO()), _quiet_exporter_logs(), torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, opset_version=opset,
                                    dynamic_shapes=(dims,) if dims else None, input_names=["input"],
                                    output_names=["output"])
    if program is None:
        raise RuntimeError("the torch.export-based exporter returned no program")
    program.save(str(path), external_data=external)


def _written_opset(path: Path, requested: int | None) -> int:
    """The default-domain opset of the file at ``path``; a RunFailed if it is not the ``requested`` one."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
    if requested is not None and used != requested:
        raise RunFailed(f"the exporter wrote opset {used}, not the requested {requested}; nothing was written")
    return used


@torch.no_grad()
def _onnxruntime_parity(path: Path, model: nn.Module, sizes: list[int], batch_size: int,
                        dtype: torch.dtype) -> tuple[OutputDeviation, float]:
    """ONNX Runtime running ``path`` against the float32 ``model`` on random batches at each of ``sizes``:
    the deviation and the largest absolute reference output."""
    session = onnxruntime_session(path)
    channels = _input_channels(model)
    deviation, scale = OutputDeviation(), 0.0
    for size in sizes:  # a dynamic-size file is checked at two sizes
        batch = torch.randn(batch_size, channels, size, size, generator=torch.Generator().manual_seed(size))
        outputs = session.run(None, {session.get_inputs()[0].name: batch.to(dtype).numpy()})
        expected = model(batch)  # the float32 model is the reference, for an FP16 export too
        expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
        if len(outputs) != len(expected):
            raise ConversionMismatch(f"ONNX Runtime returned {len(outputs)} outputs, PyTorch {len(expected)}; "
                                     "nothing was written")
        for o, e in zip(outputs, expected):
            deviation.update(e, torch.from_numpy(o).float())
            scale = max(scale, float(e.abs().max()))
    return deviation, scale


@torch.no_grad()
def export_onnx(
    model_or_path: nn.Module | str | os.PathLike[str],
    path: str | os.PathLike[str],
    config: ExportConfig | None = None,
    **options: Any,
) -> ExportReport:
    """Export the converted model to ONNX, check the file, and compare ONNX Runtime with PyTorch.

    A training-time model is converted first ([`repvgg.reparameterize_model`][repvgg.nn.convert.reparameterize_model], a
    copy; the log says so). The file has a dynamic batch dimension and carries the class names and preprocessing the
    model's file records (`repvgg.io.card`, in ``metadata_props``); it is validated with ``onnx.checker`` and run
    with ONNX Runtime on a random batch of ``check_batch_size`` images (a size other than the one
    traced), and the deviation from the PyTorch output is reported. The file is written in a
    temporary folder beside ``path`` and moved into place only when the ONNX Runtime outputs are finite
    and within [`CONVERSION_TOLERANCE`][repvgg.nn.convert.CONVERSION_TOLERANCE] of PyTorch's (relative); the caller's
    model is not modified.

    Args:
        model_or_path: an ``nn.Module``, a checkpoint file (any format
            [`repvgg.load_model`][repvgg.io.loading.load_model] reads) or a registered model name (random weights).
        path: the ``.onnx`` file to write.
        config: the options ([`ExportConfig`][repvgg.io.config.ExportConfig]): ``img_size`` (default: the size the
            model's file records, else 224), ``opset`` (from
            [`MIN_OPSET`][repvgg.limits.MIN_OPSET] to the newest the installed ``onnx`` knows; the file is checked
            to have it), ``num_classes`` of a model built by name, ``dynamic_hw`` (checked at ``img_size``
            and a second size), ``fp16`` (compared with the float32 model within `FP16_TOLERANCE`),
            ``check_batch_size`` and ``overwrite``.
        **options: fields of ``config`` to replace, e.g. ``export_onnx(model, "m.onnx", img_size=32)``.

    Raises:
        ValueError: bad arguments, or ``path`` is a folder, the input, or (without ``overwrite``) an existing
            file ([`check_output_path`][repvgg.serialization.check_output_path]).
        ConversionMismatch: ONNX Runtime does not reproduce the model; nothing is written.
    """
    import onnx

    from repvgg.io.card import write_onnx_metadata
    from repvgg.io.loading import model_card

    cfg = dataclasses.replace(config or ExportConfig(), **options)
    opset, fp16, dynamic_hw, check_batch_size = cfg.opset, cfg.fp16, cfg.dynamic_hw, cfg.check_batch_size
    if opset is not None:
        check_int(opset, "opset", low=MIN_OPSET, high=onnx.defs.onnx_opset_version())
    reads = [] if isinstance(model_or_path, nn.Module) else [model_or_path]
    path = check_output_path(path, reads=reads, overwrite=cfg.overwrite, suffixes=(".onnx",))
    model = resolve_model(model_or_path, num_classes=cfg.num_classes)
    card = model_card(model)
    img_size = cfg.img_size or card.preprocessing.img_size  # the size it was trained and evaluated at
    if img_size != card.preprocessing.img_size:  # the file records the size it takes, as quantize's does
        card = dataclasses.replace(card, preprocessing=dataclasses.replace(card.preprocessing, img_size=img_size))
    converted = needs_conversion(model)
    if converted:
        log.info("the model is in training-time form: converting it to the plain form before export")
        model = reparameterize_model(model)
    elif model is model_or_path:
        model = copy.deepcopy(model)  # .eval().float().cpu() below must not change the caller's model
    model = model.eval().float().cpu()
    exported = copy.deepcopy(model).half() if fp16 else model
    dtype = torch.float16 if fp16 else torch.float32
    channels = _input_channels(model)
    check_batch_memory(max(2, check_batch_size), (channels, img_size, img_size), "the check batch")
    example = torch.randn(2, channels, img_size, img_size, dtype=dtype)
    sizes = [img_size, img_size + max(8, img_size // 2)] if dynamic_hw else [img_size]
    with staging_folder(path) as staging:
        # Exported and checked under the final name in a staging folder (external weight files keep
        # their relative name), moved into place only once ONNX Runtime reproduced the model.
        staged = export_onnx_file(exported, example, Path(staging) / path.name, opset=opset,
                                  dynamic_hw=dynamic_hw)
        if card.metadata():
            write_onnx_metadata(staged, card.metadata())
        onnx.checker.check_model(str(staged))
        opset_used = _written_opset(staged, opset)
        deviation, scale = _onnxruntime_parity(staged, model, sizes, check_batch_size, dtype)
        check_conversion(deviation.relative, "the ONNX export (run by ONNX Runtime)",
                         tolerance=FP16_TOLERANCE if fp16 else CONVERSION_TOLERANCE)
        for staged_file in Path(staging).iterdir():
            commit_staged(staged_file, path)
    max_abs = deviation.max_abs_diff
    report = ExportReport(
        path=str(path),
        converted=converted,
        input_shape=("batch", channels, "height", "width") if dynamic_hw else ("batch", channels, img_size, img_size),
        dtype="float16" if fp16 else "float32",
        check_sizes=sizes,
        check_batch_size=check_batch_size,
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / max(scale, 1e-12),
        relative_error=deviation.relative,
        opset=opset_used,
        metadata=tuple(card.metadata()),
    )
    log.debug("wrote %s (opset %d); ONNX Runtime vs PyTorch on a batch of %d: max |diff| %.3g",
             path, opset_used, check_batch_size, report.max_abs_diff)
    return report

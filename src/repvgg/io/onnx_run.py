"""Running ONNX files: ONNX Runtime sessions and OpenVINO compiled models, configured alike and wrapped as
callables from a float32 batch to output tensors.

Both use one thread per thread PyTorch uses (their defaults are the physical core count, which oversubscribes
a machine that runs anything else) and run the same files: the float32 graph and its QDQ INT8 version, which
each fuses into INT8 convolutions (VNNI or AMX where the CPU has them).

How their worker threads wait between calls is a property of the process, as PyTorch's thread count is: see
[`share_cores`][repvgg.io.onnx_run.share_cores].
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["ONNX_RUNTIMES", "cores_shared", "installed_runtimes", "onnx_runner", "onnxruntime_session",
           "openvino_model", "share_cores"]

#: The runtimes that run this package's ONNX files.
ONNX_RUNTIMES = ("onnxruntime", "openvino")

_sharing = {"cores": False}


def share_cores(shared: bool = True) -> None:
    """Whether the sessions and compiled models made from now on leave the cores to the process's other threads.

    By default (``False``) they keep them: ONNX Runtime's workers spin between calls and OpenVINO pins its threads
    to cores, the lowest latency for a process that does nothing else. A process whose other threads need the cores
    while the model waits (a server decoding uploads, parsing requests and answering them) shares them: ONNX
    Runtime's workers sleep at once, and OpenVINO's threads may move between cores. ``repvgg serve`` shares them: on
    two cores, spinning workers cut a small model's requests per second by a third (docs/serving.md)."""
    _sharing["cores"] = bool(shared)


def cores_shared() -> bool:
    """What [`share_cores`][repvgg.io.onnx_run.share_cores] last set (``False`` until it is called)."""
    return _sharing["cores"]


def installed_runtimes() -> tuple[str, ...]:
    """The runtimes of `ONNX_RUNTIMES` installed here: what an exported file is checked in before it is written (each
    compiles a graph its own way, and ``predict`` runs it with either)."""
    import importlib.util

    return tuple(name for name in ONNX_RUNTIMES if importlib.util.find_spec(name) is not None)


def onnxruntime_session(path: str | os.PathLike[str], *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for ``path``: one intra-op thread per core PyTorch uses (its default is
    the physical core count), no inter-op parallelism (a conv net is a chain; oversubscribing a small CPU
    is slower), every graph optimisation (QDQ pairs around a conv become one INT8 conv)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if cores_shared():
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def _keep_signal_stack() -> Iterator[None]:
    """Restore the calling thread's alternate signal stack after the block.

    OpenVINO's CPU plugin installs an alternate signal stack of its own on the thread that compiles a model and
    puts back the one it found when that model is destroyed. Two models destroyed in another order than they
    were made leave the thread on a stack that has been freed, and the next signal with a handler (a child
    process exiting under PyTorch's DataLoader handler, Ctrl-C during training) kills the process. Putting the
    previous stack back at once means OpenVINO only ever saves, and restores, a stack that stays valid.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sigaltstack = libc.sigaltstack
    except (OSError, AttributeError):  # not a POSIX libc
        yield
        return
    saved = _StackT()
    if sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        sigaltstack(ctypes.byref(saved), None)


def openvino_model(path: str | os.PathLike[str], *, precision_hint: str = "f32", threads: int | None = None,
                   shape: list[int] | None = None) -> Any:
    """``path`` compiled by OpenVINO for the CPU: latency mode, ``precision_hint`` (``"f32"`` or ``"bf16"``; a
    QDQ graph runs its INT8 parts in INT8 either way), one thread per PyTorch thread; with ``shape``, for that shape
    of its (one) input alone, which OpenVINO runs faster than a graph of dynamic shapes."""
    import openvino

    core = openvino.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision_hint,
              "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
    if cores_shared():
        config["ENABLE_CPU_PINNING"] = False
    model = core.read_model(os.fspath(path))
    if shape is not None:
        model.reshape({model.inputs[0].any_name: shape})
        _drop_identity_resizes(model)
    with _keep_signal_stack():
        return core.compile_model(model, "CPU", config)


def _drop_identity_resizes(model: Any) -> None:
    """Bypass every resize of ``model`` whose static output shape is its input's. Sampled at the same size, every
    interpolation mode reads each pixel where it is (half-pixel, asymmetric and corner-aligned coordinates all map
    ``i`` to ``i``), so the bypass is exact; OpenVINO would otherwise run it: a detector's resize of an image already
    at its size took a fifth of its INT8 time at 320 x 320 (docs/detection.md)."""
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Interpolate":
            continue
        before, after = op.input(0).get_partial_shape(), op.output(0).get_partial_shape()
        padded = any(any(op.get_attributes().get(side, ())) for side in ("pads_begin", "pads_end"))
        if before.is_static and after.is_static and before == after and not padded:
            op.output(0).replace(op.input_value(0))


def onnx_runner(path: str | os.PathLike[str], runtime: str = "onnxruntime", *,
                precision_hint: str = "f32") -> Callable[[Tensor], Any]:
    """A callable running ``path`` through ``runtime`` (one of `ONNX_RUNTIMES`): a float32 batch in (cast to
    the file's input type, e.g. float16), its output tensor (or a list, for several outputs) out, in float32.

    A file exported with a fixed batch size (``torch.onnx.export``'s default) takes any batch: it is run in slices
    of its size, the last one padded."""
    if runtime == "onnxruntime":
        session = onnxruntime_session(path)
        name = session.get_inputs()[0].name
        half = session.get_inputs()[0].type == "tensor(float16)"

        def run_onnxruntime(x: Tensor) -> Any:
            x = x.detach().to(torch.float16 if half else torch.float32).contiguous()
            outputs = [torch.from_numpy(o).float() for o in session.run(None, {name: x.numpy()})]
            return outputs[0] if len(outputs) == 1 else outputs

        return _any_batch(run_onnxruntime, session.get_inputs()[0].shape[0])
    if runtime == "openvino":
        compiled = openvino_model(path, precision_hint=precision_hint)
        request, outputs = compiled.create_infer_request(), compiled.outputs

        def run_openvino(x: Tensor) -> Any:
            result = request.infer({0: x.detach().float().contiguous().numpy()})
            tensors = [torch.from_numpy(result[o].copy()).float() for o in outputs]
            return tensors[0] if len(tensors) == 1 else tensors

        batch = compiled.inputs[0].get_partial_shape()[0]
        return _any_batch(run_openvino, batch.get_length() if batch.is_static else None)
    raise ValueError(f"unknown ONNX runtime {runtime!r}; choose from {', '.join(ONNX_RUNTIMES)}")


def _any_batch(run: Callable[[Tensor], Any], fixed: Any) -> Callable[[Tensor], Any]:
    """``run`` for any batch size: as it is when the graph's batch is dynamic, else in slices of ``fixed`` images
    (the last one padded with zeros, its padding dropped from the outputs)."""
    if not isinstance(fixed, int) or fixed < 1:
        return run

    def run_in_slices(x: Tensor) -> Any:
        if x.shape[0] == fixed:
            return run(x)
        parts = []
        for start in range(0, x.shape[0], fixed):
            part = x[start: start + fixed]
            missing = fixed - part.shape[0]
            if missing:
                part = torch.cat([part, part.new_zeros((missing, *part.shape[1:]))])
            output = run(part)
            outputs = output if isinstance(output, list) else [output]
            parts.append([o[: fixed - missing] for o in outputs])
        joined = [torch.cat(pieces) for pieces in zip(*parts)]
        return joined[0] if len(joined) == 1 else joined

    return run_in_slices


def openvino_by_shape(path: str | os.PathLike[str], *, static_shapes: int = 4) -> Callable[[Any], list[Any]]:
    """OpenVINO running the one-input graph ``path`` compiled for each input shape it meets (static shapes run faster:
    1.4x for a detector at 320 x 320 in INT8, docs/detection.md), up to ``static_shapes`` of them; further shapes run
    in the graph compiled for any shape. The callable takes a float32 numpy array and returns the outputs, in order."""
    static: dict[tuple[int, ...], Any] = {}
    any_shape: list[Any] = []

    def model_for(shape: tuple[int, ...]) -> Any:
        if shape not in static and len(static) < static_shapes:
            static[shape] = openvino_model(path, shape=list(shape))
        if shape in static:
            return static[shape]
        if not any_shape:
            any_shape.append(openvino_model(path))
        return any_shape[0]

    return lambda array: list(model_for(tuple(array.shape))(array).values())

"""Model repositories for Triton Inference Server and OpenVINO Model Server: ``DIR/<name>/1/model.onnx`` (FP32
from a model file, exported and checked as ``repvgg export`` does, or an ONNX file as it is: FP16 or INT8 from
``repvgg quantize``), and for Triton ``DIR/<name>/config.pbtxt`` and ``DIR/<name>/labels.txt``.

The ``config.pbtxt`` names the ONNX Runtime or OpenVINO backend, ``max_batch_size`` and ``dynamic_batching``, the
graph's own input and output names, types and dims, and ``label_filename`` for Triton's classification extension.
Before the folder is moved into place, ONNX Runtime runs the file with the names and dims the configuration gives.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repvgg.limits import brief
from repvgg.serialization import DictMixin, staging_folder, write_text

__all__ = ["REPOSITORY_KINDS", "RepositoryReport", "triton_config", "write_model_repository"]

log = logging.getLogger(__name__)

#: ``--format`` values that write a model repository, and the servers that load it.
REPOSITORY_KINDS = {"triton": "Triton Inference Server", "ovms": "OpenVINO Model Server"}
#: ``--backend`` values: the Triton backends that run an ONNX file.
TRITON_BACKENDS = ("onnxruntime", "openvino")
_ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16"}


@dataclass
class GraphPort:
    """One input or output of the ONNX graph: its name, Triton type and dims (``-1`` where dynamic)."""

    name: str
    data_type: str
    dims: list[int]


@dataclass
class RepositoryReport(DictMixin):
    """What [`write_model_repository`][repvgg.serve.repository.write_model_repository] wrote and checked."""

    kind: str
    folder: str
    model: str
    files: list[str]
    precision: str
    input: dict[str, Any]
    output: dict[str, Any]
    max_batch: int
    backend: str | None
    classes: int


def write_model_repository(artifact: str | os.PathLike[str], directory: str | os.PathLike[str], *, kind: str,
                           name: str | None = None, max_batch: int | None = None, max_wait_ms: float | None = None,
                           backend: str = "onnxruntime", img_size: int | None = None,
                           overwrite: bool = False) -> RepositoryReport:
    """Write ``directory/<name>/`` for ``kind`` (``triton`` or ``ovms``) from ``artifact``.

    Args:
        artifact: a model file (exported to FP32 ONNX, checked against PyTorch) or an ONNX file (FP32, FP16 or
            INT8, taken as it is).
        directory: the repository; it may hold other models.
        name: the model's folder and name (default: the model's architecture name, or the ONNX file's stem).
        max_batch: a classifier's Triton ``max_batch_size`` (default 8; a detector's or segmenter's graph takes
            one image: refused for them).
        max_wait_ms: a classifier's Triton ``dynamic_batching`` queue delay (default 5; refused as ``max_batch``).
        backend: Triton's backend, ``onnxruntime`` or ``openvino``.
        img_size: the input size of an export (default: the size the file records).
        overwrite: replace an existing ``directory/<name>``.

    Raises:
        ValueError: bad arguments, a graph without a dynamic batch, an existing model folder without
            ``overwrite``, or the artifact inside the folder it would replace.
    """
    from repvgg.predict.predictor import locate_artifact
    from repvgg.serve.dense import dense_task

    if kind not in REPOSITORY_KINDS:
        raise ValueError(f"unknown repository format {kind!r}; choose from {', '.join(REPOSITORY_KINDS)}")
    if backend not in TRITON_BACKENDS:
        raise ValueError(f"unknown Triton backend {backend!r}; choose from {', '.join(TRITON_BACKENDS)}")
    source_kind, source = locate_artifact(artifact)
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; a model repository is a folder")
    task = dense_task(artifact)
    if task is not None:
        if img_size is not None:
            raise ValueError(f"--img-size sizes a classifier's export; a {task} graph takes images of any size")
        if max_batch is not None or max_wait_ms is not None:
            raise ValueError(f"--max-batch and --max-wait-ms set Triton's batching of a classifier; a {task} graph "
                             "takes one image at a time (max_batch_size 0): leave them out")
        return _dense_repository(task, artifact, root, kind=kind, name=name, backend=backend, overwrite=overwrite)
    max_batch, max_wait_ms = 8 if max_batch is None else max_batch, 5.0 if max_wait_ms is None else max_wait_ms
    model = None
    if source_kind != "onnx":
        from repvgg.io.export import resolve_model

        model = resolve_model(source)
    elif img_size is not None:
        raise ValueError(f"--img-size sizes the export of a model file; {source} is an ONNX file, taken as it is "
                         "(export it at the size you want first)")
    if name is None:
        name = Path(source).stem if model is None else str(getattr(model, "name", "model"))
    _check_name(name)
    target = root / name
    _check_model_place(target, overwrite)
    if isinstance(source, Path) and source.resolve().is_relative_to(target.resolve()):
        raise ValueError(f"{source} is inside {target}, which the repository would replace; write it elsewhere")
    shown = Path(str(source))  # named in messages: the user's file, not its staged copy
    with staging_folder(target) as staging:
        folder = staging / name
        (folder / "1").mkdir(parents=True)
        onnx_file = folder / "1" / "model.onnx"
        if model is None:
            _copy_checked(Path(source), onnx_file)
        else:
            from repvgg.io.export import export_onnx

            export_onnx(model, onnx_file, img_size=img_size)
        graph_input, graph_output, classes, precision = _describe(onnx_file, shown)
        if kind == "triton":
            write_text(folder / "labels.txt", "".join(f"{c}\n" for c in classes))
            write_text(folder / "config.pbtxt", triton_config(name, graph_input, graph_output, max_batch=max_batch,
                                                              max_wait_ms=max_wait_ms, backend=backend))
        _run_as_configured(onnx_file, graph_input, graph_output, min(2, max_batch), shown)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        _move_into_place(folder, target, staging)
    log.debug("wrote %s for %s: %s", target, REPOSITORY_KINDS[kind], ", ".join(files))
    return RepositoryReport(kind, str(target), name, files, precision, vars(graph_input), vars(graph_output),
                            max_batch, backend if kind == "triton" else None, len(classes))


def triton_config(name: str, graph_input: GraphPort, graph_output: GraphPort, *, max_batch: int,
                  max_wait_ms: float, backend: str) -> str:
    """Triton's ``config.pbtxt`` (protobuf text format) for the graph's input and output, without the batch dim."""
    def port(p: GraphPort, extra: str = "") -> str:
        dims = ", ".join(str(d) for d in p.dims[1:])
        return f'  {{\n    name: "{p.name}"\n    data_type: {p.data_type}\n    dims: [ {dims} ]\n{extra}  }}\n'

    return (f'name: "{name}"\nbackend: "{backend}"\ndefault_model_filename: "model.onnx"\n'
            f"max_batch_size: {max_batch}\n"
            f"input [\n{port(graph_input)}]\n"
            f'output [\n{port(graph_output, "    label_filename: " + chr(34) + "labels.txt" + chr(34) + chr(10))}]\n'
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {round(max_wait_ms * 1000)}\n}}\n"
            "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n")


def _check_model_place(target: Path, overwrite: bool) -> None:
    """``DIR/<name>`` may become the model folder: nothing is there, or (with ``overwrite``) a model folder is. A
    link there is never followed (the folder is written inside its repository), and ``overwrite`` never replaces a
    file or a folder of something else (a run, a dataset)."""
    if target.is_symlink():
        raise ValueError(f"{target} is a symbolic link (to {os.readlink(target)}); a model folder is written inside "
                         "its repository, never through a link: remove the link, or choose another --name")
    if not target.exists():
        return
    if not overwrite:
        raise ValueError(f"{target} exists; pass --overwrite to replace it, or choose another --name or folder")
    if not _is_model_folder(target) and not (target.is_dir() and not any(target.iterdir())):  # empty: nothing lost
        raise ValueError(f"{target} is not a model folder (one holding <version>/model.onnx and only the files "
                         "a repository model has), and --overwrite replaces only a model folder; choose another "
                         "--name or folder")


#: What a model folder of a repository holds besides its version folders.
_MODEL_FOLDER_FILES = ("config.pbtxt", "labels.txt")


def _is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a model folder of a repository (not a link): version folders (``1``, ``2``, ...) of which
    one at least holds ``model.onnx``, beside ``config.pbtxt`` and ``labels.txt`` at most."""
    if path.is_symlink() or not path.is_dir():
        return False
    entries = list(path.iterdir())
    versions = [p for p in entries if p.name.isdigit() and p.is_dir() and not p.is_symlink()]
    return any((v / "model.onnx").is_file() for v in versions) and \
        all(p in versions or (p.name in _MODEL_FOLDER_FILES and p.is_file()) for p in entries)


def _check_name(name: str) -> None:
    from repvgg.serve.config import good_model_name

    if not good_model_name(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder and the "
                         "server's URLs)")


def _copy_checked(source: Path, destination: Path) -> None:
    """An ONNX file taken as it is: read as a model file first (its kind and metadata checked)."""
    import onnx

    from repvgg.io.card import load_onnx_proto

    graph = load_onnx_proto(source).graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise ValueError(f"{source} keeps its weights in a separate file; a repository takes one self-contained "
                         "model.onnx: save it with its weights inside (onnx.save_model(..., "
                         "save_as_external_data=False))")
    shutil.copyfile(source, destination)


def _describe(path: Path, shown: Path) -> tuple[GraphPort, GraphPort, list[str], str]:
    """The graph's input and output, its class names and its precision; messages name ``shown`` (the user's file,
    where ``path`` is its staged copy)."""
    from repvgg.io.card import load_onnx_proto, read_onnx_metadata, resolve_card

    graph = load_onnx_proto(path).graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ValueError(f"{shown}: a classifier graph has one input and one output, this one has "
                         f"{len(graph.input)} and {len(graph.output)}")
    ports = []
    for value in (graph.input[0], graph.output[0]):
        tensor = value.type.tensor_type
        if tensor.elem_type not in _ONNX_TYPES:
            raise ValueError(f"{shown}: {value.name} has ONNX element type {tensor.elem_type}, not float32 or float16")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if not value.name or any(c in value.name for c in '"\\\n'):
            raise ValueError(f"{shown}: the graph's name {value.name!r} cannot be written into config.pbtxt")
        ports.append(GraphPort(value.name, _ONNX_TYPES[tensor.elem_type], dims))
    graph_input, graph_output = ports
    if len(graph_input.dims) != 4 or graph_input.dims[0] != -1 or len(graph_output.dims) != 2 or \
            graph_output.dims[1] < 1:
        raise ValueError(f"{shown}: expected a (batch, 3, H, W) -> (batch, classes) graph with a dynamic batch, got "
                         f"{graph_input.dims} -> {graph_output.dims}; export it with `repvgg export`")
    card = resolve_card(read_onnx_metadata(path), shown, graph_output.dims[1])
    return graph_input, graph_output, list(card.classes), _precision(path, graph_input)


def _precision(path: Path, graph_input: GraphPort) -> str:
    """The ONNX graph's precision: ``int8`` where it holds quantized convolutions, else its input's float type."""
    from repvgg.quant.qdq import quantized_conv_count

    return "int8" if quantized_conv_count(path)[0] else \
        ("float16" if graph_input.data_type == "TYPE_FP16" else "float32")


def _run_as_configured(path: Path, graph_input: GraphPort, graph_output: GraphPort, batch: int,
                       shown: Path) -> None:
    """ONNX Runtime runs the file fed and read by the configured names, at the configured dims; messages name
    ``shown``."""
    from repvgg.io.export import onnxruntime_session

    size = [batch, *(d if d > 0 else 32 for d in graph_input.dims[1:])]
    dtype = torch.float16 if graph_input.data_type == "TYPE_FP16" else torch.float32
    example = torch.randn(*size, generator=torch.Generator().manual_seed(0)).to(dtype).numpy()
    try:
        (out,) = onnxruntime_session(path).run([graph_output.name], {graph_input.name: example})
    except Exception as err:  # ONNX Runtime's own error types: a graph it cannot load or run
        cause = brief(str(err).replace(str(path), str(shown)), 300)  # its words name the staged copy
        raise ValueError(f"{shown}: ONNX Runtime cannot run it on a batch of {batch}: {cause}") from None
    if tuple(out.shape) != (batch, graph_output.dims[1]) or not torch.isfinite(torch.from_numpy(out).float()).all():
        raise ValueError(f"{shown}: ONNX Runtime gave {tuple(out.shape)} (or non-finite values) for a batch of "
                         f"{batch}, not ({batch}, {graph_output.dims[1]}) finite logits")


def _move_into_place(folder: Path, target: Path, staging: Path) -> None:
    """``folder`` becomes ``target`` in one rename; an existing ``target`` (``--overwrite``) is moved aside first and
    removed with the staging folder."""
    if target.exists():
        os.replace(target, staging / ".replaced")
    os.replace(folder, target)


#: Triton's types of the ONNX element types a dense graph has.
_DENSE_TYPES = {1: "TYPE_FP32", 7: "TYPE_INT64"}


def _dense_repository(task: str, artifact: str | os.PathLike[str], root: Path, *, kind: str, name: str | None,
                      backend: str, overwrite: bool) -> RepositoryReport:
    """A detector's or segmenter's model folder: its graph (exported and checked from a model file, or the ONNX file
    as it is), one image ``(3, H, W)`` in and the task's outputs, with ``max_batch_size: 0`` (the graph takes one
    image; batching is the caller's), and ``labels.txt`` for the class indices it answers."""
    from repvgg.detection.predict import detection_artifact
    from repvgg.segmentation.predict import segmentation_artifact

    path = detection_artifact(artifact) if task == "detection" else segmentation_artifact(artifact)
    assert path is not None
    onnx_source = path.suffix.lower() == ".onnx" or _is_onnx(path)
    name = name or (path.stem if onnx_source else _dense_name(path, task))
    _check_name(name)
    target = root / name
    _check_model_place(target, overwrite)
    if path.resolve().is_relative_to(target.resolve()):
        raise ValueError(f"{path} is inside {target}, which the repository would replace; write it elsewhere")
    with staging_folder(target) as staging:
        folder = staging / name
        (folder / "1").mkdir(parents=True)
        onnx_file = folder / "1" / "model.onnx"
        if onnx_source:
            _copy_checked(path, onnx_file)
        elif task == "detection":
            from repvgg.detection.export import export_detector

            export_detector(path, onnx_file)
        else:
            from repvgg.segmentation.export import export_segmenter

            export_segmenter(path, onnx_file)
        ports, classes = _dense_ports(onnx_file, task, path)
        if kind == "triton":
            write_text(folder / "labels.txt", "".join(f"{c}\n" for c in classes))
            write_text(folder / "config.pbtxt", _dense_config(name, ports, backend))
        _run_dense(onnx_file, ports, path)
        precision = _precision(onnx_file, ports[0])
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        _move_into_place(folder, target, staging)
    outputs = ports[1:]
    return RepositoryReport(kind, str(target), name, files, precision, vars(ports[0]),
                            {"name": ", ".join(p.name for p in outputs), "data_type": [p.data_type for p in outputs],
                             "dims": [p.dims for p in outputs]}, 0, backend if kind == "triton" else None,
                            len(classes))


def _is_onnx(path: Path) -> bool:
    from repvgg.io.formats import identify_file

    return identify_file(path) == "onnx"


def _dense_name(path: Path, task: str) -> str:
    """A dense model file's name in a repository: what ``repvgg serve`` calls it."""
    from repvgg.dense.weights import read_dense_model
    from repvgg.serve.dense import dense_model_name

    kind = "detector" if task == "detection" else "segmenter"
    config = read_dense_model(path, kind=kind, command="det-train" if task == "detection" else "seg-train")[1][kind]
    return dense_model_name(task, config)


def _dense_ports(path: Path, task: str, shown: Path) -> tuple[list[GraphPort], list[str]]:
    """The graph's input, then its outputs (names, Triton types, dims), and its class names."""
    from repvgg.detection.export import onnx_detector_metadata
    from repvgg.io.card import load_onnx_proto
    from repvgg.segmentation.export import onnx_segmenter_metadata

    graph = load_onnx_proto(path).graph
    ports = []
    for value in (graph.input[0], *graph.output):
        tensor = value.type.tensor_type
        if tensor.elem_type not in _DENSE_TYPES:
            raise ValueError(f"{shown}: {value.name} has ONNX element type {tensor.elem_type}, not float32 or int64")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        ports.append(GraphPort(value.name, _DENSE_TYPES[tensor.elem_type], dims))
    meta = onnx_detector_metadata(path) if task == "detection" else onnx_segmenter_metadata(path)
    classes = list((meta or {}).get("classes") or [])
    if not classes:
        raise ValueError(f"{shown} records no class names; a repository's labels.txt names them")
    return ports, classes


def _dense_config(name: str, ports: list[GraphPort], backend: str) -> str:
    """Triton's ``config.pbtxt`` of a graph that takes one image: no batch dim, every output named."""
    def port(p: GraphPort) -> str:
        dims = ", ".join(map(str, p.dims))
        return f'  {{\n    name: "{p.name}"\n    data_type: {p.data_type}\n    dims: [ {dims} ]\n  }}'

    outputs = ",\n".join(port(p) for p in ports[1:])
    return (f'name: "{name}"\nbackend: "{backend}"\ndefault_model_filename: "model.onnx"\nmax_batch_size: 0\n'
            f"input [\n{port(ports[0])}\n]\noutput [\n{outputs}\n]\n"
            "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n")


def _run_dense(path: Path, ports: list[GraphPort], shown: Path) -> None:
    """ONNX Runtime runs the file on a 64 x 48 image by the configured names; each output has the configured rank."""
    from repvgg.io.export import onnxruntime_session

    example = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0)).numpy()
    try:
        outputs = onnxruntime_session(path).run([p.name for p in ports[1:]], {ports[0].name: example})
    except Exception as err:  # ONNX Runtime's own error types: a graph it cannot load or run
        raise ValueError(f"{shown}: ONNX Runtime cannot run it: {brief(str(err), 300)}") from None
    for port, out in zip(ports[1:], outputs):
        if out.ndim != len(port.dims) or any(d > 0 and d != n for d, n in zip(port.dims, out.shape)):
            raise ValueError(f"{shown}: ONNX Runtime gave {port.name} of shape {tuple(out.shape)}, not {port.dims}")

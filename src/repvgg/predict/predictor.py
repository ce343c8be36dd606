"""Classify new images with a trained model: any artifact this package reads, its own class names and
preprocessing, the fastest runtime that reproduces it.

``Predictor(artifact)`` opens a run folder (its ``deploy.safetensors``), a checkpoint (``best.pt``, ``last.pt``,
official, timm or mmpretrain files, ``hf-hub:`` references), a deploy safetensors file, or an ONNX file (FP32,
FP16 or INT8). A model file runs through [`optimize_for_inference`][repvgg.perf.fast.optimize_for_inference] (every
runtime it weighs, each checked against the model); an ONNX file through ONNX Runtime, or OpenVINO when asked. Images
are prepared as the artifact records (`repvgg.io.card`), so the CLI, the Python API, ``eval`` and the artifacts
of one run all see the same pixels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from repvgg.errors import NonFiniteOutput
from repvgg.io.card import Preprocessing, read_class_names
from repvgg.io.formats import MODEL_KINDS, require_kind
from repvgg.io.hub import HUB_PREFIX
from repvgg.limits import check_image_pixels, check_int, check_workers, out_of_memory
from repvgg.options import check_device_name
from repvgg.quant.guard import Guard
from repvgg.predict import DTYPES, RUNTIMES
from repvgg.predict.inputs import ImageFiles, collate_images, expand_inputs
from repvgg.predict.opening import CALIBRATION_IMAGES, open_onnx, open_weights
from repvgg.training.data import eval_transform
from repvgg.training.images import as_rgb, load_rgb

__all__ = ["Prediction", "Predictor", "bad_image_error", "locate_artifact", "softmax_rows", "RUNTIMES", "DTYPES"]

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Prediction:
    """One image's top-k classes (names and indices) and their softmax probabilities; ``error`` says why an
    image was skipped (its lists are then empty)."""

    source: str
    classes: tuple[str, ...]
    indices: tuple[int, ...]
    probabilities: tuple[float, ...]
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def bad_image_error(error: str) -> ValueError:
    """What ``--bad-images fail`` raises for an unreadable image (``error`` names it and why)."""
    return ValueError(f"{error}. Remove or replace the file, or pass --bad-images skip to report and skip unreadable "
                      "images")


def locate_artifact(artifact: str | os.PathLike[str]) -> tuple[str, Path | str]:
    """``("onnx", path)`` or ``("weights", path or hf-hub reference)``, told apart by the file's content; a run folder
    gives its deploy file.

    Raises:
        FileNotFoundError: the artifact does not exist, or a run folder has no deploy file yet.
        ValueError: the file is not a model file (an image, an empty or unknown file).
    """
    if isinstance(artifact, str) and artifact.startswith(HUB_PREFIX):
        from repvgg.io.hub import hub_file

        local = hub_file(artifact)  # an ONNX file on the hub is one too
        return ("onnx", local) if require_kind(local, MODEL_KINDS, "a model file") == "onnx" else ("weights", artifact)
    path = Path(artifact)
    if path.is_dir():
        deploy = path / "deploy.safetensors"
        if not deploy.is_file():
            raise FileNotFoundError(f"{path} has no deploy.safetensors (the run has not finished); pass one of its "
                                    "checkpoints instead, e.g. " + str(path / "best.pt"))
        return "weights", deploy
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    return ("onnx" if require_kind(path, MODEL_KINDS, "a model file") == "onnx" else "weights"), path


def softmax_rows(logits: Tensor) -> Tensor:
    """The softmax of each row of ``logits`` (float32), written as element-wise operations and reductions, which run
    a small batch on the calling thread: ``torch.softmax`` hands even a few rows to OpenMP's thread team, whose
    workers then spin for a while, and in a server's model thread that cost more than the model (docs/serving.md)."""
    exp = (logits.float() - logits.float().amax(dim=1, keepdim=True)).exp()
    return exp / exp.sum(dim=1, keepdim=True)


class Predictor:
    """Top-k classes of new images from a trained model artifact (see the module docstring).

    Args:
        artifact: a run folder, a weights file or ``hf-hub:`` reference, or an ONNX file (told apart by content).
        runtime: ``"auto"`` or one of [`RUNTIMES`][repvgg.predict.RUNTIMES] (an ONNX file: ``onnxruntime`` or
            ``openvino``).
        dtype: a model file's precision, one of [`DTYPES`][repvgg.predict.DTYPES]. A reduced one (``bfloat16``,
            ``int8``) is held to the accuracy guard ([`repvgg.quant.guard`][repvgg.quant.guard]) against the
            float32 model's own predictions on ``calibration`` (image paths or prepared batches, sampled evenly;
            unreadable images are left out), and ``int8`` is calibrated on other images of it: below
            ``min_agreement`` it is refused ([`PrecisionRejected`][repvgg.quant.guard.PrecisionRejected]);
            ``auto`` takes the fastest of float32 and the reduced ones the guard accepts.
        device: ``"cpu"`` or ``"cuda[:N]"`` (model files; an ONNX file runs on the CPU).
        batch_size: images per forward pass (and the batch the runtimes are weighed at), bounded by this machine's
            memory ([`check_batch_memory`][repvgg.limits.check_batch_memory]).
        workers: DataLoader processes decoding images (0: in this process).
        classes: class names in place of the artifact's: a list, or a text file with one name a line.
        measure: time the runtimes and take the fastest (``False``: PyTorch eager for ``runtime="auto"`` in float32,
            else the first runtime that reproduces the model; what the CLI does for two batches or fewer).
        min_agreement: the accuracy guard of ``dtype="int8"``: the least share of images (0 to 1) on which
            its top-1 must agree with the float32 model's.
        max_top1_drop: the accuracy guard of ``dtype="int8"``: the most top-1 points it may lose, the float32
            model's predictions taken as the labels.
        graph: a model file's ONNX graph made earlier by [`export_graph`][repvgg.predict.opening.export_graph], for
            its ONNX runtimes to build from (each still checked against the model) instead of exporting it again.
    """

    def __init__(self, artifact: str | os.PathLike[str], *, runtime: str = "auto", dtype: str = "float32",
                 device: str = "cpu", batch_size: int = 32, workers: int = 0,
                 classes: Sequence[str] | str | os.PathLike[str] | None = None, calibration: Any = None,
                 measure: bool = True, min_agreement: float = 0.995, max_top1_drop: float = 0.5,
                 graph: str | os.PathLike[str] | None = None) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        self.batch_size = check_int(batch_size, "batch_size", low=1)
        self.workers = check_workers(workers)
        check_device_name(device, "--device")
        guard = Guard(min_agreement, max_top1_drop)
        # a bad class names file is told before the model is loaded (which may take minutes)
        names = read_class_names(classes) if isinstance(classes, (str, os.PathLike)) else classes
        self.kind, path = locate_artifact(artifact)
        self.artifact = str(path)
        if self.kind == "onnx":
            if device not in ("cpu", "auto"):
                raise ValueError(f"{path} is an ONNX file, which runs on the CPU here (ONNX Runtime's and OpenVINO's "
                                 f"CPU runtimes), not on {device}: drop --device, or predict the model file it was "
                                 f"exported from on {device}")
            self.card, self._run, self.backend, self.dtype, self.reason = open_onnx(Path(path), runtime, dtype,
                                                                                      self.batch_size)
            self.name = Path(path).stem
        else:
            self.card, self._run, self.backend, self.dtype, self.reason, self.name = open_weights(
                path, runtime, dtype, device, self.batch_size, measure,
                lambda p: self._calibration_images(calibration, p), guard, graph)
        if names is not None:
            self.card = self.card.with_classes(list(names), f"--classes {classes}" if not isinstance(classes, list)
                                               else "classes=")
        self.transform = eval_transform(self.card.preprocessing)
        for note in self.card.notes:
            logger.warning("%s", note)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.card.classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.card.preprocessing

    def _calibration_images(self, calibration: Any, preprocessing: Preprocessing) -> Tensor:
        """Up to `CALIBRATION_IMAGES` x 2 prepared images from ``calibration``, evenly spread over all of it: image
        paths decoded as the inputs are (unreadable ones left out, with a warning; ``--bad-images`` then decides about
        them when they are predicted), or batches of prepared images."""
        wanted = 2 * CALIBRATION_IMAGES
        if isinstance(calibration, Tensor):
            calibration = [calibration]
        items = list(calibration or [])
        if items and all(isinstance(item, (str, os.PathLike)) for item in items):
            chosen = _spread(expand_inputs(items), wanted)  # from every part of the inputs, not only their start
            loader = DataLoader(ImageFiles(chosen, eval_transform(preprocessing)), batch_size=self.batch_size,
                                num_workers=check_workers(self.workers, batches=-(-len(chosen) // self.batch_size)),
                                collate_fn=collate_images)
            images = []
            for batch, _, errors in loader:
                for _, error in errors:
                    logger.warning("calibration leaves out an unreadable image: %s", error)
                images += [] if batch is None else list(batch)
        else:
            images = [image for item in items for image in (item[0] if isinstance(item, (tuple, list)) else item)]
        if not images:
            raise ValueError("a reduced precision needs images to calibrate on and be judged on, and none could be "
                             f"read (the CLI takes {wanted} of the inputs); or quantize with `repvgg quantize` and "
                             "predict with its INT8 file")
        return torch.stack(_spread(images, wanted)).float()

    @torch.no_grad()
    def logits(self, batch: Tensor) -> Tensor:
        """The model's float32 logits for a batch already prepared (`transform`)."""
        return self._run(batch.float())

    def rank(self, logits: Tensor, topk: int, *, what: str = "an image"
             ) -> list[tuple[tuple[str, ...], tuple[int, ...], tuple[float, ...]]]:
        """Each row of ``logits``: its top-``topk`` class names, indices and softmax probabilities.

        Raises:
            NonFiniteOutput: a NaN or infinite output (naming ``what``): its predictions cannot be trusted.
        """
        finite, rows = self.rank_rows(logits, topk)
        if not all(finite):
            raise NonFiniteOutput(f"the model gave a NaN or infinite output for {what}; its predictions cannot be "
                                  "trusted")
        return rows

    def rank_rows(self, logits: Tensor, topk: int
                  ) -> tuple[list[bool], list[tuple[tuple[str, ...], tuple[int, ...], tuple[float, ...]]]]:
        """[`rank`][repvgg.predict.predictor.Predictor.rank] without refusing: whether each row and its softmax are
        all finite, and each row's top classes (meaningless where not finite)."""
        probabilities = softmax_rows(logits)
        finite = (torch.isfinite(logits).all(dim=1) & torch.isfinite(probabilities).all(dim=1)).tolist()
        top = probabilities.topk(min(topk, len(self.classes)), dim=1)
        rows = [(tuple(self.classes[i] for i in picked), tuple(picked), tuple(values))
                for values, picked in zip(top.values.tolist(), top.indices.tolist())]
        return finite, rows

    def prepare_encoded(self, data: bytes, what: str = "the uploaded image") -> Tensor:
        """An encoded image (PNG, JPEG, ... bytes) prepared as a file of it is: bounded by
        [`MAX_IMAGE_PIXELS`][repvgg.limits.MAX_IMAGE_PIXELS] from its header, 16-bit grey scaled.

        Raises:
            ValueError: not an image, or a broken one; [`LimitExceeded`][repvgg.limits.LimitExceeded]: too many
                pixels.
        """
        return self.transform(load_rgb(data, what=what))

    def predict(self, inputs: Any, *, topk: int = 5, bad_images: str = "fail", expand: bool = True
                ) -> list[Prediction]:
        """Top-``topk`` predictions of ``inputs``: image paths, folders and glob patterns (as the CLI expands
        them), PIL images, uint8 ``(3, H, W)`` image tensors (prepared like files), or float tensors already
        prepared (``(3, H, W)`` or a ``(N, 3, H, W)`` batch), in any mix. ``expand=False``: a list of paths already
        listed, each one image and one prediction, duplicates included (a folder or a missing file is an unreadable
        image). See [`iter_predict`][repvgg.predict.predictor.Predictor.iter_predict]."""
        return list(self.iter_predict(inputs, topk=topk, bad_images=bad_images, expand=expand))

    def iter_predict(self, inputs: Any, *, topk: int = 5, bad_images: str = "fail",
                     on_batch: Callable[[int], None] | None = None, expand: bool = True) -> Iterator[Prediction]:
        """[`predict`][repvgg.predict.predictor.Predictor.predict], one prediction at a time in input order (a
        ``(N, 3, H, W)`` batch is run in slices of ``batch_size``); ``on_batch(n)`` after each batch of ``n``.

        Raises:
            ValueError: an unreadable image with ``bad_images="fail"`` (the file named; with ``"skip"`` it gives a
                prediction whose ``error`` says why), an empty input, or a bad ``topk``.
        """
        if bad_images not in ("fail", "skip"):
            raise ValueError(f"bad_images must be 'fail' or 'skip', got {bad_images!r}")
        k = min(check_int(topk, "topk", low=1), len(self.classes))
        for sources, images, errors in self._batches(inputs, expand):
            if errors and bad_images == "fail":
                raise bad_image_error(errors[0][1])
            results: dict[int, Prediction] = {i: Prediction(sources[i], (), (), (), error) for i, error in errors}
            if images is not None:
                try:
                    logits = self.logits(images[1])
                except (MemoryError, RuntimeError) as err:
                    raise out_of_memory(err, "predicting a batch") or err
                ranked = self.rank(logits, k, what=f"{sources[images[0][0]]} or another image of its batch")
                for (classes, indices, probabilities), index in zip(ranked, images[0]):
                    results[index] = Prediction(sources[index], classes, indices, probabilities)
            yield from (results[i] for i in sorted(results))
            if on_batch is not None:
                on_batch(len(results))

    def _batches(self, inputs: Any, expand: bool = True) -> Iterator[tuple[dict[int, str],
                                                                          tuple[list[int], Tensor] | None,
                                                                          list[tuple[int, str]]]]:
        """``(sources by index, (indices, prepared batch) or None, (index, error) of unreadable images)``; paths
        expanded as the CLI expands them unless not ``expand``."""
        if isinstance(inputs, Tensor) and inputs.dim() == 4:  # a prepared batch: sliced, never listed image by image
            yield from self._tensor_batches(inputs)
            return
        if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, Iterable):
            inputs = [inputs]
        inputs = list(inputs)
        if not inputs:
            raise ValueError("no images to predict")
        if all(isinstance(item, (str, os.PathLike)) for item in inputs):  # files: decoded in the loader's workers
            paths = expand_inputs(inputs) if expand else [os.fspath(item) for item in inputs]
            workers = check_workers(self.workers, batches=-(-len(paths) // self.batch_size))
            loader = DataLoader(ImageFiles(paths, self.transform), batch_size=self.batch_size, num_workers=workers,
                                collate_fn=collate_images)
            for images, indices, errors in loader:  # indices into ``paths``
                sources = {i: paths[i] for i in [*indices, *(i for i, _ in errors)]}
                yield sources, None if images is None else (indices, images), errors
            return
        entries = [(path, path) for item in inputs for path in
                   (expand_inputs([item]) if isinstance(item, (str, os.PathLike)) else [item])]
        for start in range(0, len(entries), self.batch_size):
            prepared = [self._prepare(item) for _, item in entries[start: start + self.batch_size]]
            sources = {start + i: source if isinstance(source, str) else f"<input {start + i}>"
                       for i, (source, _) in enumerate(entries[start: start + self.batch_size])}
            good = [start + i for i, (image, _) in enumerate(prepared) if image is not None]
            errors = [(start + i, error) for i, (image, error) in enumerate(prepared) if image is None]
            batch = torch.stack([image for image, _ in prepared if image is not None]) if good else None
            yield sources, None if batch is None else (good, batch), errors

    def _tensor_batches(self, batch: Tensor) -> Iterator[tuple[dict[int, str], tuple[list[int], Tensor],
                                                              list[tuple[int, str]]]]:
        """A ``(N, 3, H, W)`` float tensor of prepared images in slices of ``batch_size``."""
        if len(batch) == 0:
            raise ValueError("no images to predict")
        self._prepare(batch[0])  # the shape and type rules of a prepared image, checked once
        for start in range(0, len(batch), self.batch_size):
            piece = batch[start: start + self.batch_size].float()
            indices = list(range(start, start + len(piece)))
            yield {i: f"<input {i}>" for i in indices}, (indices, piece), []

    def _prepare(self, item: Any) -> tuple[Tensor | None, str]:
        """One input as the model's input, or ``None`` and why it could not be read (a file). An image in memory is
        prepared as a file is (bounded, 16-bit grey scaled, an unknown range refused)."""
        if isinstance(item, str):
            try:
                return self.transform(load_rgb(item)), ""
            except ValueError as err:
                return None, str(err)
        if isinstance(item, Tensor):
            if item.dtype == torch.uint8:
                from torchvision.transforms.functional import to_pil_image

                if item.dim() != 3 or item.shape[0] not in (1, 3):
                    raise ValueError(f"a uint8 image tensor is (1 or 3, H, W), got shape {tuple(item.shape)}")
                check_image_pixels(item.shape[2], item.shape[1], "a uint8 image tensor")
                return self.transform(as_rgb(to_pil_image(item), "a uint8 image tensor")), ""
            if item.dim() != 3 or not item.is_floating_point():
                raise ValueError(f"a tensor input must be a uint8 image or a prepared float (3, H, W) tensor, got "
                                 f"{item.dtype} of shape {tuple(item.shape)}")
            size = self.preprocessing.img_size
            if tuple(item.shape) != (3, size, size):
                raise ValueError(f"a prepared tensor must be (3, {size}, {size}), as the model's preprocessing makes "
                                 f"it; got {tuple(item.shape)} (give the image itself to have it prepared)")
            return item.float(), ""
        if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
            return self.transform(as_rgb(item, "a PIL image")), ""
        raise TypeError(f"cannot predict a {type(item).__name__}: give image paths, PIL images or tensors")


def _spread(items: Sequence[Any], count: int) -> list[Any]:
    """At most ``count`` of ``items``, evenly spaced over all of them, in order."""
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]

"""``repvgg predict ARTIFACT INPUT...``: the top-k classes of new images, by name, from any model artifact."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from repvgg.cli.flags import add_guard_flags, add_overwrite_flag, bounded_float, bounded_int, refuse_flags
from repvgg.limits import MAX_WORKERS
from repvgg.cli.output import emit, local_reads
from repvgg.report import printable
from repvgg.serialization import csv_text, write_csv

#: The defaults of the flags that apply to classifiers only (``None`` on the command line: not given).
_CLASSIFIER_DEFAULTS = {"topk": 5, "batch_size": 32, "workers": 2}
#: Inputs above this many batches are worth weighing the runtimes for (and get a progress bar).
_WEIGH_FROM_BATCHES = 2
#: Images from which a detector's runtimes are weighed: exporting, checking and timing them took about 2 s on a
#: 2-core CPU, and the fastest saved about 3.5 ms an image over PyTorch eager at 128 px (docs/detection.md).
_WEIGH_DETECTOR_FROM = 500


def add_parser(sub: argparse._SubParsersAction) -> None:
    from repvgg.predict import DTYPES, RUNTIMES

    p = sub.add_parser(
        "predict", help="classify images with a trained model (run folder, checkpoint, deploy file or ONNX)",
        description="ARTIFACT is a run folder (its deploy.safetensors), a checkpoint (best.pt, last.pt, official, "
                    "timm or mmpretrain files, hf-hub:ORG/REPO), a deploy .safetensors or an .onnx file (FP32, "
                    "FP16 or INT8). INPUT is any mix of image files, folders (recursive, sorted) and glob patterns; "
                    "- reads paths from standard input. Images are prepared as the artifact records (size, resize "
                    "and crop, mean and std) and named by its class names. Prints path, top-k classes and "
                    "probabilities; nothing is written unless --csv is given.")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("inputs", metavar="INPUT", nargs="+")
    p.add_argument("--topk", type=bounded_int(1), default=None,
                   help=f"classifiers: classes per image (default: {_CLASSIFIER_DEFAULTS['topk']})")
    p.add_argument("--csv", default=None, metavar="OUT", help="also write the predictions to this CSV file (-: "
                   "print the CSV on standard output instead of the table)")
    add_overwrite_flag(p, "an existing --csv file, and --draw or --masks images")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="auto: the fastest runtime that reproduces the model (ONNX Runtime for an ONNX file)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="precision of a model file (int8: calibrated on 64 readable inputs spread over all of them and "
                        "held to the accuracy guard on 64 others, against the float32 model's predictions; auto: the "
                        "fastest precision the guard accepts)")
    add_guard_flags(p)
    p.add_argument("--batch-size", type=bounded_int(1), default=None,
                   help=f"classifiers: images per forward pass (default: {_CLASSIFIER_DEFAULTS['batch_size']})")
    p.add_argument("--workers", type=bounded_int(0, MAX_WORKERS), default=None,
                   help=f"classifiers: processes decoding images (default: {_CLASSIFIER_DEFAULTS['workers']})")
    p.add_argument("--classes", default=None, metavar="FILE", help="class names, one a line, in place of the "
                   "artifact's")
    p.add_argument("--bad-images", choices=("fail", "skip"), default="fail",
                   help="an unreadable image stops the run (fail, exit 2) or is reported and skipped (skip)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (model files)")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="predict on a Ray cluster, a pool of actors each "
                   "holding the model, the output as without it (auto: the cluster running on this machine; local: "
                   "start one here and stop it after; HOST:PORT: its head). Needs pip install 'repvgg[scale]'")
    p.add_argument("--ray-actors", type=bounded_int(1, MAX_WORKERS), default=None,
                   help="with --ray: model replicas (default: 2), each with the cluster's CPUs shared among them")
    p.add_argument("--score-threshold", type=bounded_float(0.0, 1.0), default=None,
                   help="detectors: boxes scoring below this are left out (default: 0.3)")
    p.add_argument("--draw", default=None, metavar="DIR", help="detectors and segmenters: write each image with its "
                   "boxes drawn (its classes' colours laid over it) into DIR (as <name>.png)")
    p.add_argument("--masks", default=None, metavar="DIR", help="segmenters: write each image's label map (pixel = "
                   "class index, with a palette, at the image's size) into DIR (as <name>.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from repvgg.predict.inputs import expand_inputs
    from repvgg.predict.predictor import Predictor
    from repvgg.serialization import check_output_path
    from repvgg.training.progress import progress_bar

    paths = expand_inputs(args.inputs, stdin=sys.stdin if "-" in args.inputs else None)
    if args.ray_actors is not None and args.ray is None:
        raise ValueError("--ray-actors goes with --ray ADDRESS")
    if args.ray is not None and args.device != "cpu":
        raise ValueError(f"--ray predicts on the cluster's CPUs, not on --device {args.device}: drop --device, or "
                         "predict without --ray on this machine's GPU")
    from repvgg.detection.predict import detection_artifact

    if detection_artifact(args.artifact) is not None:
        refuse_flags((("--masks", args.masks),), "to segmenters; ARTIFACT is a detector")
        return _predict_boxes(args, paths)
    from repvgg.segmentation.predict import segmentation_artifact

    if segmentation_artifact(args.artifact) is not None:
        return _predict_masks(args, paths)
    refuse_flags((("--draw", args.draw), ("--score-threshold", args.score_threshold), ("--masks", args.masks)),
                 "to detectors and segmenters; ARTIFACT is a classifier")
    if args.ray is not None:
        refuse_flags((("--workers", args.workers),), "to plain predict; with --ray each actor reads and decodes its "
                     "own batches (--ray-actors sets how many)")
    for name, value in _CLASSIFIER_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if _csv_file(args):
        folders = [item for item in args.inputs if item != "-" and Path(item).is_dir()]  # never written into either
        check_output_path(args.csv, reads=local_reads([args.artifact, args.classes, *paths, *folders]),
                          overwrite=args.overwrite,
                          option="--csv")
    many = len(paths) > _WEIGH_FROM_BATCHES * args.batch_size
    if args.ray is not None:
        return _predict_on_cluster(args, paths, many)
    predictor = Predictor(args.artifact, runtime=args.runtime, dtype=args.dtype, device=args.device,
                          batch_size=args.batch_size, workers=args.workers if many else 0, classes=args.classes,
                          calibration=paths if args.dtype != "float32" else None, measure=many,
                          min_agreement=args.min_agreement, max_top1_drop=args.max_top1_drop)
    bar = progress_bar(len(paths), "predict", enabled=many)
    started = time.perf_counter()
    try:
        predictions = list(predictor.iter_predict(paths, topk=args.topk, bad_images=args.bad_images,
                                                  on_batch=bar.update if bar is not None else None))
    finally:
        if bar is not None:
            bar.close()
    header = {"artifact": predictor.artifact, "runtime": predictor.backend, "dtype": predictor.dtype,
              "preprocessing": predictor.preprocessing.to_dict(), "notes": list(predictor.card.notes)}
    return _emit_classes(args, header, [p.as_dict() for p in predictions], time.perf_counter() - started,
                         min(args.topk, len(predictor.classes)))


def _emit_classes(args: argparse.Namespace, header: dict[str, Any], rows: list[dict[str, Any]], seconds: float,
                  k: int) -> int:
    """A classifier's predictions as the table, --json and --csv (``k`` classes an image), with the run's counts
    and speed after ``header``."""
    skipped = [r for r in rows if r["error"]]
    document = {**header, "images": len(rows) - len(skipped), "skipped": len(skipped), "seconds": seconds,
                "images_per_s": (len(rows) - len(skipped)) / max(seconds, 1e-9), "predictions": rows}
    table = _classes_table(document)
    if args.csv:
        table = _write_csv(args, rows, k) or table
    emit(args, document, table)
    return 0


def _predict_on_cluster(args: argparse.Namespace, paths: list[str], many: bool) -> int:
    """A classifier's predictions from a pool of Ray actors (``--ray``): the same table, --json and --csv."""
    from repvgg.predict.cluster import ClusterOptions

    options = ClusterOptions(topk=args.topk, batch_size=args.batch_size, actors=args.ray_actors or 2,
                             runtime=args.runtime, dtype=args.dtype, classes=args.classes, measure=many,
                             calibration=paths[:: max(1, len(paths) // 256)] if args.dtype != "float32" else None,
                             min_agreement=args.min_agreement, max_top1_drop=args.max_top1_drop)
    started = time.perf_counter()
    rows, model = _cluster_rows(args, paths, options, enabled=many)
    header = {"artifact": model["artifact"], "runtime": model["runtime"], "dtype": model["dtype"],
              "preprocessing": model["preprocessing"], "notes": model["notes"], "ray": model["ray"]}
    return _emit_classes(args, header, rows, time.perf_counter() - started,
                         max(len(r["classes"]) for r in rows) or args.topk)


def _cluster_rows(args: argparse.Namespace, paths: list[str], options: Any, outputs: _ImageOutputs | None = None, *,
                  enabled: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What plain ``predict --json`` gives for each of ``paths``, from a pool of Ray actors (``--ray``), with each
    image's PNGs written where ``outputs`` says; and the actors' model,
    with where it ran (``ray``)."""
    from concurrent.futures import ThreadPoolExecutor

    from repvgg.predict.cluster import check_address, connect, iter_predict_paths, model_graph, stop_started
    from repvgg.training.progress import progress_bar

    check_address(args.ray)  # an address out of reach is told at once, before the model's export starts
    for name in _RAY_DATA_LOGGERS:
        logging.getLogger(name).addFilter(_RAY_DATA_CHATTER)
    bar = progress_bar(len(paths), "predict", enabled=enabled)
    rows: list[dict[str, Any]] = []
    model: dict[str, Any] = {}
    # Ray's driver prints what its cluster reports (a worker that died, ...) on standard output, which is the
    # table's or --json's: it goes to standard error while Ray runs
    with contextlib.redirect_stdout(sys.stderr), ThreadPoolExecutor(1) as pool:
        graph = pool.submit(model_graph, args.artifact, options)  # exported while the cluster starts
        started_here = False
        try:
            started_here = connect(args.ray)
            for row, model, files in iter_predict_paths(paths, args.artifact, options, bad_images=args.bad_images,
                                                        on_batch=bar.update if bar is not None else None,
                                                        graph=graph.result() or False):
                if outputs is not None:
                    outputs.write(row["source"], files)
                rows.append(row)
        finally:
            if bar is not None:
                bar.close()
            if started_here:
                stop_started()
    return rows, {**model, "ray": {"address": args.ray, "actors": args.ray_actors or 2,
                                   "threads_per_actor": model.get("threads")}}


class _RayDataChatter(logging.Filter):
    """Drops Ray Data's INFO lines on each run (its plan, its start and its end) and its notice that its progress bars
    are off (``predict`` has its own bar and summary); its warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "Progress bars disabled" not in record.getMessage()


_RAY_DATA_CHATTER = _RayDataChatter()
#: Where Ray Data logs what `_RayDataChatter` drops.
_RAY_DATA_LOGGERS = ("ray.data._internal.execution.streaming_executor", "ray.data._internal.progress")


class _ImageOutputs:
    """Where each image's PNGs go (``{"mask": {path: file}, "draw": {...}}``), and the files and folders this run has
    made: a run that fails (an unreadable image under ``--bad-images fail``) or is interrupted removes them, as it
    writes no ``--csv``, so that it can be run again as it was (a file replaced under ``--overwrite`` stays so)."""

    def __init__(self, targets: dict[str, dict[str, Path]]) -> None:
        self.targets, self.made = targets, list[Path]()
        self.wanted = tuple(kind for kind, files in targets.items() if files)
        parents = {file.parent for files in targets.values() for file in files.values()}
        self.folders = sorted({folder for parent in parents for folder in (parent, *parent.parents)
                               if not folder.exists()}, key=lambda f: -len(f.parts))  # the deepest first

    def write(self, source: str, pngs: dict[str, bytes]) -> None:
        """Write an image's PNGs (``{"mask": bytes, "draw": bytes}``) where its targets say for ``source``."""
        from repvgg.serialization import output_target, write_bytes

        for kind, data in pngs.items():
            target = self.targets.get(kind, {}).get(source)
            if target is not None:
                written = output_target(target)  # a link is written through: its target is the file made
                made = not os.path.lexists(written)
                write_bytes(target, data)
                if made:
                    self.made.append(written)

    @contextlib.contextmanager
    def removed_unless_finished(self) -> Iterator[_ImageOutputs]:
        try:
            yield self
        except BaseException:
            for path in self.made:
                path.unlink(missing_ok=True)
            for folder in self.folders:
                with contextlib.suppress(OSError):  # left where something else is in it
                    folder.rmdir()
            raise


def _csv_file(args: argparse.Namespace) -> bool:
    """Whether ``--csv`` names a file (``-`` prints the CSV in place of the table; ``--json`` then conflicts)."""
    if args.csv == "-" and args.json:
        raise ValueError("--csv - and --json both write to standard output; give one of them, or --csv FILE")
    return bool(args.csv) and args.csv != "-"


def _csv_out(args: argparse.Namespace, header: list[str], rows: list[list[Any]]) -> str | None:
    """The CSV written to the ``--csv`` file, or returned as the text to print for ``--csv -``."""
    if args.csv == "-":
        return csv_text(header, rows).rstrip("\r\n")
    write_csv(args.csv, header, rows)
    return None


def _classes_table(document: dict[str, Any]) -> str:
    """A classifier's printed table (each image's classes and probabilities), and the run's speed in the log."""
    logging.getLogger(__name__).info(
        "%d images (%d skipped) on %s (%s) in %.2f s: %.0f images/s", document["images"], document["skipped"],
        document["runtime"], document["dtype"], document["seconds"], document["images_per_s"])
    return _table(document["predictions"], lambda row: "  ".join(
        f"{printable(c)} {p:.3f}" for c, p in zip(row["classes"], row["probabilities"])))


def _write_csv(args: argparse.Namespace, rows: list[dict[str, Any]], k: int) -> str | None:
    """One row per image: its path, its top-``k`` classes and probabilities, and why it was skipped."""
    header = ["path", *[f"{name}{i}" for i in range(1, k + 1) for name in ("class", "probability")], "error"]
    lines = []
    for row in rows:
        ranked = [v for c, p in zip(row["classes"], row["probabilities"]) for v in (c, f"{p:.6f}")]
        lines.append([row["source"], *ranked, *([""] * (2 * k - len(ranked))), row["error"] or ""])
    return _csv_out(args, header, lines)


def _predict_boxes(args: argparse.Namespace, paths: list[str]) -> int:
    """A detector: each image's boxes (class, score, x1 y1 x2 y2), as a table, --json, --csv and --draw images."""
    from repvgg.detection.predict import DEFAULT_SCORE_THRESHOLD
    from repvgg.serialization import check_output_path, image_outputs

    if args.dtype != "float32":
        raise ValueError("a detector predicts in float32 here; quantize it with `repvgg quantize` for INT8")
    refuse_flags((("--topk", args.topk), ("--batch-size", args.batch_size), ("--workers", args.workers)),
                 "to classifiers; a detector reports every box over --score-threshold, one image at a time")
    folders = [item for item in args.inputs if item != "-" and Path(item).is_dir()]
    reads = local_reads([args.artifact, args.classes, *paths, *folders])
    targets = image_outputs(paths, args.draw, option="--draw", overwrite=args.overwrite, reads=reads) \
        if args.draw else {}
    if _csv_file(args):
        check_output_path(args.csv, reads=reads, overwrite=args.overwrite, option="--csv", writes=targets.values())
    threshold = DEFAULT_SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
    outputs = _ImageOutputs({"draw": targets})

    def predictor() -> Any:
        from repvgg.detection.predict import DetectionPredictor

        return DetectionPredictor(args.artifact, runtime=args.runtime, score_threshold=threshold, classes=args.classes,
                                  device=args.device, measure=len(paths) >= _WEIGH_DETECTOR_FROM, samples=paths)

    with outputs.removed_unless_finished():
        rows, model, started = _dense_rows(args, paths, outputs, predictor, score_threshold=threshold)
    skipped = sum(1 for r in rows if r["error"])
    document = {"artifact": model["artifact"], "runtime": model["runtime"], "runtime_reason": model["runtime_reason"],
                "task": "detection", "score_threshold": threshold, "images": len(rows) - skipped, "skipped": skipped,
                "seconds": time.perf_counter() - started, "predictions": rows,
                **({"ray": model["ray"]} if "ray" in model else {})}
    printed = None
    if args.csv:
        printed = _csv_out(args, ["path", "class", "score", "x1", "y1", "x2", "y2", "error"],
                           [[r["source"], d["class"], d["score"], *d["box"], ""] for r in rows for d in r["detections"]]
                           + [[r["source"], "", "", "", "", "", "", r["error"]] for r in rows if r["error"]])
    emit(args, document, printed or _table(rows, lambda row: "  ".join(
        f"{printable(d['class'])} {d['score']:.3f} [{' '.join(f'{v:.1f}' for v in d['box'])}]"
        for d in row["detections"]) or "no detection"))
    return 0


def _dense_rows(args: argparse.Namespace, paths: list[str], outputs: _ImageOutputs, predictor: Callable[[], Any],
                **options: Any) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """A detector's or segmenter's rows for ``paths``, its PNGs written as ``outputs`` says: on the cluster with
    ``--ray`` (its actors' ``options``), else by the ``predictor()`` made here; the model's description and when the
    predicting started."""
    if args.ray is not None:  # timed from the cluster's start, as a classifier's
        started = time.perf_counter()
        return (*_cluster_rows(args, paths, _dense_options(args, paths, outputs.wanted, **options), outputs), started)
    made = predictor()

    def write(path: str, image: Any, found: Any) -> None:
        outputs.write(path, made.pngs(image, found, outputs.wanted))

    started = time.perf_counter()
    rows = [r.as_dict() for r in made.iter_predict(paths, bad_images=args.bad_images,
                                                   on_image=write if outputs.wanted else None)]
    model = {"artifact": made.artifact, "runtime": made.backend, "runtime_reason": getattr(made, "reason", None)}
    return rows, model, started


def _predict_masks(args: argparse.Namespace, paths: list[str]) -> int:
    """A segmenter: each image's classes with their share of the pixels, as a table, --json and --csv; --masks DIR
    label maps and --draw DIR overlays."""
    from repvgg.serialization import check_output_path, image_outputs

    if args.dtype != "float32":
        raise ValueError("a segmenter predicts in float32 here; quantize it with `repvgg quantize` for INT8")
    refuse_flags((("--topk", args.topk), ("--batch-size", args.batch_size), ("--workers", args.workers),
                  ("--score-threshold", args.score_threshold)),
                 "to classifiers and detectors; a segmenter labels every pixel, one image at a time")
    folders = [item for item in args.inputs if item != "-" and Path(item).is_dir()]
    reads = local_reads([args.artifact, args.classes, *paths, *folders])
    masks = image_outputs(paths, args.masks, option="--masks", overwrite=args.overwrite, reads=reads) \
        if args.masks else {}
    drawn = image_outputs(paths, args.draw, option="--draw", overwrite=args.overwrite, reads=reads,
                          writes=masks.values()) if args.draw else {}
    if _csv_file(args):
        check_output_path(args.csv, reads=reads, overwrite=args.overwrite, option="--csv",
                          writes=[*masks.values(), *drawn.values()])
    outputs = _ImageOutputs({"mask": masks, "draw": drawn})

    def predictor() -> Any:
        from repvgg.segmentation.predict import SegmentationPredictor

        return SegmentationPredictor(args.artifact, runtime=args.runtime, classes=args.classes, device=args.device)

    with outputs.removed_unless_finished():
        rows, model, started = _dense_rows(args, paths, outputs, predictor)
    for row in rows:  # where its mask was written
        row["mask"] = str(masks[row["source"]]) if row["error"] is None and row["source"] in masks else None
    skipped = sum(1 for r in rows if r["error"])
    document = {"artifact": model["artifact"], "runtime": model["runtime"], "task": "segmentation",
                "images": len(rows) - skipped, "skipped": skipped, "seconds": time.perf_counter() - started,
                "predictions": rows, **({"ray": model["ray"]} if "ray" in model else {})}
    printed = None
    if args.csv:
        found = [[r["source"], c["class"], c["fraction"], r["mask"] or "", ""] for r in rows for c in r["classes"]]
        printed = _csv_out(args, ["path", "class", "fraction", "mask", "error"],
                           found + [[r["source"], "", "", "", r["error"]] for r in rows if r["error"]])
    emit(args, document, printed or _table(rows, lambda row: "  ".join(
        f"{printable(c['class'])} {100 * c['fraction']:.1f}%" for c in row["classes"])))
    return 0


def _dense_options(args: argparse.Namespace, paths: list[str], files: tuple[str, ...], **fields: Any) -> Any:
    """How a detector's or a segmenter's actors predict (``--ray``): as plain ``predict`` would, an image at a time,
    with the PNGs ``files`` asked for."""
    from repvgg.predict.cluster import ClusterOptions

    return ClusterOptions(actors=args.ray_actors or 2, batch_size=8, runtime=args.runtime, classes=args.classes,
                          measure=len(paths) >= _WEIGH_DETECTOR_FROM, calibration=paths[:64], files=files, **fields)


def _table(rows: list[dict[str, Any]], describe: Callable[[dict[str, Any]], str]) -> str:
    """The printed table of a dense model's rows: one line an image, its path, then ``describe(row)`` or why it was
    skipped."""
    lines = []
    for row in rows:
        what = f"skipped: {printable(row['error'])}" if row["error"] else describe(row)
        lines.append(f"{printable(row['source'])}\t{what}")
    return "\n".join(lines)

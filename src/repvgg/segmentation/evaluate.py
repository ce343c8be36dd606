"""Judging a trained segmenter: its scores next to its converted copy's, speed against a ResNet PSPNet, tables.

Speed follows the protocol of `repvgg.training.evaluate.measure_throughput` (eval mode, interleaved
rounds after warm-up, median) on one batch at the validation input size. The ResNet baseline is a
PSPNet with the same head widths, randomly initialised (speed does not depend on the weights),
with every conv-BN pair fused, as the RepVGG paper does for its baselines.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

from torch import Tensor, nn
from torch.utils.data import DataLoader

from repvgg.limits import check_workers
from repvgg.nn.complexity import count_parameters
from repvgg.nn.convert import check_outputs, reparameterize_model
from repvgg.training.evaluate import measure_throughput
from repvgg.report import markdown_table
from repvgg.segmentation.metrics import SegmenterComparison, compare_segmenters
from repvgg.segmentation.pspnet import PSPNet, SegmenterConfig, build_segmenter

__all__ = [
    "baseline_segmenter",
    "segmenter_speed",
    "comparison_summary",
    "iou_table",
    "speed_table",
    "evaluate_segmenter_file",
    "validation_data",
]


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else 100.0 * value


def baseline_segmenter(backbone: str, like: SegmenterConfig) -> PSPNet:
    """A ResNet PSPNet with ``like``'s classes and head widths, random init, conv-BN fused, no aux head."""
    config = SegmenterConfig(backbone=backbone, num_classes=like.num_classes, output_stride=like.output_stride,
                             bins=like.bins, head_channels=like.head_channels, aux_channels=like.aux_channels,
                             dropout=like.dropout, in_chans=like.in_chans)
    return reparameterize_model(build_segmenter(config), inplace=True)


def segmenter_speed(models: Sequence[tuple[str, nn.Module]], batch: Tensor, *, rounds: int = 7) -> list[dict[str, Any]]:
    """Images/s of each ``(label, model)`` on ``batch`` (interleaved rounds, median), with parameters and
    the speed relative to the first model."""
    rates = measure_throughput([model for _, model in models], batch, rounds=rounds)
    return [
        {"model": label, "params": count_parameters(model), "images_per_s": rate, "relative": rate / rates[0]}
        for (label, model), rate in zip(models, rates)
    ]


def comparison_summary(comparison: SegmenterComparison, class_names: Sequence[str]) -> dict[str, Any]:
    """The scores of a training-time model (index 0) and, when there is one, its converted copy (index 1).

    IoUs and accuracies in percent; a class absent from both labels and predictions has IoU ``None``.
    """
    first = comparison.metrics[0]
    summary: dict[str, Any] = {
        "val_images": comparison.images,
        "val_miou": _percent(first.mean_iou),
        "pixel_accuracy": _percent(first.pixel_accuracy),
        "mean_accuracy": _percent(first.mean_accuracy),
        "val_loss": comparison.loss[0],
        "per_class_iou": {name: _percent(v) for name, v in zip(class_names, first.iou)},
    }
    if len(comparison.metrics) > 1:
        deploy = comparison.metrics[1]
        summary.update(
            val_miou_deploy=_percent(deploy.mean_iou),
            pixel_accuracy_deploy=_percent(deploy.pixel_accuracy),
            per_class_iou_deploy={name: _percent(v) for name, v in zip(class_names, deploy.iou)},
            max_abs_diff=comparison.max_abs_diff[0],
            relative_error=comparison.relative_error[0],
            pixel_agreement=comparison.agreement[0],
        )
    return summary


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def iou_table(summary: Mapping[str, Any]) -> str:
    """Markdown: per-class IoU, mIoU and pixel accuracy (%), for the training-time and converted model."""
    both = "per_class_iou_deploy" in summary
    header = ["class", "IoU (%)"] + (["IoU converted (%)"] if both else [])
    rows = []
    for name, value in summary["per_class_iou"].items():
        row = [name, _cell(value)]
        if both:
            row.append(_cell(summary["per_class_iou_deploy"][name]))
        rows.append(row)
    rows.append(["**mean IoU**", _cell(summary["val_miou"])] + ([_cell(summary["val_miou_deploy"])] if both else []))
    rows.append(["pixel accuracy", _cell(summary["pixel_accuracy"])]
                + ([_cell(summary["pixel_accuracy_deploy"])] if both else []))
    return markdown_table(header, rows)


def speed_table(rows: Sequence[Mapping[str, Any]], batch_shape: Sequence[int] | None = None) -> str:
    """Markdown: model, parameters, images/s and speed relative to the first row."""
    first = rows[0]["model"] if rows else ""
    size = f" @ {batch_shape[-2]}x{batch_shape[-1]}, batch {batch_shape[0]}" if batch_shape else ""
    return markdown_table(
        ["model", "params (M)", f"images/s{size}", f"vs {first}"],
        [[r["model"], f"{r['params'] / 1e6:.2f}", f"{r['images_per_s']:.1f}", f"{r['relative']:.2f}x"] for r in rows],
    )


def validation_data(meta: Mapping[str, Any], config: SegmenterConfig, data: str | None,
                    val_size: int | None) -> Any:
    """The data bundle a segmenter file was trained on (``data`` in its place, ``val_size`` over the recorded one)."""
    from repvgg.segmentation.data import build_segmentation_data
    from repvgg.segmentation.synthetic import SyntheticConfig

    trained_on = meta.get("data") or {}
    if data is None:
        data = trained_on.get("data")
        if val_size is None:
            val_size = trained_on.get("val_size")
    synthetic = None
    if data is None or data == "synthetic":
        settings = dict(trained_on.get("synthetic") or {})
        if "size_range" in settings:
            settings["size_range"] = tuple(settings["size_range"])
        synthetic = SyntheticConfig(**settings)
    elif not os.path.isdir(data):
        raise FileNotFoundError(f"the data folder {data!r} does not exist; pass --data with the folder to evaluate on")
    return build_segmentation_data(data, num_classes=None if synthetic else config.num_classes,
                                   val_size=val_size, synthetic=synthetic)


def _class_names(recorded: list[str] | None, data: list[str], weights: Any) -> list[str]:
    """The names of the classes scored: the file's, else the data's. Names that differ (a ``classes.txt`` in another
    order, or of other classes) are refused: each IoU would be reported under another class's name. Numbered
    classes (no names recorded, or no ``classes.txt``) are named by the other side."""
    numbered = [str(i) for i in range(len(data))]
    if recorded and recorded != numbered and data != numbered and list(recorded) != list(data):
        raise ValueError(f"{weights} segments {recorded} but the data's classes.txt names {data}: the same ids would "
                         "be different classes; evaluate it on the data it was trained for, in the same order")
    return list(recorded) if recorded and recorded != numbered else list(data)


def evaluate_segmenter_file(
    weights: str | os.PathLike[str],
    *,
    data: str | None = None,
    val_size: int | None = None,
    batch_size: int = 16,
    workers: int = 0,
    device: str = "auto",
    baseline: str = "resnet50",
    speed: bool = True,
) -> dict[str, Any]:
    """Evaluate a ``seg-train`` file (``deploy.safetensors``, ``best.pt``, ``last.pt``) on validation data.

    The data defaults to what the model was trained on (stored in the file). A training-time file
    is converted too and both forms are scored, with their largest logit difference and the
    fraction of agreeing pixels. ``speed`` adds images/s of the model(s) and of the ``baseline``
    ResNet PSPNet (``"none"`` for no baseline) on one validation batch.
    """
    from repvgg.training.distributed import resolve_device
    from repvgg.segmentation.weights import load_segmenter

    check_workers(workers)
    model, meta = load_segmenter(weights)
    config = model.config
    bundle = validation_data(meta, config, data, val_size)
    if bundle.num_classes != config.num_classes:
        raise ValueError(f"{weights} predicts {config.num_classes} classes but the data has {bundle.num_classes}; "
                         "evaluate it on the data it was trained for")
    class_names = _class_names(meta.get("classes"), bundle.classes, weights)
    torch_device = resolve_device(device)
    model = model.to(torch_device)
    models = [model] if model.deploy else [model, reparameterize_model(model)]
    per_batch = batch_size if bundle.uniform_val_size else 1
    loader = DataLoader(bundle.val, batch_size=per_batch,
                        num_workers=check_workers(workers, batches=-(-len(bundle.val) // per_batch)))
    comparison = compare_segmenters(models, loader, config.num_classes, device=torch_device)
    check_outputs(comparison.finite, comparison.relative_error, str(weights))
    result: dict[str, Any] = {
        "weights": os.fspath(weights),
        "model": model.name,
        "form": "converted" if model.deploy else "training-time",
        "dataset": bundle.name,
        **comparison_summary(comparison, class_names),
    }
    if speed:
        images, _ = next(iter(loader))
        labelled = [("converted" if model.deploy else "training-time", model)]
        if len(models) > 1:
            labelled.append(("converted", models[1]))
        if baseline != "none":
            reference = baseline_segmenter(baseline, config).to(torch_device)
            labelled.append((f"{baseline} PSPNet (BN fused, random init)", reference))
        result["speed"] = segmenter_speed(labelled, images.to(torch_device))
        result["speed_input"] = list(images.shape)
    return result

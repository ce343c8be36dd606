"""Scoring a saved detector (``repvgg det-eval``): COCO metrics of the file's detector and, for a training-time file,
of its converted copy on the same images, with the AP difference and the largest box deviation."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

from torch.utils.data import DataLoader

from repvgg.dense.scenes import SyntheticConfig
from repvgg.dense.weights import trained_data_folder
from repvgg.detection.data import DetectionDataBundle, DetectionSet, build_detection_data, build_validation_set
from repvgg.detection.metrics import AP_NAMES, check_same_detections, compare_detectors, comparison_summary
from repvgg.detection.weights import load_detector
from repvgg.limits import check_batch_memory, check_int, check_workers
from repvgg.nn.convert import reparameterize_model
from repvgg.report import markdown_table

__all__ = ["ap_table", "check_categories", "evaluate_detector_file", "validation_data", "validation_set"]


def _data_source(meta: Mapping[str, Any], data: str | None) -> tuple[str | None, SyntheticConfig | None]:
    """The COCO folder ``data`` names, else what the file was trained on (its stored description): a folder, or the
    generated scenes' settings."""
    if data is None:
        data = trained_data_folder(meta)
    if data is None:
        settings = dict((meta.get("data") or {}).get("synthetic") or {})
        if "size_range" in settings:
            settings["size_range"] = tuple(settings["size_range"])
        return None, SyntheticConfig(**settings)
    if not os.path.isdir(data):
        raise FileNotFoundError(f"the data folder {data!r} does not exist; pass --data with the COCO folder to "
                                "evaluate on")
    return data, None


def validation_data(meta: Mapping[str, Any], image_size: int, data: str | None) -> DetectionDataBundle:
    """Both splits of the data ``data`` names, else of what the file was trained on (its stored description)."""
    folder, synthetic = _data_source(meta, data)
    return build_detection_data(folder, image_size=image_size, synthetic=synthetic, augment=False)


def validation_set(meta: Mapping[str, Any], image_size: int, data: str | None) -> tuple[str, DetectionSet]:
    """The name of the data ``data`` names (else of what the file was trained on) and its validation split alone: what
    scoring and checking a detector need, without reading or generating the training split."""
    folder, synthetic = _data_source(meta, data)
    return build_validation_set(folder, image_size=image_size, synthetic=synthetic)


def check_categories(weights: Any, num_classes: int, recorded: list[str] | None, categories: list[str]) -> list[str]:
    """The data's ``categories``, checked against the detector's: as many as its outputs, and the names it records
    (if any) in the same order; a class id beyond the data's would otherwise fail the scoring, or score another
    category.

    Raises:
        ValueError: naming the file, the counts or the names.
    """
    if len(categories) != num_classes:
        raise ValueError(f"{weights} detects {num_classes} class{'es' if num_classes != 1 else ''} but the data has "
                         f"{len(categories)} categories ({categories}); evaluate it on data with the categories it "
                         "was trained on")
    if recorded and list(recorded) != categories:
        raise ValueError(f"{weights} detects {recorded} but the data's categories are {categories}; evaluate it on "
                         "data with the categories it was trained on")
    return categories


def evaluate_detector_file(weights: str | os.PathLike[str], *, data: str | None = None, batch_size: int = 16,
                           workers: int = 0, device: str = "auto") -> dict[str, Any]:
    """Score a ``det-train`` file (``deploy.safetensors``, ``best.pt``, ``last.pt``) with COCO's metrics on the
    validation set of ``data`` (a COCO folder; default: the data the file records). A training-time file is
    converted too, both forms are scored, and the converted one must detect the same (labels, boxes within
    1e-3 px, AP)."""
    from repvgg.training.distributed import resolve_device

    check_workers(workers)
    check_int(batch_size, "--batch-size", low=1)
    model, meta = load_detector(weights)
    size = model.config.image_size
    check_batch_memory(batch_size, (3, size, size), "--batch-size", input_size=False)
    name, val = validation_set(meta, size, data)
    classes = check_categories(weights, model.config.num_classes, meta.get("classes"), list(val.coco.classes))
    torch_device = resolve_device(device)
    model = model.to(torch_device)
    models = [model] if model.deploy else [model, reparameterize_model(model)]
    loader = DataLoader(val, batch_size=batch_size,
                        num_workers=check_workers(workers, batches=-(-len(val) // batch_size)))
    comparison = compare_detectors(models, loader, val.coco, torch_device)
    result: dict[str, Any] = {"weights": os.fspath(weights), "model": model.name,
                              "form": "converted" if model.deploy else "training-time", "dataset": name,
                              "classes": classes, "val_images": comparison.images}
    if len(models) == 1:
        result |= {f"val_{k}": v for k, v in comparison.scores[0].items()}
    else:
        result |= comparison_summary(comparison)
        result["ap_difference"] = result["val_ap_deploy"] - result["val_ap"]
        check_same_detections(result, f"the converted copy of {weights}")
    return result


def ap_table(result: Mapping[str, Any]) -> str:
    """Markdown: COCO's metrics (in %) of the detector and, when both were scored, of its converted copy."""
    both = "val_ap_deploy" in result
    header = ["metric", result.get("form", "model")] + (["converted"] if both else [])

    def cell(value: Any) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"

    rows = [[name.replace("_", " ").replace("ap", "AP"), cell(result.get(f"val_{name}"))]
            + ([cell(result.get(f"val_{name}_deploy"))] if both else []) for name in AP_NAMES]
    return markdown_table(header, rows)

"""Scoring detectors: COCO's AP through ``pycocotools.COCOeval`` (the reference), and two detectors compared box by
box on the same images (what a converted detector must show: the same labels, the same boxes, the same AP)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from repvgg.detection.coco import CocoSet
from repvgg.errors import ConversionMismatch, RunFailed

__all__ = ["AP_NAMES", "BOX_TOLERANCE_PX", "DetectorComparison", "box_deviation", "check_same_detections",
           "coco_scores", "compare_detectors", "comparison_summary", "detect"]

#: COCOeval's first six statistics, by the names metrics.jsonl gives them.
AP_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")

#: How far a converted detector's boxes may lie from the training-time detector's, in pixels.
BOX_TOLERANCE_PX = 1e-3

Detections = list[dict[str, Tensor]]


@torch.no_grad()
def detect(model: nn.Module | Callable[[list[Tensor]], Any], loader: DataLoader,
           device: torch.device | str = "cpu") -> Detections:
    """Run ``model`` (a detector, or any callable taking a list of images and giving torchvision's detections, such
    as an ONNX runner) over a loader of [`DetectionSet`][repvgg.detection.data.DetectionSet] batches; each image's
    ``boxes`` (in its original pixels, clipped to the image: the letterbox's padding is not part of it), ``scores`` and
    ``labels``, in the data set's order (``loader`` in order)."""
    if isinstance(model, nn.Module):
        model.eval()
    records = loader.dataset.coco.images  # type: ignore[attr-defined]
    found: Detections = []
    for images, _, _, indices, scales in loader:
        outputs = model(list((images.to(device).float() / 255).unbind(0)))
        if not all(torch.isfinite(o["boxes"]).all() and torch.isfinite(o["scores"]).all() for o in outputs):
            raise RunFailed(f"{getattr(model, 'name', 'the detector')} gave NaN or infinite boxes or scores, so its "
                            "weights are broken (a diverged run?); no score is reported")
        for output, index, scale in zip(outputs, indices.tolist(), scales.tolist()):
            record = records[index]
            limit = torch.tensor([record["width"], record["height"]] * 2, dtype=torch.float32)
            boxes = (output["boxes"].cpu() / scale).clamp(min=torch.zeros(4), max=limit)
            found.append({"boxes": boxes, "scores": output["scores"].cpu(), "labels": output["labels"].cpu()})
    return found


def coco_scores(coco: CocoSet, detections: Detections) -> dict[str, float]:
    """COCO's AP, AP50, AP75 and AP for small, medium and large objects, in [0, 1], of ``detections`` (one entry per
    image of ``coco``, in its order), computed by ``pycocotools.COCOeval``. The AP of a size no ground-truth object
    has is undefined (COCOeval's -1) and left out."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(coco.images):
        raise ValueError(f"{len(detections)} images' detections for the {len(coco.images)} images of {coco.source}")
    results = []
    for record, found in zip(coco.images, detections):
        for box, score, label in zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist()):
            x1, y1, x2, y2 = box
            results.append({"image_id": record["id"], "category_id": coco.category_ids[label],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    if not results:  # nothing detected: COCO's loadRes refuses an empty list; every AP is 0 (or undefined)
        results = [{"image_id": coco.images[0]["id"], "category_id": coco.category_ids[0], "bbox": [0, 0, 1, 1],
                    "score": 0.0}]  # one zero-score box scores 0 wherever there is ground truth
    with contextlib.redirect_stdout(io.StringIO()):  # COCO's tools print their progress
        truth = COCO()
        truth.dataset = coco.gt
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # COCOeval gives -1 where no ground truth of a size exists: such an AP is undefined, and left out
    return {name: float(v) for name, v in zip(AP_NAMES, evaluation.stats[:6]) if v >= 0}


def box_deviation(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[bool, float]:
    """``(same labels, largest box deviation in pixels)`` between two detectors' answers for one image: each box is
    matched with the closest box of the same label in the other answer (scores within float rounding may order two
    near-equal detections differently)."""
    if sorted(a["labels"].tolist()) != sorted(b["labels"].tolist()):
        return False, float("inf")
    if len(a["labels"]) == 0:
        return True, 0.0
    gaps = (a["boxes"][:, None, :].double() - b["boxes"][None, :, :].double()).abs().amax(-1)
    gaps[a["labels"][:, None] != b["labels"][None, :]] = float("inf")
    return True, float(max(gaps.amin(1).max(), gaps.amin(0).max()))


@dataclass
class DetectorComparison:
    """Detectors scored on the same images: COCO metrics of each, and how far each strays from the first."""

    scores: list[dict[str, float]]
    detections: list[Detections]
    labels_agree: list[bool] = field(default_factory=list)  # per detector after the first: on every image
    max_box_deviation: list[float] = field(default_factory=list)  # pixels, over every box of every image
    images: int = 0


def compare_detectors(models: Sequence[nn.Module | Callable[[list[Tensor]], Any]], loader: DataLoader, coco: CocoSet,
                      device: torch.device | str = "cpu") -> DetectorComparison:
    """Run each model over ``loader`` (in order) and score it on ``coco``; compare every model's boxes with the
    first's."""
    found = [detect(model, loader, device) for model in models]
    comparison = DetectorComparison([coco_scores(coco, d) for d in found], found, images=len(found[0]))
    for other in found[1:]:
        pairs = [box_deviation(a, b) for a, b in zip(found[0], other)]
        comparison.labels_agree.append(all(same for same, _ in pairs))
        comparison.max_box_deviation.append(max((gap for _, gap in pairs), default=0.0))
    return comparison


def comparison_summary(comparison: DetectorComparison) -> dict[str, Any]:
    """The numbers a run's summary keeps of a trained detector (first) and its converted copy (second)."""
    trained, converted = comparison.scores[0], comparison.scores[1]
    return {**{f"val_{k}": v for k, v in trained.items()}, **{f"val_{k}_deploy": v for k, v in converted.items()},
            "labels_agree": comparison.labels_agree[0], "max_box_deviation_px": comparison.max_box_deviation[0],
            "val_images": comparison.images}


def check_same_detections(summary: dict[str, Any], what: str) -> None:
    """Refuse a converted detector that does not detect what its source does: other labels on some image, a box
    more than [`BOX_TOLERANCE_PX`][repvgg.detection.metrics.BOX_TOLERANCE_PX] away, or another AP.

    Raises:
        ConversionMismatch: naming ``what`` and what differs; the caller then writes nothing.
    """
    same_ap = all(summary.get(f"val_{k}") == summary.get(f"val_{k}_deploy") for k in AP_NAMES)
    if not (summary["labels_agree"] and summary["max_box_deviation_px"] <= BOX_TOLERANCE_PX and same_ap):
        raise ConversionMismatch(
            f"{what} does not detect what its source does (labels agree: {summary['labels_agree']}, largest box "
            f"deviation {summary['max_box_deviation_px']:.3g} px, AP {summary['val_ap']:.4f} vs "
            f"{summary['val_ap_deploy']:.4f}); nothing was written")

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

__all__ = ["AP_NAMES", "AP_TOLERANCE", "BOX_TOLERANCE_PX", "SCORE_TOLERANCE", "DetectorComparison", "box_deviation",
           "candidate_deviation", "candidates", "check_same_detections", "coco_scores", "compare_detectors",
           "comparison_summary", "detect", "differs_by_ties_only"]

#: COCOeval's first six statistics, by the names metrics.jsonl gives them.
AP_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")

#: How far a converted detector's boxes may lie from the training-time detector's, in pixels: every anchor's decoded
#: box, before the score threshold and non-maximum suppression.
BOX_TOLERANCE_PX = 1e-3
#: How far its scores may lie from the training-time detector's (probabilities).
SCORE_TOLERANCE = 1e-4
#: How far its AP (in [0, 1]) may lie from the training-time detector's: 0.01 points of 100.
AP_TOLERANCE = 1e-4

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


def differs_by_ties_only(a: dict[str, Tensor], b: dict[str, Tensor], *, iou: float = 0.5) -> bool:
    """True when every box of one answer without a counterpart in the other (same label, within
    [`BOX_TOLERANCE_PX`][repvgg.detection.metrics.BOX_TOLERANCE_PX]) stands for an overlapping box there of the same
    label and a score within [`SCORE_TOLERANCE`][repvgg.detection.metrics.SCORE_TOLERANCE]: non-maximum suppression
    kept the other of two near-ties, which the last bits of a score decide."""
    from torchvision.ops import box_iou

    if sorted(a["labels"].tolist()) != sorted(b["labels"].tolist()):
        return False
    for x, y in ((a, b), (b, a)):
        for box, score, label in zip(x["boxes"], x["scores"], x["labels"]):
            same = y["labels"] == label
            others, other_scores = y["boxes"][same], y["scores"][same]
            if len(others) and float((others - box).abs().amax(-1).min()) <= BOX_TOLERANCE_PX:
                continue
            near = (box_iou(box[None], others)[0] >= iou) & ((other_scores - score).abs() <= SCORE_TOLERANCE)
            if not bool(near.any()):
                return False
    return True


@torch.no_grad()
def candidates(model: Any, images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Every anchor's decoded box ``(N, A, 4)`` (in the resized image's pixels, clipped to the image as the detector
    clips it: an untrained anchor's box hundreds of pixels outside carries float32 rounding of its size) and class
    scores ``(N, A, C)`` of a torchvision FCOS or RetinaNet (or what a detector's own ``candidates`` method gives),
    before the score threshold, the top-k cut and non-maximum suppression: what a converted detector must reproduce
    (NMS itself is discontinuous: two boxes of near-equal score that overlap are kept or dropped by the last bits of
    their scores)."""
    if hasattr(model, "candidates"):
        return model.candidates(images)
    from torchvision.ops import clip_boxes_to_image

    batch, _ = model.transform(images)
    features = list(model.backbone(batch.tensors).values())
    out = model.head(features)
    anchors = model.anchor_generator(batch, features)
    boxes, scores = [], []
    for i, anchor in enumerate(anchors):
        logits = torch.sigmoid(out["cls_logits"][i])
        if "bbox_ctrness" in out:  # FCOS
            decoded = model.box_coder.decode(out["bbox_regression"][i], anchor)
            scores.append(torch.sqrt(logits * torch.sigmoid(out["bbox_ctrness"][i])))
        else:
            decoded = model.box_coder.decode_single(out["bbox_regression"][i], anchor)
            scores.append(logits)
        boxes.append(clip_boxes_to_image(decoded.reshape(-1, 4), batch.image_sizes[i]))
    return torch.stack(boxes), torch.stack(scores)


def candidate_deviation(models: Sequence[nn.Module], loader: DataLoader, device: torch.device | str = "cpu"
                        ) -> tuple[float, float]:
    """The largest box deviation (in the images' original pixels) and score deviation of the second detector's
    candidates from the first's ([`candidates`][repvgg.detection.metrics.candidates]) over ``loader``."""
    box_gap, score_gap = 0.0, 0.0
    for model in models:
        model.eval()
    for images, _, _, _, scales in loader:
        batch = list((images.to(device).float() / 255).unbind(0))
        (boxes_a, scores_a), (boxes_b, scores_b) = (candidates(m, batch) for m in models)
        per_image = (boxes_a - boxes_b).abs().amax(dim=(1, 2)).cpu() / scales
        box_gap = max(box_gap, float(per_image.max()))
        score_gap = max(score_gap, float((scores_a - scores_b).abs().max()))
        if not (torch.isfinite(boxes_b).all() and torch.isfinite(scores_b).all()):
            return float("nan"), float("nan")
    return box_gap, score_gap


@dataclass
class DetectorComparison:
    """Detectors scored on the same images: COCO metrics of each, and how far each strays from the first: its
    candidates' boxes and scores before NMS, its final detections' labels and the largest shift of a final box."""

    scores: list[dict[str, float]]
    detections: list[Detections]
    labels_agree: list[bool] = field(default_factory=list)  # per detector after the first: on every image
    max_detection_shift: list[float] = field(default_factory=list)  # pixels, a final box from its closest match
    max_box_deviation: list[float] = field(default_factory=list)  # pixels, every candidate box (modules only)
    max_score_deviation: list[float] = field(default_factory=list)
    images: int = 0


def compare_detectors(models: Sequence[nn.Module | Callable[[list[Tensor]], Any]], loader: DataLoader, coco: CocoSet,
                      device: torch.device | str = "cpu") -> DetectorComparison:
    """Run each model over ``loader`` (in order) and score it on ``coco``; compare every model's boxes with the
    first's."""
    found = [detect(model, loader, device) for model in models]
    comparison = DetectorComparison([coco_scores(coco, d) for d in found], found, images=len(found[0]))
    for model, other in zip(models[1:], found[1:]):
        pairs = [box_deviation(a, b) for a, b in zip(found[0], other)]
        comparison.labels_agree.append(all(same for same, _ in pairs))
        comparison.max_detection_shift.append(max((gap for _, gap in pairs), default=0.0))
        if isinstance(models[0], nn.Module) and isinstance(model, nn.Module):
            box_gap, score_gap = candidate_deviation([models[0], model], loader, device)
            comparison.max_box_deviation.append(box_gap)
            comparison.max_score_deviation.append(score_gap)
    return comparison


def comparison_summary(comparison: DetectorComparison) -> dict[str, Any]:
    """The numbers a run's summary keeps of a trained detector (first) and its converted copy (second)."""
    trained, converted = comparison.scores[0], comparison.scores[1]
    return {**{f"val_{k}": v for k, v in trained.items()}, **{f"val_{k}_deploy": v for k, v in converted.items()},
            "labels_agree": comparison.labels_agree[0], "max_box_deviation_px": comparison.max_box_deviation[0],
            "max_score_deviation": comparison.max_score_deviation[0],
            "max_detection_shift_px": comparison.max_detection_shift[0], "val_images": comparison.images}


def check_same_detections(summary: dict[str, Any], what: str) -> None:
    """Refuse a converted detector that does not detect what its source does: a candidate box more than
    [`BOX_TOLERANCE_PX`][repvgg.detection.metrics.BOX_TOLERANCE_PX] away or a score more than
    [`SCORE_TOLERANCE`][repvgg.detection.metrics.SCORE_TOLERANCE] (before NMS), other labels on some image, or an AP
    more than [`AP_TOLERANCE`][repvgg.detection.metrics.AP_TOLERANCE] away (NaN fails every test).

    Raises:
        ConversionMismatch: naming ``what`` and what differs; the caller then writes nothing.
    """
    same_ap = all(abs(summary[f"val_{k}"] - summary[f"val_{k}_deploy"]) <= AP_TOLERANCE
                  for k in AP_NAMES if f"val_{k}" in summary)
    if not (summary["labels_agree"] and summary["max_box_deviation_px"] <= BOX_TOLERANCE_PX
            and summary["max_score_deviation"] <= SCORE_TOLERANCE and same_ap):
        raise ConversionMismatch(
            f"{what} does not detect what its source does (boxes before NMS up to {summary['max_box_deviation_px']:.3g}"
            f" px apart, scores up to {summary['max_score_deviation']:.3g}, labels agree: {summary['labels_agree']}, "
            f"AP {summary['val_ap']:.4f} vs {summary['val_ap_deploy']:.4f}); nothing was written")

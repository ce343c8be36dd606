"""The detection job as a task of the training engine: an FCOS or RetinaNet on a multi-branch RepVGG, converted,
and shown to detect the same.

``train_detector(config)`` runs it through [`repvgg.training.engine.fit`][repvgg.training.engine.fit], so a run is
resumable, locked, and stops cleanly on a signal or a divergence like ``repvgg train``: data -> detector -> SGD with
warm-up and cosine decay, each loss term recorded -> COCO AP per epoch -> the training-time detector and its
converted copy run on the whole validation set (the same labels, boxes within 1e-3 px, the same AP, or no deploy
file) -> files in the run folder.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from repvgg.dense.scenes import SyntheticConfig
from repvgg.dense.task import DenseTask
from repvgg.detection.config import DetTrainConfig
from repvgg.detection.data import DetectionDataBundle, build_detection_data
from repvgg.detection.detector import Detector, DetectorConfig, build_detector
from repvgg.detection.metrics import check_same_detections, compare_detectors, comparison_summary
from repvgg.detection.plots import plot_detection_curves, plot_detections
from repvgg.detection.weights import save_detector
from repvgg.nn.complexity import count_parameters
from repvgg.training.distributed import DistContext, dataset_size
from repvgg.training.engine import StepOutput, fit
from repvgg.training.evaluate import compare_models
from repvgg.training.optim import learning_rate
from repvgg.training.run_folder import LOOP_CHANGEABLE
from repvgg.training.trackers import Tracker

__all__ = ["DetectionTask", "detector_config", "train_detector"]

logger = logging.getLogger(__name__)

#: Validation images drawn in ``predictions.png``.
PREDICTION_SAMPLES = 8


def _synthetic(config: DetTrainConfig) -> SyntheticConfig:
    return SyntheticConfig(image_size=config.image_size, num_train=config.synthetic_train,
                           num_val=config.synthetic_val, seed=config.synthetic_seed)


def _data_description(config: DetTrainConfig) -> dict[str, Any]:
    """What ``repvgg det-eval`` needs to rebuild the validation set (stored with the weights)."""
    if config.synthetic:
        synthetic = dataclasses.asdict(_synthetic(config))
        return {"data": None, "synthetic": synthetic | {"size_range": list(synthetic["size_range"])}}
    return {"data": str(Path(config.data or "").resolve()), "synthetic": None}


def detector_config(config: DetTrainConfig, num_classes: int) -> DetectorConfig:
    """The architecture ``config`` trains, for ``num_classes`` classes."""
    assert config.backbone is not None  # resolved by the config
    return DetectorConfig(backbone=config.backbone, num_classes=num_classes, kind=config.kind,
                          fpn_channels=config.fpn_channels, head_convs=config.head_convs, neck_depth=config.neck_depth,
                          image_size=config.image_size)


def _targets(boxes: Tensor, labels: Tensor) -> list[dict[str, Tensor]]:
    """The padded rows of a batch (label -1) dropped: torchvision's per-image targets."""
    return [{"boxes": b[keep], "labels": c[keep]} for b, c in zip(boxes, labels) for keep in [c >= 0]]


class DetectionTask(DenseTask[DetTrainConfig, DetectionDataBundle]):
    """Object detection on the generated scenes or a COCO folder (``repvgg det-train``)."""

    command = "det-train"
    score = "val_ap"
    changeable_on_resume: tuple[str, ...] = LOOP_CHANGEABLE

    def __init__(self) -> None:
        super().__init__()
        self.loss_names: list[str] = []

    def default_output(self, config: DetTrainConfig) -> Path:
        dataset = "scenes" if config.synthetic else Path(config.data or "").name
        return Path("runs") / f"det-{config.kind}-{config.backbone}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"

    def setup(self, config: DetTrainConfig, ctx: DistContext,
              resumed: Mapping[str, Any] | None = None) -> tuple[DetTrainConfig, Dataset]:
        detector_config(config, 1)  # the architecture's rules (no pyramid width for yolo, ...) before the data
        bundle = build_detection_data(config.data, image_size=config.image_size, max_objects=config.max_objects,
                                      synthetic=_synthetic(config) if config.synthetic else None)
        self.start(config, ctx, resumed, bundle)
        self.loss_names = ["classification", "bbox_regression"] + (["bbox_ctrness"] if config.kind == "fcos" else [])
        return self.config, self.bundle.train

    def input_shape(self) -> tuple[int, ...]:
        return (3, self.config.image_size, self.config.image_size)

    def build_model(self, config: DetTrainConfig, device: torch.device) -> Detector:
        return build_detector(detector_config(config, self.bundle.num_classes),
                              backbone_weights=self.initial_backbone_weights).to(device)

    def val_loader(self, local_batch: int, ctx: DistContext) -> DataLoader:
        # COCO's AP is not a sum over shards: every process scores the whole validation set, in order
        return DataLoader(self.bundle.val, batch_size=local_batch, num_workers=self.config.workers,
                          persistent_workers=self.config.workers > 0)

    def describe(self, model: nn.Module, config: DetTrainConfig, steps_per_epoch: int) -> str:
        b = self.bundle
        c: DetectorConfig = getattr(model, "config")
        neck = f"Rep-PAN depth {c.neck_depth}" if c.kind == "yolo" else f"FPN {c.fpn_channels}"
        return (f"{model.name} on {b.name}: {dataset_size(b.train)} train / {dataset_size(b.val)} val images, "
                f"{b.num_classes} classes, {config.image_size}x{config.image_size}, {neck}, {c.head_convs} head convs")

    def learning_rate(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warmup = int(round(self.config.warmup_epochs * steps_per_epoch))
        return learning_rate(step, total_steps, self.config.resolved_lr, warmup)

    def training_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        images, boxes, labels, _, _ = (t.to(self.device, non_blocking=True) for t in batch)
        losses = net(list((images.float() / 255).unbind(0)), _targets(boxes, labels))
        terms = torch.stack([losses[name] for name in self.loss_names])
        count = images.shape[0]
        return StepOutput(terms.sum(), count, terms.detach() * count)

    def train_metrics(self, sums: Tensor) -> dict[str, float]:
        images = float(sums[1])
        return {"train_loss": float(sums[0]) / images,
                **{f"train_{name}_loss": float(v) / images for name, v in zip(self.loss_names, sums[2:])}}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        scores = compare_detectors([model], loader, self.bundle.val.coco, self.device).scores[0]
        return {f"val_{name}": value for name, value in scores.items()}  # fractions, as the summary and det-eval

    def checkpoint_fields(self, model: Detector) -> dict[str, Any]:
        return {"arch": model.name, "detector": model.config.to_dict(), "classes": list(self.bundle.classes),
                "data": _data_description(self.config)}

    def compare(self, model: Detector, plain: Detector, loader: DataLoader) -> dict[str, Any]:
        """Both forms on the whole validation set: the same labels, boxes within ``BOX_TOLERANCE_PX``, the same AP,
        or a ConversionMismatch (the engine then writes no deploy file)."""
        comparison = compare_detectors([model, plain], loader, self.bundle.val.coco, self.device)
        summary = comparison_summary(comparison)
        features = compare_models([model.backbone, plain.backbone], _normalised(loader, model),
                                  output=lambda maps: torch.cat([m.flatten(1) for m in maps.values()], 1))
        summary |= {"max_abs_diff": features.max_abs_diff[0], "relative_error": features.relative_error[0]}
        check_same_detections(summary, "the converted detector")
        return {"model": model.name, "detector": model.config.to_dict(), "dataset": self.bundle.name,
                "classes": list(self.bundle.classes), **summary,
                "params_train": count_parameters(model), "params_deploy": count_parameters(plain)}

    def save(self, model: Detector, plain: Detector, summary: dict[str, Any], history: list[dict[str, Any]],
             output: Path) -> None:
        save_detector(plain, output / "deploy.safetensors", classes=self.bundle.classes,
                      data=_data_description(self.config))
        plot_detection_curves(history, output / "curves.png", title=f"{model.name} on {self.bundle.name}")
        samples = min(PREDICTION_SAMPLES, dataset_size(self.bundle.val))
        plot_detections(self.bundle.val, plain, range(samples), output / "predictions.png", self.bundle.classes,
                        title=f"{model.name} (converted), val AP50 {100 * summary['val_ap50_deploy']:.1f}")
        s = summary
        logger.info("\n  training-time: AP %.2f  AP50 %.2f  %d params\n  converted:     AP %.2f  AP50 %.2f  %d params"
                    "\n  labels agree on all %d images: %s; largest box deviation before NMS %.3g px",
                    100 * s["val_ap"], 100 * s["val_ap50"], s["params_train"], 100 * s["val_ap_deploy"],
                    100 * s["val_ap50_deploy"], s["params_deploy"], s["val_images"], s["labels_agree"],
                    s["max_box_deviation_px"])


def _normalised(loader: DataLoader, model: Detector) -> Any:
    """The loader's images as the detector's backbone sees them (normalised), with placeholder labels."""
    for images, *_ in loader:
        batch = model.transform.normalize(images.float() / 255)
        yield batch, torch.zeros(batch.shape[0], dtype=torch.long)


def train_detector(config: DetTrainConfig, trackers: Sequence[Tracker] = ()) -> dict[str, Any]:
    """Run the whole detection job described by ``config``; the summary (also in ``summary.json``).

    A SIGINT/SIGTERM or ``stop_after_steps`` ends the run early with a resumable ``last.pt``; the summary then has
    ``"interrupted": true``.
    """
    return fit(DetectionTask(), config, trackers)

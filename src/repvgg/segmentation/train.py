"""The segmentation job as a task of the training engine: a PSPNet on a multi-branch RepVGG, converted,
and shown to segment the same.

``train_segmenter(config)`` runs it through [`repvgg.training.engine.fit`][repvgg.training.engine.fit] (so a run is
resumable and ``torchrun``-ready like ``repvgg train``): data -> segmenter -> SGD with the poly learning rate and the
auxiliary loss -> per-epoch validation and checkpoints -> the training-time segmenter and its converted
copy scored on the same pixels and timed next to a ResNet PSPNet -> files in the run folder.
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

from repvgg.dense.task import DenseTask
from repvgg.nn.complexity import count_parameters
from repvgg.training.distributed import DistContext, dataset_size
from repvgg.training.engine import StepOutput, eval_loader, fit
from repvgg.training.run_folder import LOOP_CHANGEABLE
from repvgg.training.trackers import Tracker
from repvgg.segmentation.config import FAST_DILATED_LAYERS, SegTrainConfig
from repvgg.segmentation.data import SegmentationDataBundle, build_segmentation_data
from repvgg.segmentation.evaluate import baseline_segmenter, comparison_summary, segmenter_speed
from repvgg.segmentation.metrics import compare_segmenters
from repvgg.segmentation.plots import plot_predictions, plot_segmentation_curves
from repvgg.segmentation.pspnet import PSPNet, SegmenterConfig, build_segmenter, main_logits, segmentation_loss
from repvgg.segmentation.synthetic import SyntheticConfig
from repvgg.segmentation.weights import save_segmenter

__all__ = ["SegmentationTask", "train_segmenter", "segmenter_config", "synthetic_config", "poly_learning_rate",
           "default_segmentation_output_dir"]

logger = logging.getLogger(__name__)

#: Validation scenes drawn in ``predictions.png``.
PREDICTION_SAMPLES = 4


def poly_learning_rate(step: int, total_steps: int, base_lr: float, power: float = 0.9) -> float:
    """``base_lr * (1 - step / total_steps) ** power``: the "poly" schedule of DeepLab and PSPNet."""
    return base_lr * (1.0 - min(step, total_steps) / max(1, total_steps)) ** power


def default_segmentation_output_dir(config: SegTrainConfig) -> Path:
    dataset = "shapes" if config.synthetic or config.data is None else Path(config.data).name
    variant = "-fast" if config.fast else ""
    return Path("runs") / f"seg-{config.backbone}{variant}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def synthetic_config(config: SegTrainConfig) -> SyntheticConfig:
    """The generated data ``config`` trains on (also stored with the weights, so ``seg-eval`` rebuilds it)."""
    return SyntheticConfig(image_size=config.synthetic_size, num_train=config.synthetic_train,
                           num_val=config.synthetic_val, seed=config.synthetic_seed)


def segmenter_config(config: SegTrainConfig, num_classes: int) -> SegmenterConfig:
    """The architecture ``config`` describes, for ``num_classes`` classes."""
    return SegmenterConfig(
        backbone=config.backbone,
        num_classes=num_classes,
        dilated_layers=FAST_DILATED_LAYERS if config.fast else config.dilated_layers,
        head_channels=config.head_channels,
        aux_channels=config.aux_channels,
        dropout=config.dropout,
    )


def _data_description(config: SegTrainConfig) -> dict[str, Any]:
    """What ``repvgg seg-eval`` needs to rebuild the validation set (stored with the weights)."""
    if config.synthetic or config.data is None:
        synthetic = dataclasses.asdict(synthetic_config(config))
        synthetic["size_range"] = list(synthetic["size_range"])
        return {"data": None, "synthetic": synthetic, "val_size": config.val_size}
    return {"data": str(Path(config.data).resolve()), "synthetic": None, "val_size": config.val_size}


def _build_data(config: SegTrainConfig) -> SegmentationDataBundle:
    return build_segmentation_data(
        None if config.synthetic else config.data,
        num_classes=config.num_classes,
        crop_size=config.crop_size,
        scale_range=config.scale_range,
        val_size=config.val_size,
        synthetic=synthetic_config(config) if config.synthetic else None,
    )


class SegmentationTask(DenseTask[SegTrainConfig, SegmentationDataBundle]):
    """Semantic segmentation with a PSPNet on the generated shapes or an image/label folder (``repvgg seg-train``)."""

    command = "seg-train"
    score = "val_miou"
    changeable_on_resume: tuple[str, ...] = (*LOOP_CHANGEABLE, "aux_weight", "poly_power", "baseline")

    def __init__(self) -> None:
        super().__init__()
        self.val_batch_size = 1

    def default_output(self, config: SegTrainConfig) -> Path:
        return default_segmentation_output_dir(config)

    def setup(self, config: SegTrainConfig, ctx: DistContext,
              resumed: Mapping[str, Any] | None = None) -> tuple[SegTrainConfig, Dataset]:
        self.start(config, ctx, resumed, _build_data(config))
        return self.config, self.bundle.train

    def input_shape(self) -> tuple[int, ...]:
        side = max(self.bundle.crop_size, self.config.val_size or 0, self.config.synthetic_size)
        return (3, side, side)

    def build_model(self, config: SegTrainConfig, device: torch.device) -> PSPNet:
        return build_segmenter(segmenter_config(config, self.bundle.num_classes),
                               backbone_weights=self.initial_backbone_weights).to(device)

    def val_loader(self, local_batch: int, ctx: DistContext) -> DataLoader:
        self.val_batch_size = local_batch if self.bundle.uniform_val_size else 1
        return eval_loader(self.bundle.val, batch_size=self.val_batch_size, workers=self.config.workers, ctx=ctx)

    def describe(self, model: nn.Module, config: SegTrainConfig, steps_per_epoch: int) -> str:
        b = self.bundle
        return (f"{model.name} on {b.name}: {dataset_size(b.train)} train / {dataset_size(b.val)} val images, "
                f"{b.num_classes} classes, crop {b.crop_size}")

    def learning_rate(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        return poly_learning_rate(step, total_steps, self.config.resolved_lr, self.config.poly_power)

    def training_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        images, labels = batch
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        out = net(images)
        ignore = self.bundle.ignore_index
        loss = segmentation_loss(out, labels, aux_weight=self.config.aux_weight, ignore_index=ignore)
        labelled = labels != ignore
        correct = (main_logits(out).detach().argmax(1) == labels) & labelled
        return StepOutput(loss, labels.shape[0], torch.stack([correct.sum(), labelled.sum()]))

    def train_metrics(self, sums: Tensor) -> dict[str, float]:
        return {"train_loss": float(sums[0] / sums[1]),
                "train_pixel_accuracy": float(100 * sums[2] / max(1.0, float(sums[3])))}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        report = compare_segmenters([model], loader, self.bundle.num_classes, device=self.device,
                                    ignore_index=self.bundle.ignore_index)
        scores = report.metrics[0]
        return {"val_loss": report.loss[0], "val_miou": 100 * scores.mean_iou,
                "val_pixel_accuracy": 100 * scores.pixel_accuracy}

    def checkpoint_fields(self, model: PSPNet) -> dict[str, Any]:
        return {"arch": model.name, "segmenter": model.config.to_dict(), "classes": list(self.bundle.classes),
                "data": _data_description(self.config)}

    def compare(self, model: PSPNet, plain: PSPNet, loader: DataLoader) -> dict[str, Any]:
        comparison = compare_segmenters([model, plain], loader, self.bundle.num_classes, device=self.device,
                                        ignore_index=self.bundle.ignore_index)
        return {
            "model": model.name,
            "backbone": model.config.backbone,
            "fast": self.config.fast,
            "segmenter": model.config.to_dict(),
            "dataset": self.bundle.name,
            "classes": list(self.bundle.classes),
            "crop_size": self.bundle.crop_size,
            **comparison_summary(comparison, self.bundle.classes),
            "pixels": comparison.pixels,
            "params_train": count_parameters(model),
            "params_deploy": count_parameters(plain),
        }

    def save(self, model: PSPNet, plain: PSPNet, summary: dict[str, Any], history: list[dict[str, Any]],
             output: Path) -> None:
        bundle, device = self.bundle, self.device
        images, _ = next(iter(DataLoader(bundle.val, batch_size=self.val_batch_size)))
        images = images.to(device)
        timed: list[tuple[str, nn.Module]] = [("training-time", model), ("converted", plain)]
        if self.config.baseline != "none":
            timed.append((f"{self.config.baseline} PSPNet (BN fused, random init)",
                          baseline_segmenter(self.config.baseline, model.config).to(device)))
        summary["speed"] = segmenter_speed(timed, images)
        summary["speed_input"] = list(images.shape)
        save_segmenter(plain, output / "deploy.safetensors", classes=bundle.classes,
                       data=_data_description(self.config))
        plot_segmentation_curves(history, output / "curves.png", title=f"{model.name} on {bundle.name}")
        samples = []
        with torch.no_grad():
            for index in range(min(PREDICTION_SAMPLES, dataset_size(bundle.val))):
                image, label = bundle.val[index]
                prediction = plain(image[None].to(device)).argmax(1)[0].cpu()
                samples.append((image, label, prediction))
        miou = summary["val_miou_deploy"]
        plot_predictions(samples, output / "predictions.png", bundle.classes,
                         title=f"{model.name} (converted)" + (f", val mIoU {miou:.1f}%" if miou is not None else ""))
        s = summary
        logger.info(
            "\n  training-time: mIoU %.2f%%  pixel acc %.2f%%  %d params  %.1f img/s"
            "\n  converted:     mIoU %.2f%%  pixel acc %.2f%%  %d params  %.1f img/s"
            "\n  max |logit difference| %.3g, predicted classes agree on %.4f%% of %d pixels",
            s["val_miou"], s["pixel_accuracy"], s["params_train"], s["speed"][0]["images_per_s"],
            s["val_miou_deploy"], s["pixel_accuracy_deploy"], s["params_deploy"], s["speed"][1]["images_per_s"],
            s["max_abs_diff"], 100 * s["pixel_agreement"], s["pixels"],
        )


def train_segmenter(config: SegTrainConfig, trackers: Sequence[Tracker] = ()) -> dict[str, Any]:
    """Run the whole segmentation job described by ``config``; the summary (also in ``summary.json``).

    Under ``torchrun`` every process calls this; only rank 0 logs and writes. A SIGINT/SIGTERM or
    ``stop_after_steps`` ends the run early with a resumable ``last.pt``; the summary then has
    ``"interrupted": true``.
    """
    return fit(SegmentationTask(), config, trackers)

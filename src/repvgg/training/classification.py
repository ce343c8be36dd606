"""The main job as a task of the training engine: classify images with a multi-branch RepVGG, convert it,
and show the plain model computes the same.

``train(config)`` runs the whole job through [`repvgg.training.engine.fit`][repvgg.training.engine.fit] and returns the
summary: data -> model -> SGD with warm-up and cosine decay (optionally mixup/cutmix, custom L2, EMA) -> per-epoch
validation and checkpoints -> the training-time model and its converted copy evaluated on the same
batches -> ``deploy.safetensors`` and ``curves.png`` in the run folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from repvgg.io.weights import checkpoint_num_classes, load_state_dict_into, read_checkpoint, save_weights
from repvgg.io.loading import resolve_weights
from repvgg.nn.complexity import count_parameters
from repvgg.nn.model import RepVGG
from repvgg.nn.registry import build_model, spec_overrides
from repvgg.training.config import TrainConfig
from repvgg.training.data import DatasetBundle, build_datasets
from repvgg.training.distributed import DistContext, all_reduce, dataset_size
from repvgg.training.devices import training_memory_format
from repvgg.training.engine import StepOutput, eval_loader, fit
from repvgg.training.evaluate import evaluate_models, measure_throughput
from repvgg.training.optim import custom_l2, learning_rate
from repvgg.training.run_folder import LOOP_CHANGEABLE, data_identity
from repvgg.training.task import TaskSetup
from repvgg.training.trackers import Tracker

__all__ = ["ClassificationTask", "train", "default_output_dir"]

logger = logging.getLogger(__name__)


def default_output_dir(config: TrainConfig) -> Path:
    dataset = "digits" if config.data is None else Path(config.data).name
    return Path("runs") / f"{config.model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


class ClassificationTask(TaskSetup[TrainConfig, DatasetBundle]):
    """Image classification on the digits or an ImageFolder tree (``repvgg train``); a
    [`Task`][repvgg.training.task.Task] of any ``nn.Module``, since its QAT subclass trains a prepared graph."""

    command = "train"
    score = "val_top1"
    min_local_batch = 2  # BatchNorm of a 1 x 1 map (the last stage at 32 x 32) needs two images
    changeable_on_resume: tuple[str, ...] = (*LOOP_CHANGEABLE, "aux_weight", "bad_images", "inference_speed",
                                              "grad_checkpointing", "channels_last")
    input_fields: tuple[str, ...] = ("data", "weights")

    def __init__(self) -> None:
        super().__init__()
        self.device = torch.device("cpu")
        self.memory_format = torch.contiguous_format
        self.criterion: nn.Module = nn.CrossEntropyLoss()
        self.mixer: Any = None
        self.resumed: Mapping[str, Any] | None = None
        self.aux_heads: list[str] = []  # the model's training-only classifiers, each with its own loss

    def default_output(self, config: TrainConfig) -> Path:
        return default_output_dir(config)

    def setup(self, config: TrainConfig, ctx: DistContext,
              resumed: Mapping[str, Any] | None = None) -> tuple[TrainConfig, Dataset]:
        self.device, self.resumed = ctx.device, resumed
        self.memory_format = training_memory_format(config.channels_last, ctx.device)
        self.bundle = build_datasets(config.data, img_size=config.img_size, test_size=config.test_size,
                                     val_fraction=config.val_fraction,
                                     auto_augment=config.auto_augment, bad_images=config.bad_images,
                                     random_erasing=config.random_erasing, color_jitter=config.color_jitter,
                                     data_config=_model_data_config(config) if config.data else None)
        # Save the resolved values (learning rate, image size, warm-up), not the "derive it" placeholders.
        self.config = config.updated(lr=config.resolved_lr, img_size=self.bundle.img_size,
                                     warmup_epochs=config.resolved_warmup_epochs)
        self.criterion, self.mixer = _loss_function(self.config, self.bundle.num_classes)
        return self.config, self.bundle.train

    def input_shape(self) -> tuple[int, ...]:
        side = max(self.bundle.img_size, self.bundle.preprocessing.img_size)  # training or evaluation, the larger
        return (3, side, side)

    def data_identity(self) -> dict[str, Any]:
        return data_identity(self.bundle.classes, dataset_size(self.bundle.train), dataset_size(self.bundle.val))

    def build_model(self, config: TrainConfig, device: torch.device) -> nn.Module:
        model = build_model(config.model, num_classes=self.bundle.num_classes, **config.model_overrides)
        if config.weights and self.resumed is None:  # a resume's weights come from its checkpoint
            state_dict, _ = read_checkpoint(resolve_weights(config.weights))
            skip_head = checkpoint_num_classes(state_dict) not in (None, self.bundle.num_classes)
            if skip_head:
                logger.info("%s has a different number of classes: keeping a fresh classifier", config.weights)
            load_state_dict_into(model, state_dict, source=config.weights, skip_head=skip_head)
        if config.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.aux_heads = [f"{position}_aux" for position in getattr(model, "aux_positions", [])]
        if self.aux_heads:
            model.set_aux_outputs(True)
        return model.to(device).to(memory_format=self.memory_format)

    def val_loader(self, local_batch: int, ctx: DistContext) -> DataLoader:
        return eval_loader(self.bundle.val, batch_size=local_batch, workers=self.config.workers, ctx=ctx)

    def describe(self, model: nn.Module, config: TrainConfig, steps_per_epoch: int) -> str:
        b = self.bundle
        test = b.preprocessing.img_size
        return (f"{model.name} on {b.name}: {dataset_size(b.train)} train / {dataset_size(b.val)} val images, "
                f"{b.num_classes} classes, {b.img_size}x{b.img_size}"
                + (f", evaluated at {test}x{test}" if test != b.img_size else ""))

    def learning_rate(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warmup_steps = int(round(self.config.resolved_warmup_epochs * steps_per_epoch))
        return learning_rate(step, total_steps, self.config.resolved_lr, warmup_steps)

    def training_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        images, labels = batch
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        targets = labels
        if self.mixer is not None:
            images, targets = self.mixer(images, labels)
        output = net(images)
        logits = output["main"] if isinstance(output, dict) else output
        loss = self.criterion(logits, targets)
        parts = [loss.detach()]  # the main loss, then each auxiliary head's: recorded apart
        for name in self.aux_heads:
            aux_loss = self.criterion(output[name], targets)
            parts.append(aux_loss.detach())
            loss = loss + self.config.aux_weight * aux_loss
        if self.config.custom_l2:
            loss = loss + 0.5 * self.config.weight_decay * custom_l2(model)
        correct = (logits.detach().argmax(1) == labels).sum()
        extra = torch.stack(parts) * labels.numel() if self.aux_heads else correct.new_zeros(0)
        return StepOutput(loss, labels.numel(), torch.cat([correct.reshape(1).to(extra.dtype), extra]))

    def train_metrics(self, sums: Tensor) -> dict[str, float]:
        images = sums[1]
        metrics = {"train_loss": float(sums[0] / images), "train_top1": float(100 * sums[2] / images)}
        if self.aux_heads:  # the main loss and each auxiliary loss, unweighted
            names = ["main", *self.aux_heads]
            metrics.update({f"train_{name}_loss": float(total / images) for name, total in zip(names, sums[3:])})
        return metrics

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        report = evaluate_models([model], loader, self.device,
                                 channels_last=self.memory_format == torch.channels_last)
        return {"val_loss": report.loss[0], "val_top1": report.top1[0], "val_top5": report.top5[0],
                **self._skipped()}

    def _skipped(self) -> dict[str, int]:
        """Images skipped as unreadable (``--bad-images skip``) since the last call: in training (this epoch) and
        in the evaluation just run, over every process; nothing for data that cannot skip (the digits)."""
        splits = [(name, getattr(self.bundle, name)) for name in ("train", "val")]
        if not all(hasattr(dataset, "take_skipped") for _, dataset in splits):
            return {}
        counts = torch.tensor([dataset.take_skipped() for _, dataset in splits], dtype=torch.float64)
        all_reduce(counts, "sum")
        return {f"{name}_skipped_images": int(count) for (name, _), count in zip(splits, counts)}

    def checkpoint_fields(self, model: nn.Module) -> dict[str, Any]:
        assert isinstance(model, RepVGG)  # what build_model builds (QATTask, training another model, overrides this)
        return {"arch": model.name, "spec": model.spec.to_dict(),
                "spec_overrides": spec_overrides(model.name, model.spec), "num_classes": model.num_classes,
                "in_chans": model.in_chans, **self.bundle.card.metadata()}

    def compare(self, model: nn.Module, plain: nn.Module, loader: DataLoader) -> dict[str, Any]:
        report = evaluate_models([model, plain], loader, self.device,
                                 channels_last=self.memory_format == torch.channels_last)
        skipped = self._skipped()
        images, _ = next(iter(loader))
        speed = (measure_throughput([model, plain], images.to(self.device)) if self.config.inference_speed
                 else [None, None])
        return {
            "model": model.name,
            "dataset": self.bundle.name,
            "num_classes": self.bundle.num_classes,
            "img_size": self.bundle.img_size,
            "test_size": self.bundle.preprocessing.img_size,
            "val_images": report.images,
            "val_top1": report.top1[0],
            "val_top5": report.top5[0],
            "val_top1_deploy": report.top1[1],
            "val_top5_deploy": report.top5[1],
            "max_abs_diff": report.max_abs_diff[0],
            "relative_error": report.relative_error[0],
            "prediction_agreement": report.agreement[0],
            "params_train": count_parameters(model),
            "params_deploy": count_parameters(plain),
            "infer_images_per_s_train": speed[0],
            "infer_images_per_s_deploy": speed[1],
            "infer_batch_size": int(images.shape[0]),
            **({"skipped_images": {"val": skipped["val_skipped_images"]}} if skipped else {}),
        }

    def save(self, model: nn.Module, plain: nn.Module, summary: dict[str, Any], history: list[dict[str, Any]],
             output: Path) -> None:
        from repvgg.plots import plot_training_curves

        if "skipped_images" in summary and history:  # the last epoch's training pass, beside the final evaluation's
            summary["skipped_images"]["train"] = history[-1].get("train_skipped_images", 0)
        assert isinstance(plain, RepVGG)  # the converted copy of what build_model builds (QATTask overrides this)
        save_weights(plain, output / "deploy.safetensors", extra={"dataset": self.bundle.name,
                                                                   **self.bundle.card.metadata()})
        plot_training_curves(history, output / "curves.png", title=f"{model.name} on {self.bundle.name}")
        s = summary
        logger.info(
            "\n  training-time: top-1 %.2f%%  top-5 %.2f%%  %d params  %s img/s"
            "\n  converted:     top-1 %.2f%%  top-5 %.2f%%  %d params  %s img/s"
            "\n  max |logit difference| %.3g, predictions agree on %.2f%% of %d images"
            "\n  deploy.safetensors holds the %s weights (epoch %d); --deploy-from %s converts the %s ones",
            s["val_top1"], s["val_top5"], s["params_train"], _rate(s["infer_images_per_s_train"]),
            s["val_top1_deploy"], s["val_top5_deploy"], s["params_deploy"], _rate(s["infer_images_per_s_deploy"]),
            s["max_abs_diff"], 100 * s["prediction_agreement"], s["val_images"],
            "last epoch's" if s["deploy_from"] == "last" else "best epoch's", s["deploy_epoch"],
            "best" if s["deploy_from"] == "last" else "last", "best epoch's" if s["deploy_from"] == "last" else "last",
        )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _model_data_config(config: TrainConfig) -> dict[str, Any]:
    """timm's data configuration of the model to train (built on the meta device: no memory)."""
    from timm.data import resolve_data_config

    with torch.device("meta"):
        probe = build_model(config.model, **config.model_overrides)
    return resolve_data_config({}, model=probe)


class _AnyBatchMixup:
    """timm's ``Mixup``, which mixes a batch with its reverse and so takes even batches only, for a batch of any size:
    an odd one's last image (a micro-batch of an odd size, a batch left short by a skipped image) is kept unmixed,
    with its label's (smoothed) target."""

    def __init__(self, mixer: Any) -> None:
        self.mixer = mixer

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        from timm.data.mixup import mixup_target

        even = len(images) - len(images) % 2
        if even == len(images):
            return self.mixer(images, labels)
        kept = mixup_target(labels[even:], self.mixer.num_classes, smoothing=self.mixer.label_smoothing)
        if even == 0:
            return images, kept
        mixed, targets = self.mixer(images[:even], labels[:even])
        return torch.cat([mixed, images[even:]]), torch.cat([targets, kept])


def _loss_function(config: TrainConfig, num_classes: int) -> tuple[nn.Module, Any]:
    if config.mixup > 0 or config.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixer = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                      label_smoothing=config.label_smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), _AnyBatchMixup(mixer)
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), None


def train(config: TrainConfig, trackers: Sequence[Tracker] = ()) -> dict[str, Any]:
    """Run the whole classification job described by ``config``; the summary (also in ``summary.json``).

    Under ``torchrun`` every process calls this; only rank 0 logs and writes. A SIGINT/SIGTERM or
    ``stop_after_steps`` ends the run early with a resumable ``last.pt``; the summary then has
    ``"interrupted": true``.
    """
    if config.qat:
        raise ValueError("a QAT config runs through repvgg.quant.qat.train_qat (repvgg train --qat)")
    return fit(ClassificationTask(), config, trackers)

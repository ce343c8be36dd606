"""The segmentation job: train a PSPNet on a multi-branch RepVGG, convert it, show the plain model segments the same.

``train_segmenter(config)`` runs the whole job and returns the summary; the loop reads top to bottom:
data -> segmenter -> optimizer -> (resume) -> epochs of SGD with poly learning rate, per-epoch
validation and checkpoints -> final evaluation of the training-time segmenter and its converted
copy, speed against a ResNet PSPNet -> files in the run folder. It shares its machinery with
``repvgg train`` (:mod:`repvgg.training.engine`): the stop request, checkpoints, epoch loader and the
distributed helpers, so a run is resumable and ``torchrun``-ready in the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from repvgg.io.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from repvgg.nn.complexity import count_parameters
from repvgg.nn.convert import reparameterize_model
from repvgg.training.distributed import DistContext, ShardSampler, all_reduce
from repvgg.training.engine import (StopRequest, epoch_loader, progress_bar, run_distributed, run_folder, seed_epoch,
                           should_stop, write_metrics)
from repvgg.training.optim import build_optimizer
from repvgg.serialization import write_json
from repvgg.segmentation.config import SegTrainConfig
from repvgg.segmentation.data import SegmentationDataBundle, build_segmentation_data
from repvgg.segmentation.evaluate import baseline_segmenter, comparison_summary, segmenter_speed
from repvgg.segmentation.metrics import compare_segmenters
from repvgg.segmentation.plots import plot_predictions, plot_segmentation_curves
from repvgg.segmentation.pspnet import PSPNet, build_segmenter, main_logits, segmentation_loss
from repvgg.segmentation.weights import save_segmenter

__all__ = ["train_segmenter", "poly_learning_rate", "default_segmentation_output_dir"]

logger = logging.getLogger(__name__)

#: Validation scenes drawn in ``predictions.png``.
PREDICTION_SAMPLES = 4


@dataclass
class SegRunState:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done inside the current epoch
    global_step: int = 0
    best_miou: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)


def poly_learning_rate(step: int, total_steps: int, base_lr: float, power: float = 0.9) -> float:
    """``base_lr * (1 - step / total_steps) ** power``: the "poly" schedule of DeepLab and PSPNet."""
    return base_lr * (1.0 - min(step, total_steps) / max(1, total_steps)) ** power


def default_segmentation_output_dir(config: SegTrainConfig) -> Path:
    dataset = "shapes" if config.synthetic else Path(config.data).name
    variant = "-fast" if config.fast else ""
    return Path("runs") / f"seg-{config.backbone}{variant}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _data_description(config: SegTrainConfig) -> dict[str, Any]:
    """What ``repvgg seg-eval`` needs to rebuild the validation set (stored with the weights)."""
    if config.synthetic:
        synthetic = dataclasses.asdict(config.synthetic_config())
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
        synthetic=config.synthetic_config() if config.synthetic else None,
    )


def _checkpoint_payload(config: SegTrainConfig, model: PSPNet, optimizer: torch.optim.Optimizer,
                        state: SegRunState, bundle: SegmentationDataBundle) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "arch": model.name,
        "segmenter": model.config.to_dict(),
        "classes": list(bundle.classes),
        "data": _data_description(config),
        "config": config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "best_miou": state.best_miou,
        "history": state.history,
        "rng": capture_rng_state(),
    }


def train_segmenter(config: SegTrainConfig) -> dict[str, Any]:
    """Run the whole job described by ``config`` and return the summary (also written to ``summary.json``).

    Under ``torchrun`` every process calls this; only rank 0 logs and writes. A SIGINT/SIGTERM or
    ``stop_after_steps`` ends the run early with a resumable ``last.pt``; the summary then has
    ``"interrupted": true``.
    """
    return run_distributed(lambda ctx: _run(config, ctx), config.device)


def _run(config: SegTrainConfig, ctx: DistContext) -> dict[str, Any]:
    resume = load_checkpoint(config.resume) if config.resume else None
    output = run_folder(config.output, config.resume, lambda: default_segmentation_output_dir(config))
    if config.output is None:
        config = config.updated(output=str(output))
    if ctx.is_main:
        output.mkdir(parents=True, exist_ok=True)
        config.save(output / "config.yaml")
    device = ctx.device
    if config.amp and device.type != "cuda":
        logger.info("--amp applies to CUDA only; training in float32 on %s", device)
    use_amp = config.amp and device.type == "cuda"

    seed_epoch(config.seed, 0, ctx.rank)
    bundle = _build_data(config)
    model = build_segmenter(config.segmenter_config(bundle.num_classes),
                            backbone_weights=config.backbone_weights).to(device)
    if config.sync_bn and ctx.distributed:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            logger.info("--sync-bn needs CUDA (torch's SyncBatchNorm); each process keeps its own BN statistics")
    optimizer = build_optimizer(model, config.resolved_lr, config.momentum, config.weight_decay)
    state = SegRunState()
    if resume is not None:
        if "segmenter" not in resume:
            raise ValueError(f"{config.resume} is a classification checkpoint; resume it with `repvgg train --resume`")
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        state = SegRunState(resume["epoch"], resume["step_in_epoch"], resume["global_step"], resume["best_miou"],
                            list(resume["history"]))
        restore_rng_state(resume["rng"])
        logger.info("resumed from %s at epoch %d, step %d", config.resume, state.epoch, state.step_in_epoch)
    net: nn.Module = DistributedDataParallel(model) if ctx.distributed else model

    local_batch = config.batch_size // ctx.world_size
    if config.batch_size % ctx.world_size or local_batch < 2:
        raise ValueError(f"batch size {config.batch_size} must be a multiple of the {ctx.world_size} processes with "
                         "at least 2 images per process (BatchNorm in the pyramid pooling's 1x1 bin)")
    steps_per_epoch = len(bundle.train) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set ({len(bundle.train)} images) is smaller than one batch "
                         f"({config.batch_size}); lower --batch-size")
    total_steps = steps_per_epoch * config.epochs
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    val_loader = DataLoader(bundle.val, batch_size=local_batch if bundle.uniform_val_size else 1,
                            num_workers=config.workers, sampler=ShardSampler(len(bundle.val), ctx.rank, ctx.world_size),
                            pin_memory=device.type == "cuda")
    logger.info("%s on %s: %d train / %d val images, %d classes, crop %d, %d params, %d steps/epoch, lr %.4g",
                model.name, bundle.name, len(bundle.train), len(bundle.val), bundle.num_classes, bundle.crop_size,
                count_parameters(model), steps_per_epoch, config.resolved_lr)

    stopper = StopRequest()
    steps_this_run = 0
    train_seconds = 0.0
    train_images = 0
    interrupted = False
    with stopper.installed():
        while state.epoch < config.epochs and not interrupted:
            epoch = state.epoch
            if state.step_in_epoch == 0:
                seed_epoch(config.seed, epoch + 1, ctx.rank)
            loader = epoch_loader(bundle.train, seed=config.seed, epoch=epoch, ctx=ctx, local_batch=local_batch,
                                  skip_steps=state.step_in_epoch, workers=config.workers)
            net.train()
            stop_now = False
            sums = torch.zeros(4, dtype=torch.float64)  # loss*images, images, correct pixels, labelled pixels
            bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", ctx.is_main)
            if bar is not None:
                bar.update(state.step_in_epoch)
            start = time.perf_counter()
            for images, labels in loader:
                lr = poly_learning_rate(state.global_step, total_steps, config.resolved_lr, config.poly_power)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with torch.autocast(device.type, enabled=use_amp):
                    out = net(images)
                    loss = segmentation_loss(out, labels, aux_weight=config.aux_weight,
                                             ignore_index=bundle.ignore_index)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                labelled = labels != bundle.ignore_index
                correct = (main_logits(out).detach().argmax(1) == labels) & labelled
                sums += torch.tensor([float(loss.detach()) * labels.shape[0], labels.shape[0],
                                      float(correct.sum()), float(labelled.sum())], dtype=torch.float64)
                state.global_step += 1
                state.step_in_epoch += 1
                steps_this_run += 1
                if bar is not None:
                    bar.set_postfix(loss=f"{sums[0] / sums[1]:.3f}", px_acc=f"{100 * sums[2] / max(1, sums[3]):.1f}",
                                    lr=f"{lr:.3g}")
                    bar.update(1)
                elif ctx.is_main and state.step_in_epoch % config.log_interval == 0:
                    logger.info("epoch %d step %d/%d loss %.4f pixel acc %.1f%% lr %.4g", epoch + 1,
                                state.step_in_epoch, steps_per_epoch, sums[0] / sums[1],
                                100 * sums[2] / max(1, sums[3]), lr)
                stop_now = should_stop(stopper, steps_this_run, config.stop_after_steps)
                if stop_now and state.step_in_epoch < steps_per_epoch:
                    interrupted = True
                    break
            elapsed = time.perf_counter() - start
            if bar is not None:
                bar.close()
            all_reduce(sums, "sum")
            train_seconds += elapsed
            train_images += int(sums[1])
            if interrupted:
                break
            state.epoch += 1
            state.step_in_epoch = 0
            report = compare_segmenters([model], val_loader, bundle.num_classes, device=device,
                                        ignore_index=bundle.ignore_index)
            scores = report.metrics[0]
            row = {
                "epoch": state.epoch,
                "train_loss": float(sums[0] / sums[1]),
                "train_pixel_accuracy": float(100 * sums[2] / max(1, sums[3])),
                "val_loss": report.loss[0],
                "val_miou": 100 * scores.mean_iou,
                "val_pixel_accuracy": 100 * scores.pixel_accuracy,
                "lr": lr,
                "epoch_time_s": elapsed,
                "train_images_per_s": float(sums[1]) / elapsed if elapsed > 0 else 0.0,
            }
            state.history.append(row)
            improved = row["val_miou"] > state.best_miou
            state.best_miou = max(state.best_miou, row["val_miou"])
            logger.info("epoch %d/%d: train loss %.4f, val mIoU %.2f%% pixel acc %.2f%% (%.1fs)", state.epoch,
                        config.epochs, row["train_loss"], row["val_miou"], row["val_pixel_accuracy"], elapsed)
            if ctx.is_main:
                write_metrics(output, state.history)
                payload = _checkpoint_payload(config, model, optimizer, state, bundle)
                save_checkpoint(payload, output / "last.pt")
                if improved:
                    save_checkpoint(payload, output / "best.pt")
            if stop_now or stopper.requested:
                interrupted = state.epoch < config.epochs

    if interrupted:
        if ctx.is_main:
            save_checkpoint(_checkpoint_payload(config, model, optimizer, state, bundle), output / "last.pt")
        logger.warning("stopped at epoch %d step %d; continue with: repvgg seg-train --resume %s",
                       state.epoch, state.step_in_epoch, output / "last.pt")
        return {"interrupted": True, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                "output": str(output)}

    summary = _finish(config, ctx, bundle, model, val_loader, output, state)
    summary["train_images_per_s"] = train_images / train_seconds if train_seconds > 0 else None
    summary["train_time_s"] = train_seconds
    if ctx.is_main:
        write_json(output / "summary.json", summary)
    return summary


def _finish(config: SegTrainConfig, ctx: DistContext, bundle: SegmentationDataBundle, model: PSPNet,
            val_loader: DataLoader, output: Path, state: SegRunState) -> dict[str, Any]:
    """Convert the segmenter, score both forms on the same pixels, time them next to a ResNet PSPNet, save."""
    model.eval()
    plain = reparameterize_model(model)
    comparison = compare_segmenters([model, plain], val_loader, bundle.num_classes, device=ctx.device,
                                    ignore_index=bundle.ignore_index)
    summary: dict[str, Any] = {
        "model": model.name,
        "backbone": model.config.backbone,
        "fast": config.fast,
        "segmenter": model.config.to_dict(),
        "dataset": bundle.name,
        "classes": list(bundle.classes),
        "epochs": config.epochs,
        "crop_size": bundle.crop_size,
        **comparison_summary(comparison, bundle.classes),
        "params_train": count_parameters(model),
        "params_deploy": count_parameters(plain),
        "best_val_miou": state.best_miou,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "output": str(output),
    }
    if not ctx.is_main:
        return summary
    images, _ = next(iter(DataLoader(bundle.val, batch_size=val_loader.batch_size)))
    images = images.to(ctx.device)
    timed: list[tuple[str, nn.Module]] = [("training-time", model), ("converted", plain)]
    if config.baseline != "none":
        timed.append((f"{config.baseline} PSPNet (BN fused, random init)",
                      baseline_segmenter(config.baseline, model.config).to(ctx.device)))
    summary["speed"] = segmenter_speed(timed, images)
    summary["speed_input"] = list(images.shape)
    save_segmenter(plain, output / "deploy.safetensors", classes=bundle.classes, data=_data_description(config))
    plot_segmentation_curves(state.history, output / "curves.png", title=f"{model.name} on {bundle.name}")
    samples = []
    with torch.no_grad():
        for index in range(min(PREDICTION_SAMPLES, len(bundle.val))):
            image, label = bundle.val[index]
            prediction = plain(image[None].to(ctx.device)).argmax(1)[0].cpu()
            samples.append((image, label, prediction))
    miou = summary["val_miou_deploy"]
    plot_predictions(samples, output / "predictions.png", bundle.classes,
                     title=f"{model.name} (converted)" + (f", val mIoU {miou:.1f}%" if miou is not None else ""))
    logger.info(
        "\n  training-time: mIoU %.2f%%  pixel acc %.2f%%  %d params  %.1f img/s"
        "\n  converted:     mIoU %.2f%%  pixel acc %.2f%%  %d params  %.1f img/s"
        "\n  max |logit difference| %.3g, predicted classes agree on %.4f%% of %d pixels",
        summary["val_miou"], summary["pixel_accuracy"], summary["params_train"], summary["speed"][0]["images_per_s"],
        summary["val_miou_deploy"], summary["pixel_accuracy_deploy"], summary["params_deploy"],
        summary["speed"][1]["images_per_s"], summary["max_abs_diff"], 100 * summary["pixel_agreement"],
        comparison.pixels,
    )
    return summary

"""The main job: train a multi-branch RepVGG, convert it, and show the plain model computes the same.

``train(config)`` runs the whole job and returns the summary; the loop reads top to bottom:
data -> model -> optimizer -> (resume) -> epochs of SGD with per-epoch validation and checkpoints
-> final evaluation of the training-time model and its converted copy -> files in the run folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from repvgg.io.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from repvgg.nn.complexity import count_parameters
from repvgg.training.config import TrainConfig
from repvgg.nn.convert import reparameterize_model
from repvgg.training.data import DatasetBundle, build_datasets
from repvgg.training.distributed import DistContext, ShardSampler, all_reduce
from repvgg.training.engine import (StopRequest, epoch_loader, progress_bar, run_distributed, run_folder, seed_epoch,
                           should_stop, training_memory_format, write_metrics)
from repvgg.training.evaluate import evaluate_models, measure_throughput, topk_correct
from repvgg.nn.model import RepVGG
from repvgg.training.optim import build_optimizer, custom_l2, learning_rate
from repvgg.nn.registry import create_model
from repvgg.serialization import write_json
from repvgg.io.weights import checkpoint_num_classes, load_state_dict_into, read_checkpoint, save_weights

__all__ = ["train", "default_output_dir"]

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done inside the current epoch
    global_step: int = 0
    best_top1: float = -1.0
    history: list | None = None

    def __post_init__(self) -> None:
        self.history = self.history or []


def default_output_dir(config: TrainConfig) -> Path:
    dataset = "digits" if config.data is None else Path(config.data).name
    return Path("runs") / f"{config.model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _build_model(config: TrainConfig, bundle: DatasetBundle) -> RepVGG:
    model = create_model(config.model, num_classes=bundle.num_classes, **config.model_overrides)
    if config.weights:
        state_dict, _ = read_checkpoint(config.weights)
        skip_head = checkpoint_num_classes(state_dict) not in (None, bundle.num_classes)
        if skip_head:
            logger.info("%s has a different number of classes: keeping a fresh classifier", config.weights)
        load_state_dict_into(model, state_dict, source=config.weights, skip_head=skip_head)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _loss_function(config: TrainConfig, num_classes: int) -> tuple[nn.Module, Any]:
    if config.mixup > 0 or config.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixer = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                      label_smoothing=config.label_smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixer
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), None


def _checkpoint_payload(config: TrainConfig, model: RepVGG, optimizer: torch.optim.Optimizer,
                        ema: Any, state: RunState, weights: nn.Module | None = None) -> dict[str, Any]:
    source = weights if weights is not None else model
    return {
        "model": source.state_dict(),
        "arch": model.name,
        "spec": model.spec.to_dict(),
        "num_classes": model.num_classes,
        "in_chans": model.in_chans,
        "config": config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "best_top1": state.best_top1,
        "history": state.history,
        "rng": capture_rng_state(),
    }


def train(config: TrainConfig) -> dict[str, Any]:
    """Run the whole job described by ``config`` and return the summary (also written to ``summary.json``).

    Under ``torchrun`` every process calls this; only rank 0 logs and writes. A SIGINT/SIGTERM or
    ``stop_after_steps`` ends the run early with a resumable ``last.pt``; the summary then has
    ``"interrupted": true``.
    """
    return run_distributed(lambda ctx: _run(config, ctx), config.device)


def _run(config: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    resume = load_checkpoint(config.resume) if config.resume else None
    output = run_folder(config.output, config.resume, lambda: default_output_dir(config))
    if config.output is None:
        config = config.updated(output=str(output))
    if ctx.is_main:
        output.mkdir(parents=True, exist_ok=True)
    device = ctx.device
    if config.amp and device.type != "cuda":
        logger.info("--amp applies to CUDA only; training in float32 on %s", device)
    use_amp = config.amp and device.type == "cuda"
    memory_format = training_memory_format(config.channels_last, device)
    channels_last = memory_format == torch.channels_last

    seed_epoch(config.seed, 0, ctx.rank)
    bundle = build_datasets(config.data, img_size=config.img_size, val_fraction=config.val_fraction,
                            auto_augment=config.auto_augment, bad_images=config.bad_images)
    # Save the resolved values (learning rate, image size, warm-up), not the "derive it" placeholders.
    config = config.updated(lr=config.resolved_lr, img_size=bundle.img_size,
                            warmup_epochs=config.resolved_warmup_epochs)
    if ctx.is_main:
        config.save(output / "config.yaml")
    model = _build_model(config, bundle).to(device=device, memory_format=memory_format)
    if config.sync_bn and ctx.distributed:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            logger.warning("--sync-bn needs CUDA (SyncBatchNorm); using per-process BatchNorm on %s", device)
    optimizer = build_optimizer(model, config.resolved_lr, config.momentum, config.weight_decay,
                                custom_l2=config.custom_l2)
    ema = None
    if config.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema_decay)
    state = RunState()
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if ema is not None and resume.get("ema") is not None:
            ema.module.load_state_dict(resume["ema"])
        state = RunState(resume["epoch"], resume["step_in_epoch"], resume["global_step"],
                         resume["best_top1"], list(resume["history"]))
        restore_rng_state(resume["rng"])
        logger.info("resumed from %s at epoch %d, step %d", config.resume, state.epoch, state.step_in_epoch)
    net: nn.Module = DistributedDataParallel(model) if ctx.distributed else model

    local_batch = config.batch_size // ctx.world_size
    if local_batch < 1 or config.batch_size % ctx.world_size:
        raise ValueError(f"batch size {config.batch_size} must be a multiple of the {ctx.world_size} processes")
    steps_per_epoch = len(bundle.train) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set ({len(bundle.train)} images) is smaller than one batch "
                         f"({config.batch_size}); lower --batch-size")
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.resolved_warmup_epochs * steps_per_epoch))
    criterion, mixer = _loss_function(config, bundle.num_classes)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    val_loader = DataLoader(bundle.val, batch_size=max(local_batch, 1), num_workers=config.workers,
                            sampler=ShardSampler(len(bundle.val), ctx.rank, ctx.world_size),
                            pin_memory=device.type == "cuda")
    logger.info("%s on %s: %d train / %d val images, %d classes, %dx%d, %d params, %d steps/epoch, lr %.4g",
                model.name, bundle.name, len(bundle.train), len(bundle.val), bundle.num_classes,
                bundle.img_size, bundle.img_size, count_parameters(model), steps_per_epoch, config.resolved_lr)

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
            sums = torch.zeros(3, dtype=torch.float64)  # loss*n, correct, n
            bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", ctx.is_main)
            if bar is not None:
                bar.update(state.step_in_epoch)
            start = time.perf_counter()
            for images, labels in loader:
                lr = learning_rate(state.global_step, total_steps, config.resolved_lr, warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                labels = labels.to(device, non_blocking=True)
                targets = labels
                if mixer is not None:
                    images, targets = mixer(images, labels)
                with torch.autocast(device.type, enabled=use_amp):
                    logits = net(images)
                    loss = criterion(logits, targets)
                    if config.custom_l2:
                        loss = loss + 0.5 * config.weight_decay * custom_l2(model)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update(model, step=state.global_step)
                correct = topk_correct(logits.detach(), labels, (1,))[0]
                sums += torch.tensor([float(loss.detach()) * labels.numel(), correct, labels.numel()],
                                     dtype=torch.float64)
                state.global_step += 1
                state.step_in_epoch += 1
                steps_this_run += 1
                if bar is not None:
                    bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{100 * sums[1] / sums[2]:.1f}",
                                    lr=f"{lr:.3g}")
                    bar.update(1)
                elif ctx.is_main and state.step_in_epoch % config.log_interval == 0:
                    logger.info("epoch %d step %d/%d loss %.4f acc %.1f%% lr %.4g", epoch + 1,
                                state.step_in_epoch, steps_per_epoch, sums[0] / sums[2],
                                100 * sums[1] / sums[2], lr)
                stop_now = should_stop(stopper, steps_this_run, config.stop_after_steps)
                if stop_now and state.step_in_epoch < steps_per_epoch:
                    interrupted = True
                    break
            elapsed = time.perf_counter() - start
            if bar is not None:
                bar.close()
            all_reduce(sums, "sum")
            train_seconds += elapsed
            train_images += int(sums[2])
            if interrupted:
                break
            state.epoch += 1
            state.step_in_epoch = 0
            eval_model = ema.module if ema is not None else model
            report = evaluate_models([eval_model], val_loader, device, channels_last=channels_last)
            row = {
                "epoch": state.epoch,
                "train_loss": float(sums[0] / sums[2]),
                "train_top1": float(100 * sums[1] / sums[2]),
                "val_loss": report.loss[0],
                "val_top1": report.top1[0],
                "val_top5": report.top5[0],
                "lr": lr,
                "epoch_time_s": elapsed,
                "train_images_per_s": float(sums[2]) / elapsed if elapsed > 0 else 0.0,
            }
            state.history.append(row)
            improved = report.top1[0] > state.best_top1
            state.best_top1 = max(state.best_top1, report.top1[0])
            logger.info("epoch %d/%d: train loss %.4f, val top-1 %.2f%% top-5 %.2f%% (%.1fs)", state.epoch,
                        config.epochs, row["train_loss"], row["val_top1"], row["val_top5"], elapsed)
            if ctx.is_main:
                write_metrics(output, state.history)
                payload = _checkpoint_payload(config, model, optimizer, ema, state)
                save_checkpoint(payload, output / "last.pt")
                if improved:
                    payload["model"] = eval_model.state_dict()
                    save_checkpoint(payload, output / "best.pt")
            if stop_now or stopper.requested:
                interrupted = state.epoch < config.epochs

    if interrupted:
        if ctx.is_main:
            save_checkpoint(_checkpoint_payload(config, model, optimizer, ema, state), output / "last.pt")
        logger.warning("stopped at epoch %d step %d; continue with: repvgg train --resume %s",
                       state.epoch, state.step_in_epoch, output / "last.pt")
        return {"interrupted": True, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                "output": str(output)}

    final = ema.module if ema is not None else model
    summary = _finish(config, ctx, bundle, final, val_loader, output, state, channels_last)
    summary["train_images_per_s"] = train_images / train_seconds if train_seconds > 0 else None
    if ctx.is_main:
        write_json(output / "summary.json", summary)
    return summary


def _finish(config: TrainConfig, ctx: DistContext, bundle: DatasetBundle, model: RepVGG,
            val_loader: DataLoader, output: Path, state: RunState, channels_last: bool) -> dict[str, Any]:
    """Evaluate the trained model, convert it, evaluate the plain model on the same batches, save it."""
    model.eval()
    plain = reparameterize_model(model)
    report = evaluate_models([model, plain], val_loader, ctx.device, channels_last=channels_last)
    images, _ = next(iter(val_loader))
    speed = measure_throughput([model, plain], images.to(ctx.device))
    summary = {
        "model": model.name,
        "dataset": bundle.name,
        "epochs": config.epochs,
        "num_classes": bundle.num_classes,
        "img_size": bundle.img_size,
        "val_images": report.images,
        "val_top1": report.top1[0],
        "val_top5": report.top5[0],
        "val_top1_deploy": report.top1[1],
        "val_top5_deploy": report.top5[1],
        "max_abs_diff": report.max_abs_diff[0],
        "prediction_agreement": report.agreement[0],
        "params_train": count_parameters(model),
        "params_deploy": count_parameters(plain),
        "infer_images_per_s_train": speed[0],
        "infer_images_per_s_deploy": speed[1],
        "infer_batch_size": int(images.shape[0]),
        "best_val_top1": state.best_top1,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "output": str(output),
    }
    if ctx.is_main:
        save_weights(plain, output / "deploy.safetensors", extra={"dataset": bundle.name})
        from repvgg.plots import plot_training_curves

        plot_training_curves(state.history, output / "curves.png", title=f"{model.name} on {bundle.name}")
    logger.info(
        "\n  training-time: top-1 %.2f%%  top-5 %.2f%%  %d params  %.0f img/s"
        "\n  converted:     top-1 %.2f%%  top-5 %.2f%%  %d params  %.0f img/s"
        "\n  max |logit difference| %.3g, predictions agree on %.2f%% of %d images",
        summary["val_top1"], summary["val_top5"], summary["params_train"], speed[0],
        summary["val_top1_deploy"], summary["val_top5_deploy"], summary["params_deploy"], speed[1],
        summary["max_abs_diff"], 100 * summary["prediction_agreement"], report.images,
    )
    return summary

"""The training engine: one loop that every training job (classification, segmentation, ...) plugs into.

``fit(task, config)`` owns what every run needs around its own loss and metrics: the process group
under ``torchrun``, the run folder, resume (exact, mid-epoch included), per-epoch seeding and a data
order that makes resume exact, the epoch loop with mixed precision, weight EMA and SyncBatchNorm,
stop requests (SIGINT/SIGTERM or a step budget), progress, per-epoch evaluation, ``metrics.jsonl``,
``last.pt`` / ``best.pt``, and the final conversion of the trained model with its check.

A task (:class:`Task`) is a small object that builds its data and model, does one training step,
evaluates, and compares and saves the converted model. The loop below reads top to bottom.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from repvgg.io.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from repvgg.nn.complexity import count_parameters
from repvgg.errors import TrainingDiverged
from repvgg.nn.convert import check_conversion, reparameterize_model
from repvgg.serialization import write_json, write_text
from repvgg.training.config import LoopConfig
from repvgg.training.distributed import (DistContext, EpochSampler, SeededSamples, ShardSampler, all_reduce,
                                         init_distributed, shutdown_distributed)
from repvgg.training.optim import build_optimizer
from repvgg.training.trackers import TensorBoardTracker, Tracker

__all__ = [
    "RunState",
    "StepOutput",
    "StopRequest",
    "Task",
    "train_loader",
    "eval_loader",
    "fit",
    "progress_bar",
    "run_distributed",
    "run_folder",
    "seed_epoch",
    "shared_flags",
    "training_memory_format",
    "write_metrics",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def run_distributed(job: Callable[[DistContext], T], device: str) -> T:
    """Run ``job`` in the process group ``torchrun`` describes (or alone); only rank 0 logs.

    On success every process waits for the others (rank 0 still writes files) before leaving the group.
    """
    ctx = init_distributed(device)
    if not ctx.is_main:
        logging.getLogger("repvgg").setLevel(logging.WARNING)
    finished = False
    try:
        result = job(ctx)
        finished = True
        return result
    finally:
        shutdown_distributed(wait=finished)


#: The files a run writes into its folder; a folder holding any of them holds a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "deploy.safetensors",
             "curves.png", "predictions.png")


def run_folder(output: str | None, resume: str | None, default: Callable[[], Path]) -> Path:
    """The run folder: ``output`` if given, else the resumed run's folder, else ``default()``."""
    if output:
        return Path(output)
    if resume:
        return Path(resume).parent if Path(resume).is_file() else Path(resume)
    return default()


def check_run_folder(output: Path, *, resume: str | None, overwrite: bool) -> list[Path]:
    """Refuse a run folder that would lose or mix up someone's files; return the files ``overwrite`` replaces.

    A folder holding a run is only written to when that run is resumed (``--resume``) or the user asked
    to replace it (``--overwrite``); a path that is a file is never a run folder.
    """
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder; choose a folder for the run")
    existing = [output / name for name in RUN_FILES if (output / name).exists()]
    if not existing:
        return []
    resumed_here = resume is not None and (Path(resume) if Path(resume).is_dir() else Path(resume).parent).resolve() \
        == output.resolve()
    if resumed_here:
        return []
    if not overwrite:
        holds = "a finished run" if (output / "summary.json").exists() else "a run"
        raise ValueError(f"{output} already holds {holds} ({', '.join(p.name for p in existing)}); continue it with "
                         f"--resume {output}, replace it with --overwrite, or choose another --output")
    return existing


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed Python, NumPy and torch from ``(seed, epoch, rank)`` (each epoch's augmentation is reproducible)."""
    value = (seed * 1_000_003 + epoch * 7919 + rank) % (2**31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def train_loader(dataset: Dataset, *, seed: int, ctx: DistContext, local_batch: int,
                 workers: int) -> tuple[DataLoader, EpochSampler]:
    """One loader for the whole run and the sampler that moves it from epoch to epoch.

    Workers are persistent (started once, not every epoch); each sample's augmentation comes from its own
    seed (:class:`SeededSamples`), so neither the workers nor a resume change what the model sees. Call
    ``sampler.set_epoch(epoch, skip)`` before iterating an epoch.
    """
    sampler = EpochSampler(len(dataset), seed=seed, rank=ctx.rank, world_size=ctx.world_size)  # type: ignore[arg-type]
    # The loader's own generator keeps it from drawing on the global RNG, whose state a resume restores.
    loader = DataLoader(SeededSamples(dataset), batch_size=local_batch, sampler=sampler, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=ctx.device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def eval_loader(dataset: Dataset, *, batch_size: int, workers: int, ctx: DistContext) -> DataLoader:
    """This process's in-order, disjoint validation shard (shards summed over processes are exact)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      sampler=ShardSampler(len(dataset), ctx.rank, ctx.world_size),
                      pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second signal aborts)."""

    def __init__(self, action: str = "saving a resumable checkpoint after this step") -> None:
        self.requested = False
        self.action = action
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("received %s: %s", signal.Signals(signum).name, self.action)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


#: Steps between the checks for a stop request and a non-finite loss on CUDA or in a distributed run
#: (each is a host sync and a small collective); on one CPU process every step is checked.
CHECK_INTERVAL = 10


def shared_flags(stopper: StopRequest, sums: Tensor | None = None) -> tuple[bool, bool]:
    """``(stop requested, loss not finite)``, each true on every process if it is true on any: one collective.

    ``sums`` is the epoch's running sums (``sums[0]`` the summed loss), on any device.
    """
    flags = torch.tensor([float(stopper.requested), 0.0])
    if sums is not None:
        flags[1] = float(not bool(torch.isfinite(sums[0])))
    all_reduce(flags, "max")
    return bool(flags[0]), bool(flags[1])


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def diverged_error(what: str, where: str, output: Path, lr: float) -> TrainingDiverged:
    """The message of a diverged run: what went non-finite, where, and what is left to resume from."""
    last = output / "last.pt"
    kept = f"{last} is the last good checkpoint" if last.is_file() else "no checkpoint had been written yet"
    return TrainingDiverged(f"training diverged: {what} ({where}, learning rate {lr:.3g}); the run stopped and "
                            f"{kept}. Lower --lr and start again, or resume from the last good checkpoint.")


def training_memory_format(channels_last: bool, device: torch.device) -> torch.memory_format:
    """The memory format to train in: channels-last only where it was asked for and the device is CUDA.

    On CPUs without AVX-512, oneDNN's channels-last backward of a 1x1 convolution with 3 input channels
    (the stem's 1x1 branch) can spin forever and ignores signals; on CPU the contiguous format is also
    as fast for training, so channels-last there is declined with a log line, as ``--sync-bn`` is.
    """
    if not channels_last:
        return torch.contiguous_format
    if device.type != "cuda":
        logger.info("--channels-last applies to CUDA only; training in the contiguous format on %s", device)
        return torch.contiguous_format
    return torch.channels_last


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on an interactive stderr, else ``None`` (the loop then logs every few steps)."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    return None


def write_metrics(output: Path, history: list[dict[str, Any]]) -> None:
    """Write ``history`` as ``output/metrics.jsonl``, one JSON row per epoch, atomically."""
    write_text(output / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))


# --- the task interface and the loop --------------------------------------------------------------

@dataclass
class RunState:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done inside the current epoch
    global_step: int = 0
    best_score: float = -float("inf")  # best value of the task's score metric so far
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepOutput:
    """What one training step reports: the loss to back-propagate, the batch's image count, and the
    task's own running sums for this batch (e.g. correct predictions), summed over the epoch."""

    loss: Tensor
    images: int
    sums: Tensor


class Task(Protocol):
    """One kind of training job. The engine calls these in the order listed, rank 0 only for ``save``."""

    #: The ``repvgg`` subcommand that runs the task (used in messages and to tell checkpoints apart).
    command: str
    #: The validation metric (a key of :meth:`evaluate`'s result) whose best value selects ``best.pt``.
    score: str
    #: Images each process needs per batch (BatchNorm on a 1x1 pooled map needs 2).
    min_local_batch: int
    #: Config fields a resumed run may not change (they decide the model's shape or the data).
    fixed_on_resume: tuple[str, ...]

    def default_output(self, config: Any) -> Path:
        """The run folder when neither ``output`` nor ``resume`` names one."""

    def setup(self, config: Any, ctx: DistContext) -> tuple[Any, Dataset]:
        """Build and check the data; return the config with derived values resolved, and the training set."""

    def build_model(self, config: Any, device: torch.device) -> nn.Module:
        """The training-time model on ``device`` (initial weights loaded and checked)."""

    def val_loader(self, local_batch: int, ctx: DistContext) -> DataLoader:
        """This process's validation shard."""

    def describe(self, model: nn.Module, config: Any, steps_per_epoch: int) -> str:
        """One log line: model, data, sizes."""

    def learning_rate(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """The schedule: learning rate at optimizer step ``step`` of ``total_steps``."""

    def training_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        """Forward one batch through ``net`` (``model`` wrapped for DDP) and return the loss."""

    def train_metrics(self, sums: Tensor) -> dict[str, float]:
        """Epoch metrics from ``[loss * images, images, *StepOutput.sums]`` summed over the epoch."""

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Validation metrics of ``model`` (summed over processes), including :attr:`score`."""

    def checkpoint_fields(self, model: nn.Module) -> dict[str, Any]:
        """What a checkpoint needs besides the weights to rebuild the model from the file alone."""

    def compare(self, model: nn.Module, plain: nn.Module, loader: DataLoader) -> dict[str, Any]:
        """Score the trained model and its converted copy on the same data; the summary's numbers."""

    def save(self, model: nn.Module, plain: nn.Module, summary: dict[str, Any], history: list[dict[str, Any]],
             output: Path) -> None:
        """Write the converted model and the task's figures; may add keys (e.g. speed) to ``summary``."""


C = TypeVar("C", bound=LoopConfig)


def fit(task: Task, config: C, trackers: Sequence[Tracker] = ()) -> dict[str, Any]:
    """Run ``task`` as described by ``config`` and return the summary (also written to ``summary.json``).

    Under ``torchrun`` every process calls this; only rank 0 logs and writes. A SIGINT/SIGTERM or
    ``stop_after_steps`` ends the run early with a resumable ``last.pt``; the summary then has
    ``"interrupted": true``. ``trackers`` (:class:`~repvgg.training.trackers.Tracker`) receive the step and
    epoch scalars on the main process; ``config.tensorboard`` adds TensorBoard's. All are closed at the end.
    """
    trackers = list(trackers)
    try:
        return run_distributed(lambda ctx: _fit(task, config, ctx, trackers), config.device)
    finally:
        for tracker in trackers:
            tracker.close()


def _fit(task: Task, config: C, ctx: DistContext, trackers: list[Tracker]) -> dict[str, Any]:
    resume = load_checkpoint(config.resume) if config.resume else None
    if resume is not None and resume.get("task", task.command) != task.command:
        raise ValueError(f"{config.resume} is a `repvgg {resume['task']}` checkpoint; "
                         f"resume it with `repvgg {resume['task']} --resume`")
    if resume is not None and resume.get("weights_from") == "ema":
        raise ValueError(f"{config.resume} holds the EMA weights of the best epoch, not the training state; resume "
                         "from last.pt (or start a new run from these weights with --weights)")
    output = run_folder(config.output, config.resume, lambda: task.default_output(config))
    replaced = check_run_folder(output, resume=config.resume, overwrite=config.overwrite)
    if resume is not None:
        changed = [k for k in task.fixed_on_resume if resume["config"].get(k) != getattr(config, k)]
        if changed:
            raise ValueError(f"{config.resume} was trained with other "
                             + ", ".join(f"{k} ({resume['config'].get(k)!r}, not {getattr(config, k)!r})"
                                         for k in changed)
                             + "; resume without changing them, or start a new run")
    config = config.updated(output=str(output), overwrite=False)
    device = ctx.device
    if config.amp and device.type != "cuda":
        logger.info("--amp applies to CUDA only; training in float32 on %s", device)
    use_amp = config.amp and device.type == "cuda"

    seed_epoch(config.seed, 0, ctx.rank)
    config, train_set = task.setup(config, ctx)
    model = task.build_model(config, device)
    if config.sync_bn and ctx.in_group:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            logger.warning("--sync-bn needs CUDA (SyncBatchNorm); each process keeps its own BN statistics on %s",
                           device)
    elif config.sync_bn:
        logger.info("--sync-bn has no effect in a single process (launch with torchrun to share BN statistics)")
    optimizer = build_optimizer(model, config.resolved_lr, config.momentum, config.weight_decay,
                                custom_l2=getattr(config, "custom_l2", False))
    ema = None
    if config.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema_decay)
    state = RunState()
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as err:
            raise ValueError(f"{config.resume} does not fit the model of this run: {str(err).splitlines()[0]}") from err
        optimizer.load_state_dict(resume["optimizer"])
        if ema is not None and resume.get("ema") is not None:
            ema.module.load_state_dict(resume["ema"])
        state = RunState(resume["epoch"], resume["step_in_epoch"], resume["global_step"], resume["best_score"],
                         list(resume["history"]))
        restore_rng_state(resume["rng"])
        logger.info("resumed from %s at epoch %d, step %d", config.resume, state.epoch, state.step_in_epoch)
    net: nn.Module = DistributedDataParallel(model) if ctx.distributed else model

    local_batch = config.batch_size // ctx.world_size
    if config.batch_size % ctx.world_size or local_batch < task.min_local_batch:
        raise ValueError(f"batch size {config.batch_size} must be a multiple of the {ctx.world_size} processes "
                         f"with at least {task.min_local_batch} image(s) per process")
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one batch "
                         f"({config.batch_size}); lower --batch-size")
    total_steps = steps_per_epoch * config.epochs
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    val_loader = task.val_loader(local_batch, ctx)
    if ctx.is_main:
        output.mkdir(parents=True, exist_ok=True)
        for path in replaced:
            logger.info("--overwrite: removing %s", path)
            path.unlink()
        config.save(output / "config.yaml")
        if config.tensorboard:
            trackers.append(TensorBoardTracker(output / "tensorboard"))
    logger.info("%s, %d params, %d steps/epoch, lr %.4g", task.describe(model, config, steps_per_epoch),
                count_parameters(model), steps_per_epoch, config.resolved_lr)

    def checkpoint() -> dict[str, Any]:
        return {
            "task": task.command,
            "model": model.state_dict(),
            **task.checkpoint_fields(model),
            "config": config.to_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "best_score": state.best_score,
            "history": state.history,
            "rng": capture_rng_state(),
        }

    loader, sampler = train_loader(train_set, seed=config.seed, ctx=ctx, local_batch=local_batch,
                                   workers=config.workers)
    stopper = StopRequest()
    check_every = 1 if device.type == "cpu" and not ctx.distributed else CHECK_INTERVAL
    steps_this_run = 0
    train_seconds = 0.0
    train_images = 0
    interrupted = False
    with stopper.installed():
        while state.epoch < config.epochs and not interrupted:
            epoch = state.epoch
            if state.step_in_epoch == 0:
                seed_epoch(config.seed, epoch + 1, ctx.rank)
            sampler.set_epoch(epoch, skip=state.step_in_epoch * local_batch)
            net.train()
            stop_now = False
            sums: Tensor | None = None  # loss * images, images, then the task's sums
            bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", ctx.is_main)
            if bar is not None:
                bar.update(state.step_in_epoch)
            start = time.perf_counter()
            data_wait, steps_timed, ready = 0.0, 0, start
            for batch in loader:
                data_wait += time.perf_counter() - ready  # time this step waited for its batch
                steps_timed += 1
                lr = task.learning_rate(state.global_step, total_steps, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, enabled=use_amp):
                    out = task.training_step(net, model, batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update(model, step=state.global_step)
                # Summed on the device: no host sync per step.
                loss = out.loss.detach().double().reshape(1)
                step_sums = torch.cat([loss * out.images, loss.new_tensor([out.images]),
                                       out.sums.detach().to(loss.device, torch.float64).reshape(-1)])
                sums = step_sums if sums is None else sums + step_sums
                state.global_step += 1
                state.step_in_epoch += 1
                steps_this_run += 1
                if ctx.is_main and state.step_in_epoch % config.log_interval == 0 or (bar is not None and (
                        state.step_in_epoch % 10 == 0 or state.step_in_epoch == steps_per_epoch)):
                    shown = {k: f"{v:.4g}" for k, v in task.train_metrics(sums).items()} | {"lr": f"{lr:.3g}"}
                    if bar is not None:
                        bar.set_postfix(shown, refresh=False)
                    else:
                        logger.info("epoch %d step %d/%d %s", epoch + 1, state.step_in_epoch, steps_per_epoch,
                                    " ".join(f"{k} {v}" for k, v in shown.items()))
                if trackers and ctx.is_main and state.step_in_epoch % config.log_interval == 0:
                    scalars = {**task.train_metrics(sums), "lr": lr}
                    for tracker in trackers:
                        tracker.log_step(state.global_step, scalars)
                if bar is not None:
                    bar.update(1)
                stop_now = config.stop_after_steps is not None and steps_this_run >= config.stop_after_steps
                ready = time.perf_counter()
                if state.step_in_epoch % check_every == 0 or state.step_in_epoch == steps_per_epoch:
                    signalled, bad_loss = shared_flags(stopper, sums)
                    if bad_loss:
                        raise diverged_error(f"the training loss is {float(sums[0] / sums[1]):g}",
                                             f"epoch {epoch + 1}, step {state.step_in_epoch}", output, lr)
                    stop_now = stop_now or signalled
                if stop_now and state.step_in_epoch < steps_per_epoch:
                    interrupted = True
                    break
            elapsed = time.perf_counter() - start
            if bar is not None:
                bar.close()
            if sums is not None:
                all_reduce(sums, "sum")
                train_seconds += elapsed
                train_images += int(sums[1])
            if interrupted:
                break
            state.epoch += 1
            state.step_in_epoch = 0
            eval_model = ema.module if ema is not None else model
            row = {"epoch": state.epoch, **task.train_metrics(sums), **task.evaluate(eval_model, val_loader),
                   "lr": lr, "epoch_time_s": elapsed,
                   "train_images_per_s": float(sums[1]) / elapsed if elapsed > 0 else 0.0,
                   "data_wait_s_per_step": data_wait / max(1, steps_timed)}
            bad = sorted(k for k, v in row.items() if not math.isfinite(v))
            if bad:  # nothing of this epoch is saved
                raise diverged_error(f"{', '.join(bad)} not finite", f"after epoch {state.epoch}", output, lr)
            state.history.append(row)
            if ctx.is_main:
                for tracker in trackers:
                    tracker.log_epoch(state.epoch, row)
            improved = row[task.score] > state.best_score
            state.best_score = max(state.best_score, row[task.score])
            if steps_this_run == steps_timed:  # the first epoch of this invocation: time per epoch known
                remaining = (config.epochs - state.epoch) * (time.perf_counter() - start)
                if remaining > 0:
                    logger.info("ETA: about %s for the %d remaining epoch(s), at %.0f training images/s",
                                _duration(remaining), config.epochs - state.epoch, row["train_images_per_s"])
            logger.info("epoch %d/%d: %s (%.1fs)", state.epoch, config.epochs,
                        ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                  if k not in ("epoch", "lr", "epoch_time_s", "train_images_per_s",
                                               "data_wait_s_per_step")), elapsed)
            if ctx.is_main:
                write_metrics(output, state.history)
                payload = checkpoint()
                save_checkpoint(payload, output / "last.pt")
                if improved:
                    if ema is not None:  # the evaluated weights; not a state to resume from
                        payload.update(model=eval_model.state_dict(), weights_from="ema")
                    save_checkpoint(payload, output / "best.pt")
            if stop_now or shared_flags(stopper)[0]:
                interrupted = state.epoch < config.epochs

    if interrupted:
        if ctx.is_main:
            save_checkpoint(checkpoint(), output / "last.pt")
        logger.warning("stopped at epoch %d step %d; continue with: repvgg %s --resume %s",
                       state.epoch, state.step_in_epoch, task.command, output / "last.pt")
        return {"interrupted": True, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                "output": str(output)}

    # The last minute of the run: a signal now waits until deploy.safetensors and summary.json are both
    # written, so the folder never holds one without the other (a second signal aborts).
    with StopRequest("finishing the converted model and summary.json first").installed():
        final = ema.module if ema is not None else model
        final.eval()
        plain = reparameterize_model(final)
        summary = {**task.compare(final, plain, val_loader), "epochs": config.epochs,
                   f"best_{task.score}": state.best_score, "device": str(device), "world_size": ctx.world_size,
                   "train_images_per_s": train_images / train_seconds if train_seconds > 0 else None,
                   "train_time_s": train_seconds, "output": str(output)}
        check_conversion(summary["relative_error"], "the converted model")
        if ctx.is_main:
            task.save(final, plain, summary, state.history, output)
            write_json(output / "summary.json", summary)
    return summary

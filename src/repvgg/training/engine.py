"""The training engine: one loop that every training job (classification, segmentation, ...) plugs into.

``fit(task, config)`` owns what every run needs around its own loss and metrics: the process group under
``torchrun``, the run folder (`run_folder`), resume (exact, mid-epoch included, metrics too), per-epoch seeding and a
data order that makes resume exact, the epoch loop with mixed precision, weight EMA and SyncBatchNorm, stop requests
(`stopping`), progress, per-epoch evaluation, ``best.pt`` / ``last.pt`` / ``metrics.jsonl`` (in that order: the
metrics never list an epoch whose checkpoint failed to write), and the final conversion of the model with its check.

A task ([`Task`][repvgg.training.task.Task]) builds its data and model, does one training step, evaluates, and compares
and saves the converted model. [`fit`][repvgg.training.engine.fit] reads like a table of contents: start (restore or
begin), epochs (each `_run_epoch` then `_end_epoch`), finish; the loaders' worker processes end with the run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from repvgg.io.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from repvgg.nn.complexity import count_parameters
from repvgg.nn.convert import check_conversion, reparameterize_model
from repvgg.serialization import write_json
from repvgg.training.accumulate import accumulate_gradients, clip_gradients
from repvgg.training.config import LoopConfig
from repvgg.training.devices import autocast_dtype
from repvgg.training.distributed import DistContext, EpochSampler, all_reduce, dataset_size, run_distributed
from repvgg.training.loaders import batch_plan, closing_loaders, eval_loader, seed_epoch, train_loader
from repvgg.training.optim import build_optimizer
from repvgg.training.progress import diverged_error, duration, non_finite_state, progress_bar, write_metrics
from repvgg.training.run_folder import (TENSORBOARD_FOLDER, check_checkpoint_belongs, check_continuation,
                                        check_data_is_there, check_resumed_files, check_run_folder, check_same_data,
                                        locate_run, lock_run_folder, new_run_from, open_run_folder,
                                        resolve_inputs, resumable_file)
from repvgg.training.stopping import CHECK_INTERVAL, StopRequest, shared_flags
from repvgg.training.task import RunState, StepOutput, Task
from repvgg.training.trackers import TensorBoardTracker, Tracker

__all__ = ["RunState", "StepOutput", "Task", "eval_loader", "fit", "progress_bar", "run_distributed", "seed_epoch",
           "train_loader", "write_metrics"]

logger = logging.getLogger(__name__)


C = TypeVar("C", bound=LoopConfig)


@dataclass
class _Run:
    """One invocation of [`fit`][repvgg.training.engine.fit] while it runs: what it trains, with what, and where it
    writes."""

    task: Task
    config: Any
    ctx: DistContext
    output: Path
    trackers: list[Tracker]
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    ema: Any
    scaler: Any
    state: RunState
    val_loader: DataLoader
    local_batch: int
    steps_per_epoch: int
    given_paths: dict[str, str]
    data_identity: dict[str, Any]
    loader: DataLoader
    sampler: EpochSampler
    stopper: StopRequest = field(default_factory=StopRequest)
    steps_this_run: int = 0
    epochs_this_run: int = 0
    lr: float = 0.0
    stop_after_epoch: bool = False  # a stop request or the step budget ended the epoch's last step
    amp_dtype: torch.dtype | None = None  # autocast's precision under --amp (autocast_dtype)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    def checkpoint(self) -> dict[str, Any]:
        return {
            "task": self.task.command,
            "model": self.model.state_dict(),
            **self.task.checkpoint_fields(self.model),
            "config": self.config.to_dict(),
            "paths_as_given": self.given_paths,
            "data_identity": self.data_identity,
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict(),  # float16 AMP's loss scale: a resume goes on with it
            **self.state.to_checkpoint(),
            "rng": capture_rng_state(),
        }


def fit(task: Task, config: C, trackers: Sequence[Tracker] = ()) -> dict[str, Any]:
    """Run ``task`` as described by ``config`` and return the summary (also written to ``summary.json``).

    Under ``torchrun`` every process calls this; only rank 0 logs and writes. A SIGINT/SIGTERM or
    ``stop_after_steps`` ends the run early with a resumable ``last.pt``; the summary then has
    ``"interrupted": true``. ``trackers`` ([`Tracker`][repvgg.training.trackers.Tracker]) receive the step and
    epoch scalars on the main process; ``config.tensorboard`` adds TensorBoard's. All are closed at the end.
    """
    trackers = list(trackers)
    try:
        return run_distributed(lambda ctx: _fit(task, config, ctx, trackers), config.device)
    finally:
        for tracker in trackers:
            tracker.close()


def _fit(task: Task, config: C, ctx: DistContext, trackers: list[Tracker]) -> dict[str, Any]:
    with contextlib.ExitStack() as held:  # the run folder's lock, from before its first check to the end
        return _fit_locked(task, config, ctx, trackers, held)


def _fit_locked(task: Task, config: C, ctx: DistContext, trackers: list[Tracker],
                held: contextlib.ExitStack) -> dict[str, Any]:
    run = _start(task, config, ctx, trackers, held)
    with closing_loaders(run.loader, run.val_loader):
        with run.stopper.installed():
            while run.state.epoch < run.config.epochs:
                if not _run_epoch(run):
                    return _interrupted(run)
                stop = _end_epoch(run)
                if stop and run.state.epoch < run.config.epochs:
                    return _interrupted(run)
        return _finish(run)


# --- start: check everything, restore or begin, then open the folder ----------------------------

def _resume_checkpoint(task: Task, config: Any) -> dict[str, Any] | None:
    """The checkpoint ``config.resume`` continues, checked to be this task's training state."""
    if not config.resume:
        return None
    resume = load_checkpoint(resumable_file(config.resume, task.command), task.command)
    if resume.get("weights_from") == "ema":
        raise ValueError(f"{config.resume} holds the EMA weights of the best epoch, not the training state; resume "
                         f"from last.pt, or {new_run_from(task.command, config.resume)}")
    return resume


def _checked_config(task: Task, config: Any, resume: dict[str, Any] | None, lock: Callable[[Path], None]
                    ) -> tuple[Any, Path, list[Path], dict]:
    """The run's config (input paths resolved), its folder, the files ``--overwrite`` replaces, and the
    paths as the user typed them. Refuses, before anything is written, whatever would lose or mix up work;
    ``lock(folder)`` takes the run folder's lock before the folder is looked at."""
    output = locate_run(config.output, config.resume, lambda: task.default_output(config), task.command)
    config, given = resolve_inputs(config, task.input_fields)
    if resume is not None:
        check_data_is_there(config, resume)
        given = {**resume.get("paths_as_given", {}), **{k: v for k, v in given.items()
                                                        if v != resume["config"].get(k)}}
    reads = [getattr(config, f) for f in task.input_fields] + [config.config_file]
    lock(output)
    replaced = check_run_folder(output, resume=resume is not None, overwrite=config.overwrite, reads=reads)
    if resume is not None:
        check_resumed_files(resume, output, str(config.resume), config.deploy_from)
        config = check_continuation(resume, config, changeable=task.changeable_on_resume, paths=task.input_fields,
                                    output=output, source=str(config.resume))
    else:
        config = config.updated(run_id=uuid.uuid4().hex, resume_changes=[])
    return config.updated(output=str(output), overwrite=False), output, replaced, given


def _start(task: Task, config: Any, ctx: DistContext, trackers: list[Tracker], held: contextlib.ExitStack) -> _Run:
    resume = _resume_checkpoint(task, config)

    def lock(folder: Path) -> None:
        if ctx.is_main:
            held.enter_context(lock_run_folder(folder))

    config, output, replaced, given = _checked_config(task, config, resume, lock)
    device = ctx.device
    amp_dtype = autocast_dtype(config.amp, device)
    seed_epoch(config.seed, 0, ctx.rank)
    config, train_set = task.setup(config, ctx, resume)
    identity = task.data_identity()
    if resume is not None:
        check_same_data(resume.get("data_identity"), identity, getattr(config, "data", None), str(config.resume))
    model = _with_sync_bn(task.build_model(config, device), config, ctx)
    optimizer = build_optimizer(model, config.resolved_lr, config.momentum, config.weight_decay,
                                custom_l2=getattr(config, "custom_l2", False), optimizer=config.optimizer)
    ema = None
    if config.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    state = RunState() if resume is None else _restore(resume, model, optimizer, ema, scaler, ctx, str(config.resume))
    local_batch, steps_per_epoch = batch_plan(task, config, ctx, dataset_size(train_set))
    loader, sampler = train_loader(train_set, seed=config.seed, ctx=ctx, local_batch=local_batch,
                                   workers=config.workers)
    run = _Run(task, config, ctx, output, trackers, model, DistributedDataParallel(model) if ctx.distributed else model,
               optimizer, ema, scaler, state,
               task.val_loader(local_batch, ctx), local_batch, steps_per_epoch, given, identity, loader, sampler,
               amp_dtype=amp_dtype)
    if ctx.is_main:  # everything is checked: the first write
        _open_folder(run, replaced)
    logger.info("%s, %d params, %d steps/epoch, lr %.4g", task.describe(model, config, steps_per_epoch),
                count_parameters(model), steps_per_epoch, config.resolved_lr)
    return run


def _with_sync_bn(model: nn.Module, config: Any, ctx: DistContext) -> nn.Module:
    if config.sync_bn and ctx.in_group:
        if ctx.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        logger.warning("--sync-bn needs CUDA (SyncBatchNorm); each process keeps its own BN statistics on %s",
                       ctx.device)
    elif config.sync_bn:
        logger.info("--sync-bn has no effect in a single process (launch with torchrun to share BN statistics)")
    return model


#: The optimizer's settings this run's configuration gives, kept over a checkpoint's when resuming: weight decay and
#: momentum (AdamW's first beta) may change on a resume; the learning rate follows the schedule either way.
_RESUME_SETTINGS = ("weight_decay", "momentum", "betas")


def _restore(resume: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any, scaler: Any,
             ctx: DistContext, source: str) -> RunState:
    """Load the training state of ``resume`` into the run; the RNG state last, as the uninterrupted run had it."""
    try:
        model.load_state_dict(resume["model"])
    except RuntimeError as err:
        raise ValueError(f"{source} does not fit the model of this run: {str(err).splitlines()[0]}") from err
    settings = [{k: g[k] for k in _RESUME_SETTINGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(resume["optimizer"])  # puts back the checkpoint's settings with its state
    for group, setting in zip(optimizer.param_groups, settings):  # a resume may change them (LOOP_CHANGEABLE)
        group.update(setting)
    if ema is not None and resume.get("ema") is not None:
        ema.module.load_state_dict(resume["ema"])
    if resume.get("scaler") and scaler.is_enabled():  # empty where float16 AMP was off (then or now)
        scaler.load_state_dict(resume["scaler"])
    state = RunState.from_checkpoint(resume, device=ctx.device, keep_sums=ctx.is_main)
    restore_rng_state(resume["rng"])
    logger.info("resumed from %s at epoch %d, step %d", source, state.epoch, state.step_in_epoch)
    return state


def _open_folder(run: _Run, replaced: list[Path]) -> None:
    """Create the run folder, remove what ``--overwrite`` replaces, write ``config.yaml``, start TensorBoard."""
    open_run_folder(run.output, replaced, run.config)
    if run.config.tensorboard:
        run.trackers.append(TensorBoardTracker(run.output / TENSORBOARD_FOLDER))


# --- one epoch ---------------------------------------------------------------------------------------

def _train_step(run: _Run, batch: Any) -> None:
    """One optimizer step on ``batch``; its sums are added to the epoch's on the device (no host sync)."""
    state = run.state
    run.lr = run.task.learning_rate(state.global_step, run.total_steps, run.steps_per_epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr
    run.optimizer.zero_grad(set_to_none=True)
    step_sums = accumulate_gradients(run.task, run.net, run.model, batch, parts=run.config.accumulation_steps,
                                     scaler=run.scaler, amp_dtype=run.amp_dtype, distributed=run.ctx.distributed)
    clip_gradients(run.model, run.optimizer, run.scaler, run.config.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.model, step=state.global_step)
    state.epoch_sums = step_sums if state.epoch_sums is None else state.epoch_sums + step_sums
    state.global_step += 1
    state.step_in_epoch += 1
    run.steps_this_run += 1


def _report_step(run: _Run, bar: Any) -> None:
    """The progress bar, a log line every ``log_interval`` steps without one, and the trackers' step scalars."""
    state, config = run.state, run.config
    logged = run.ctx.is_main and state.step_in_epoch % config.log_interval == 0
    if logged or (bar is not None and (state.step_in_epoch % 10 == 0 or state.step_in_epoch == run.steps_per_epoch)):
        shown = {k: f"{v:.4g}" for k, v in run.task.train_metrics(state.sums).items()} | {"lr": f"{run.lr:.3g}"}
        if bar is not None:
            bar.set_postfix(shown, refresh=False)
        else:
            logger.info("epoch %d step %d/%d %s", state.epoch + 1, state.step_in_epoch, run.steps_per_epoch,
                        " ".join(f"{k} {v}" for k, v in shown.items()))
    if run.trackers and logged:
        scalars = {**run.task.train_metrics(state.sums), "lr": run.lr}
        for tracker in run.trackers:
            tracker.log_step(state.global_step, scalars)
    if bar is not None:
        bar.update(1)


def _run_epoch(run: _Run) -> bool:
    """Train until the epoch ends (True) or a stop request or step budget ends it early (False).

    The epoch's sums are totalled over the processes when it ends either way, so a checkpoint holds them.
    """
    state, config = run.state, run.config
    if state.step_in_epoch == 0:
        seed_epoch(config.seed, state.epoch + 1, run.ctx.rank)
    run.sampler.set_epoch(state.epoch, skip=state.step_in_epoch * run.local_batch)
    run.net.train()
    bar = progress_bar(run.steps_per_epoch, f"epoch {state.epoch + 1}/{config.epochs}", run.ctx.is_main)
    if bar is not None:
        bar.update(state.step_in_epoch)
    check_every = 1 if run.ctx.device.type == "cpu" and not run.ctx.distributed else CHECK_INTERVAL
    start = ready = time.perf_counter()
    completed, stop = True, False
    for batch in run.loader:
        state.epoch_data_wait_s += time.perf_counter() - ready  # time this step waited for its batch
        state.epoch_steps_timed += 1
        _train_step(run, batch)
        _report_step(run, bar)
        stop = config.stop_after_steps is not None and run.steps_this_run >= config.stop_after_steps
        ready = time.perf_counter()
        if state.step_in_epoch % check_every == 0 or state.step_in_epoch == run.steps_per_epoch:
            signalled, bad_loss = shared_flags(run.stopper, state.epoch_sums)
            if bad_loss:
                sums = state.sums
                raise diverged_error(f"the training loss is {float(sums[0] / sums[1]):g}",
                                     f"epoch {state.epoch + 1}, step {state.step_in_epoch}", run.output, run.lr)
            stop = stop or signalled
        if stop and state.step_in_epoch < run.steps_per_epoch:
            completed = False
            break
    state.epoch_time_s += time.perf_counter() - start
    run.stop_after_epoch = stop if completed else True
    if bar is not None:
        bar.close()
    if state.epoch_sums is not None:
        all_reduce(state.epoch_sums, "sum")  # the main process saves the totals; a resume gives them to it alone
    return completed


def _end_epoch(run: _Run) -> bool:
    """Evaluate, record and save the finished epoch; True if the run should stop now."""
    state, task = run.state, run.task
    sums, started = state.sums, time.perf_counter() - state.epoch_time_s
    eval_model = run.ema.module if run.ema is not None else run.model
    row = {"epoch": state.epoch + 1, **task.train_metrics(sums), **task.evaluate(eval_model, run.val_loader),
           "lr": run.lr, "epoch_time_s": state.epoch_time_s,
           "train_images_per_s": float(sums[1]) / state.epoch_time_s if state.epoch_time_s > 0 else 0.0,
           "data_wait_s_per_step": state.epoch_data_wait_s / max(1, state.epoch_steps_timed)}
    bad = sorted(k for k, v in row.items() if not math.isfinite(v)) + non_finite_state(run.model, run.ema)
    if bad:  # nothing of this epoch is saved
        raise diverged_error(f"{', '.join(bad)} not finite", f"after epoch {state.epoch + 1}", run.output, run.lr)
    improved = row[task.score] > state.best_score
    state.epoch, state.step_in_epoch = state.epoch + 1, 0
    state.history.append(row)
    state.best_score = max(state.best_score, row[task.score])
    state.train_time_s += state.epoch_time_s
    state.train_images += int(sums[1])
    state.epoch_sums, state.epoch_time_s, state.epoch_data_wait_s, state.epoch_steps_timed = None, 0.0, 0.0, 0
    _log_epoch(run, row, started)
    if run.ctx.is_main:
        for tracker in run.trackers:
            tracker.log_epoch(state.epoch, row)
        payload = run.checkpoint()
        if improved:  # best.pt first: if last.pt then fails, a resume redoes this epoch exactly
            best = payload if run.ema is None else {**payload, "model": eval_model.state_dict(), "weights_from": "ema"}
            save_checkpoint(best, run.output / "best.pt")
        save_checkpoint(payload, run.output / "last.pt")
        write_metrics(run.output, state.history)  # only epochs whose checkpoint was written
    run.epochs_this_run += 1
    return run.stop_after_epoch or shared_flags(run.stopper)[0]


def _log_epoch(run: _Run, row: dict[str, Any], started: float) -> None:
    state, config = run.state, run.config
    if run.epochs_this_run == 0:  # the first epoch of this invocation: the time per epoch is known
        remaining = (config.epochs - state.epoch) * (time.perf_counter() - started)
        if remaining > 0:
            logger.info("ETA: about %s for the %d remaining epoch(s), at %.0f training images/s",
                        duration(remaining), config.epochs - state.epoch, row["train_images_per_s"])
    timing = ("epoch", "lr", "epoch_time_s", "train_images_per_s", "data_wait_s_per_step")
    logger.info("epoch %d/%d: %s (%.1fs)", state.epoch, config.epochs,
                ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in timing), row["epoch_time_s"])


# --- the end: interrupted, or finished and converted ---------------------------------------------

def _interrupted(run: _Run) -> dict[str, Any]:
    state = run.state
    bad = non_finite_state(run.model, run.ema)
    if bad:  # a loss still finite may have left infinite weights or statistics: the last checkpoint stays
        raise diverged_error(f"{', '.join(bad)} not finite", f"epoch {state.epoch + 1}, step {state.step_in_epoch}",
                             run.output, run.lr)
    if run.ctx.is_main:
        save_checkpoint(run.checkpoint(), run.output / "last.pt")
    logger.warning("stopped at epoch %d step %d; continue with: repvgg %s --resume %s",
                   state.epoch, state.step_in_epoch, run.task.command, run.output)
    return {"interrupted": True, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
            "output": str(run.output)}


def _finish(run: _Run) -> dict[str, Any]:
    """Convert the trained model, compare both forms, and write the converted model and ``summary.json``.

    A signal now waits until both files are written, so the folder never holds one without the other
    (a second signal aborts).
    """
    state, config, task = run.state, run.config, run.task
    with StopRequest("finishing the converted model and summary.json first").installed():
        final, deployed = _deployed_weights(run)
        final.eval()
        plain = reparameterize_model(final)
        summary = {**task.compare(final, plain, run.val_loader), "epochs": config.epochs, **deployed,
                   f"best_{task.score}": state.best_score, "device": str(run.ctx.device),
                   "world_size": run.ctx.world_size,
                   "train_images_per_s": state.train_images / state.train_time_s if state.train_time_s > 0 else None,
                   "train_time_s": state.train_time_s, "output": str(run.output)}
        check_conversion(summary["relative_error"], "the converted model")
        if run.ctx.is_main:
            task.save(final, plain, summary, state.history, run.output)
            write_json(run.output / "summary.json", summary)
    return summary


def _deployed_weights(run: _Run) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model that ``deploy_from`` names (the last epoch's weights, or ``best.pt``'s), and what the
    summary says of it: which it is and its epoch."""
    final = run.ema.module if run.ema is not None else run.model
    history, score = run.state.history, run.task.score
    if run.config.deploy_from == "last" or not history:
        return final, {"deploy_from": "last", "deploy_epoch": len(history)}
    best = max(range(len(history)), key=lambda i: (history[i][score], -i))  # the first best epoch, as best.pt
    payload, final = load_checkpoint(run.output / "best.pt"), copy.deepcopy(final)
    check_checkpoint_belongs(payload, run.config.to_dict(), run.output, str(run.output / "best.pt"))  # not copied in
    final.load_state_dict(payload["model"])
    logger.info("--deploy-from best: converting epoch %d (%s %.4g) from best.pt", best + 1, score, history[best][score])
    return final, {"deploy_from": "best", "deploy_epoch": best + 1}

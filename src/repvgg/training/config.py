"""Typed training configuration: defaults, YAML/JSON files, command-line overrides.

The resolved configuration is saved with every run (``config.yaml``) and inside every checkpoint,
so a run can be rebuilt and resumed from its output folder alone. Files are parsed as data
(``yaml.safe_load`` / ``json``); nothing in them is executed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

from repvgg.limits import MAX_BATCH_SIZE, MAX_IMG_SIZE, MAX_LR, MAX_WORKERS
from repvgg.options import RunConfig, check_device_name, load_config_file, option

__all__ = ["AblationConfig", "LoopConfig", "RECIPES", "TrainConfig", "load_config_file", "resolve_run_config"]

#: ``--recipe`` presets: the paper's two ImageNet recipes and the official release's RepVGGplus recipe. A recipe
#: sets these fields; a resumed run, a ``--config`` file and flags override it (``--print-config`` shows the result).
#: The learning rate follows the paper's rule, 0.1 x batch / 256 (the official code's too).
RECIPES: dict[str, dict[str, Any]] = {
    # 120 epochs, random-resized crop and flip only (light and middle models: A0-A2, B0-B2 and their g2/g4)
    "paper-light": dict(epochs=120, batch_size=256, weight_decay=1e-4, label_smoothing=0.0, mixup=0.0,
                        auto_augment=None, warmup_epochs=5.0),
    # 200 epochs with label smoothing, mixup and AutoAugment (the heavy models: B2g4, B3, B3g4)
    "paper-heavy": dict(epochs=200, batch_size=256, weight_decay=1e-4, label_smoothing=0.1, mixup=0.2,
                        auto_augment="original", warmup_epochs=5.0),
    # the official RepVGGplus-L2pse command: 300 epochs, weight decay 4e-5, RandAugment at magnitude 15 (timm's, the
    # nearest to the official "raug15"), mixup 0.2, train at 256 and evaluate at 320, auxiliary losses at 0.1
    "repvggplus": dict(model="repvggplus_l2pse", epochs=300, batch_size=256, weight_decay=4e-5, label_smoothing=0.1,
                       mixup=0.2, auto_augment="rand-m15-mstd0.5", warmup_epochs=5.0, img_size=256, test_size=320,
                       aux_weight=0.1, custom_l2=False),
}

C = TypeVar("C", bound=RunConfig)

@dataclass
class LoopConfig(RunConfig):
    """What the training engine itself reads; every training job's config extends it."""

    epochs: int = option(30, "training epochs", low=1)
    batch_size: int = option(64, "global batch size over all processes", low=1, high=MAX_BATCH_SIZE)
    lr: float | None = option(None, "base learning rate", low=0, high=MAX_LR, low_open=True)
    optimizer: str = option("sgd", "sgd, or adamw (decoupled weight decay; --momentum is its first beta)",
                            choices=("sgd", "adamw"))
    momentum: float = option(0.9, "SGD momentum", low=0, high=1)
    weight_decay: float = option(1e-4, "weight decay on kernels", low=0, high=1)
    accumulation_steps: int = option(1, "split each batch into this many micro-batches whose gradients add up to "
                                        "the batch's (less memory, the same optimizer steps; BatchNorm then sees "
                                        "micro-batch statistics)", low=1)
    clip_grad: float | None = option(None, "clip the gradients' global L2 norm to this value before each step",
                                     default_help="off", low=0, high=1e6, low_open=True)
    ema_decay: float = option(0.0, "weight EMA decay, e.g. 0.9998; 0 = off (the EMA weights are evaluated and saved)",
                              low=0, high=1, high_open=True)
    amp: bool = option(False, "mixed precision: float16 on CUDA, bfloat16 on a CPU with native BF16 (AVX512-BF16 "
                              "or AMX); elsewhere float32, said in the log")
    sync_bn: bool = option(False, "SyncBatchNorm across processes (CUDA only; per-process BN elsewhere)")
    workers: int = option(0, "data-loading worker processes", low=0, high=MAX_WORKERS)
    seed: int = option(0, "random seed of the training run", low=0, high=2**32 - 1)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    output: str | None = option(None, "run folder", default_help="runs/<model>-<data>-<time>")
    resume: str | None = option(None, "continue exactly from a run folder or its last.pt")
    overwrite: bool = option(False, "replace the run in --output if it holds one (its run files are deleted)")
    stop_after_steps: int | None = option(None, "save a resumable last.pt and exit after N steps of this invocation",
                                          low=1)
    log_interval: int = option(50, "steps between log lines (and tracked step scalars)", low=1)
    tensorboard: bool = option(False, "log step and epoch scalars for TensorBoard in the run folder's tensorboard/")
    deploy_from: str = option("last", "the weights deploy.safetensors is converted from: the last epoch's (last) or "
                                      "the best validated epoch's, as best.pt holds them (best)",
                              choices=("last", "best"))
    config_file: str | None = option(None, "the --config file the options came from (an input: never written to)",
                                     cli=False)
    run_id: str | None = option(None, "the run's identity, made when it starts: its checkpoints carry it", cli=False)
    resume_changes: tuple[dict[str, Any], ...] = option((), "settings a resume changed: field, earlier and new value, "
                                                            "and the epoch and step from which the new one applies",
                                                        cli=False)

    def __post_init__(self) -> None:
        self._check_types()
        check_device_name(self.device)
        self._check([(self.deploy_from in ("last", "best"), "deploy_from must be 'last' or 'best'")])
        self.resume_changes = tuple(dict(change) for change in self.resume_changes)  # YAML gives a list

    @property
    def resolved_lr(self) -> float:
        """The learning rate to use when ``lr`` is ``None`` (each job says how it derives it)."""
        raise NotImplementedError


@dataclass
class TrainConfig(LoopConfig):
    """Everything a classification run needs. Paper defaults for ImageNet, small defaults for the digits data.

    ``None`` in ``lr``, ``img_size`` and ``warmup_epochs`` means "derive it": the learning rate is
    ``0.1 * batch_size / 256`` for image folders (the paper's linear scaling) and half of it for the
    digits (measured best for the short default), the image size is 32 for the digits and 224 for
    image folders, and warm-up is 5 epochs for schedules of 100+ epochs and 1 otherwise.
    """

    epochs: int = option(10, "training epochs (sized for the digits default; the paper trains ImageNet 120-300)",
                         low=1)
    lr: float | None = option(None, "base learning rate",
                              default_help="0.1 x batch size / 256 for folders, 0.05 x for the digits; "
                                           "1/10 of it with --qat", low=0, high=MAX_LR, low_open=True)
    recipe: str | None = option(None, "a preset of the options below: paper-light (120 epochs), paper-heavy (200, "
                                      "label smoothing, mixup, AutoAugment) or repvggplus (the official RepVGGplus "
                                      "recipe); flags override it", default_help="none",
                                choices=tuple(RECIPES))
    model: str = option("repvgg_a0", "registered model name (see `repvgg info`)")
    data: str | None = option(None, "ImageFolder root with train/ and val/", default_help="the embedded digits data")
    img_size: int | None = option(None, "input resolution", default_help="32 for digits, 224 for folders", low=8,
                                  high=MAX_IMG_SIZE)
    test_size: int | None = option(None, "evaluation resolution, when it differs from --img-size (RepVGGplus trains "
                                         "at 256 and evaluates at 320)", default_help="--img-size", low=8,
                                   high=MAX_IMG_SIZE)
    warmup_epochs: float | None = option(None, "linear warm-up epochs",
                                         default_help="5 for >= 100 epochs, else 1; 0 with --qat", low=0, high=1e4)
    label_smoothing: float = option(0.1, "label smoothing", low=0, high=1, high_open=True)
    custom_l2: bool = option(False, "the official custom L2: plain L2 on the outer 3x3 taps, the fused centre "
                                    "tap normalised by the branches' BN scales")
    mixup: float = option(0.0, "mixup alpha (timm); 0 = off", low=0, high=100)
    random_erasing: float = option(0.0, "random erasing probability for folders (timm); 0 = off", low=0, high=1)
    color_jitter: float = option(0.0, "colour jitter for folders (timm): brightness, contrast and saturation "
                                      "by up to this fraction (timm's recipe: 0.4); 0 = off, as in the paper",
                                 low=0, high=1)
    cutmix: float = option(0.0, "cutmix alpha (timm); 0 = off", low=0, high=100)
    aux_weight: float = option(0.1, "weight of each auxiliary classifier's loss (models with auxiliary heads: "
                                    "RepVGGplus); the main loss has weight 1", low=0, high=100)
    auto_augment: str | None = option(None, "timm policy for folders: 'rand-m9-mstd0.5' (RandAugment) or "
                                            "'original' (AutoAugment)", default_help="none")
    channels_last: bool = option(False, "channels_last memory format (CUDA only; on CPU training stays contiguous)")
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    weights: str | None = option(None, "initialise from a weights file (official/timm/own); a head with another "
                                       "class count is re-initialised")
    model_overrides: dict[str, Any] = option(help="RepVGGSpec fields (on the command line: --spec KEY=VALUE)",
                                             factory=dict, cli=False)
    bad_images: str = option("fail", "unreadable images: fail naming the file, or skip and count",
                             choices=("fail", "skip"))
    val_fraction: float = option(0.2, "digits validation fraction (fixed split seed)", low=0, high=1, low_open=True,
                                 high_open=True)
    inference_speed: bool = option(True, "time both forms at the end of the run (images/s in summary.json)")
    qat: bool = option(False, "quantization-aware training: fine-tune the converted model of --weights with fake "
                              "INT8 quantization and write int8.onnx (learning rate 1/10, no warm-up by default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check([(self.bad_images in ("fail", "skip"), "bad_images must be 'fail' or 'skip'")])

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return self._base_lr * self.batch_size / 256 * (0.1 if self.qat else 1.0)  # QAT fine-tunes a trained model

    @property
    def _base_lr(self) -> float:
        """The learning rate at batch 256: the paper's 0.1, half of it for the digits' 10-epoch default
        (98.6-98.9% over seeds; 97.5-98.6% at 0.1)."""
        return 0.1 if self.data else 0.05

    @property
    def resolved_warmup_epochs(self) -> float:
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        if self.qat:
            return 0.0
        return 5.0 if self.epochs >= 100 else 1.0


@dataclass
class AblationConfig(TrainConfig):
    """The recipe every ablation run trains with: ``repvgg train``'s, with a deep, narrow model and a shorter
    budget by default (depth is where the branches matter; see the README's ablation section)."""

    model: str = option("repvgg_tiny_b", "registered model name to ablate (see `repvgg info`)")
    epochs: int = option(6, "training epochs of every run", low=1)
    lr: float | None = option(None, "base learning rate of every run",
                              default_help="0.1 x batch size / 256, the paper's rule, on the digits too", low=0,
                              high=MAX_LR, low_open=True)
    inference_speed: bool = option(False, "time both forms at the end of every run (the converted models "
                                          "are identical in cost, which the ablation checks by counting)")
    output: str | None = option(None, "ablation folder (one run folder per configuration and seed inside)",
                                default_help="runs/ablate-<model>-<time>")

    @property
    def _base_lr(self) -> float:
        # The paper's rule on the digits too: at half of it 6 epochs leave the full block behind 1x1-only.
        return 0.1



def resolve_run_config(
    config_cls: type[C],
    *,
    resume: str | None = None,
    config_file: str | None = None,
    flags: Mapping[str, Any] | None = None,
    command: str | None = None,
) -> C:
    """Merge, in this order of precedence: defaults < a resumed run's config < a config file < flags.

    ``flags`` holds command-line values, ``None`` for the ones not given; a resumed checkpoint must be one that
    ``command`` (``train``, ``det-train``, ...) resumes. The result is validated.
    """
    from repvgg.io.checkpoint import load_checkpoint

    base: dict[str, Any] = {}
    from_file = load_config_file(config_file) if config_file else {}  # keys as field names, each given once
    resume = resume or from_file.get("resume")  # a run resumed from the file's word comes under the file too
    if resume is not None and not isinstance(resume, (str, os.PathLike)):
        raise ValueError(f"{config_file}: resume must be a run folder or its last.pt, got {resume!r:.80}")
    if resume:
        from repvgg.training.run_folder import resumable_file

        base.update(load_checkpoint(resumable_file(resume, command or "train"), command)["config"])
        for key in ("stop_after_steps", "overwrite", "config_file"):  # they apply to one invocation only
            base.pop(key, None)
        base["output"] = str(Path(resume).parent if Path(resume).is_file() else Path(resume))  # where it lies now
    base.update(from_file)
    base.update({k: v for k, v in (flags or {}).items() if v is not None})
    if config_file:
        base["config_file"] = str(config_file)
    recipe = base.get("recipe")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        base = {**RECIPES[recipe], **base}  # what the recipe sets, unless given otherwise
    return config_cls.from_dict(base)

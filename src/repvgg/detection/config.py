"""Typed configuration of a detection run: defaults, YAML/JSON files, command-line overrides.

The defaults train an FCOS on RepVGG-A0 from scratch on the generated scenes in a few minutes on a 2-core CPU: a
64-channel pyramid, two head convs, 128-pixel images; ``kind="yolo"`` trains the real-time detector on
``efficientrep_t`` for 12 epochs with AdamW and an EMA of its weights (`KIND_DEFAULTS`). For real data set
``data`` (a COCO folder), ``image_size`` (640 is common), ``fpn_channels`` 256, ``head_convs`` 4 (FCOS), and an
ImageNet-pretrained ``backbone_weights``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from repvgg.limits import MAX_BATCH_SIZE, MAX_GENERATED_SCENES, MAX_IMG_SIZE, MAX_LR, check_generated_scenes
from repvgg.options import option
from repvgg.training.config import LoopConfig

__all__ = ["DETECTOR_KINDS", "DetTrainConfig", "KIND_DEFAULTS"]

#: The detectors: torchvision's FCOS and RetinaNet, and the real-time one in YOLOv6's design.
DETECTOR_KINDS = ("fcos", "retinanet", "yolo")


#: Each kind's defaults for the options left unset (``None``): the yolo kind trains twice as many of its cheaper
#: epochs, and evaluates an EMA of its weights (docs/detection.md measured these on the generated scenes).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "fcos": {"backbone": "repvgg_a0", "epochs": 8, "ema_decay": 0.0, "optimizer": "sgd"},
    "retinanet": {"backbone": "repvgg_a0", "epochs": 8, "ema_decay": 0.0, "optimizer": "sgd"},
    "yolo": {"backbone": "efficientrep_t", "epochs": 12, "ema_decay": 0.99, "optimizer": "adamw"},
}
#: Each optimizer's weight decay when none is given: FCOS's recipe for SGD, decoupled decay for AdamW.
OPTIMIZER_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}
#: The most 3x3 convs in a RetinaNet head tower (torchvision's head, whose towers have four).
RETINANET_HEAD_CONVS = 4


@dataclass
class DetTrainConfig(LoopConfig):
    """Everything a detection run needs. ``lr=None`` means ``0.01 * batch_size / 16`` with SGD (FCOS's 0.01 at batch
    16), ``0.002 * batch_size / 16`` with AdamW."""

    # None until __post_init__ fills the kind's default: the engine reads an int
    epochs: int | None = option(None, "training epochs (sized for the generated scenes)",  # type: ignore[assignment]
                                default_help="8; 12 for --kind yolo", low=1)
    batch_size: int = option(16, "global batch size over all processes, >= 2 per process", low=2, high=MAX_BATCH_SIZE)
    lr: float | None = option(None, "base learning rate (cosine schedule after a linear warm-up)",
                              default_help="0.01 x batch/16 with SGD, 0.002 x batch/16 with AdamW", low=0,
                              high=MAX_LR, low_open=True)
    optimizer: str | None = option(None, "sgd or adamw (decoupled weight decay)",  # type: ignore[assignment]
                                   default_help="sgd; adamw for --kind yolo", choices=("sgd", "adamw"))
    weight_decay: float | None = option(None, "weight decay on kernels",  # type: ignore[assignment]
                                        default_help="1e-4 with SGD, 0.05 with AdamW", low=0, high=1)
    clip_grad: float | None = option(10.0, "clip the gradients' global L2 norm to this value before each step",
                                     low=0, high=1e6, low_open=True)
    warmup_epochs: float = option(1.0, "linear learning-rate warm-up, in epochs", low=0, high=1000)
    ema_decay: float | None = option(None, "weight EMA decay; 0 = off (the EMA weights are evaluated and saved)",  # type: ignore[assignment]
                                     default_help="0; 0.99 for --kind yolo", low=0, high=1, high_open=True)
    output: str | None = option(None, "run folder", default_help="runs/det-<kind>-<backbone>-<data>-<time>")
    log_interval: int = option(20, "steps between log lines (and tracked step scalars)", low=1)
    backbone: str | None = option(None, "registered RepVGG, QARepVGG, RepVGGplus or EfficientRep name (see `repvgg "
                                        "info`)", default_help="repvgg_a0; efficientrep_t for --kind yolo")
    kind: str = option("fcos", "the detector: torchvision's fcos or retinanet, or yolo (YOLOv6's design, real-time)",
                       choices=DETECTOR_KINDS)
    fpn_channels: int | None = option(None, "feature pyramid width, a multiple of 32 (the papers: 256); the yolo "
                                            "kind's neck is half as wide as its backbone", default_help="64",
                                      low=64, high=4096)
    head_convs: int | None = option(None, "3x3 convs in each head tower (the papers: 4; YOLOv6: 1)",
                                    default_help="2; 1 for --kind yolo", low=0, high=16)
    neck_depth: int | None = option(None, "--kind yolo: RepVGG blocks in each Rep-PAN RepBlock",
                                    default_help="the backbone's (efficientrep_t: 1, _n and _s: 4)", low=1, high=16)
    image_size: int = option(128, "images are letterboxed to this square size", low=32, high=MAX_IMG_SIZE)
    max_objects: int = option(100, "most objects an image may hold", low=1, high=10_000)
    backbone_weights: str | None = option(None, "weights file for the backbone (classification weights, a "
                                                "checkpoint, or a converted deploy file, which is expanded)")
    data: str | None = option(None, "COCO folder with annotations/instances_{train,val}.json",
                              default_help="the generated scenes")
    synthetic_train: int = option(800, "generated training scenes (each rendered once before training, to find its "
                                       f"boxes; at most {MAX_GENERATED_SCENES:,})", low=1)
    synthetic_val: int = option(100, f"generated validation scenes (at most {MAX_GENERATED_SCENES:,})", low=1)
    synthetic_seed: int = option(0, "the generated data's seed, separate from the training seed", low=0,
                                 high=2**32 - 1)

    def __post_init__(self) -> None:
        for name, value in KIND_DEFAULTS.get(self.kind, KIND_DEFAULTS["fcos"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.weight_decay is None:
            self.weight_decay = OPTIMIZER_WEIGHT_DECAY.get(str(self.optimizer), OPTIMIZER_WEIGHT_DECAY["sgd"])
        super().__post_init__()
        if self.synthetic:  # bounded before any work: every scene is rendered before the first step
            for name in ("synthetic_train", "synthetic_val"):
                check_generated_scenes(getattr(self, name), name)
        else:
            given = [f.name for f in dataclasses.fields(self)
                     if f.name.startswith("synthetic_") and getattr(self, f.name) != f.default]
            if given:
                raise ValueError(f"{', '.join(given)} set the generated scenes, which --data {self.data} replaces: "
                                 "leave them out, or leave out --data")
        self._check([
            (self.kind != "yolo" or self.image_size % 32 == 0,
             f"image_size must be a multiple of 32 for --kind yolo (its Rep-PAN neck takes maps of stride 32), got "
             f"{self.image_size}"),
            (self.kind != "retinanet" or self.head_convs is None or self.head_convs <= RETINANET_HEAD_CONVS,
             f"head_convs takes at most {RETINANET_HEAD_CONVS} with --kind retinanet (torchvision's head), got "
             f"{self.head_convs}"),
        ])

    @property
    def synthetic(self) -> bool:
        return self.data is None

    @property
    def resolved_lr(self) -> float:
        base = 0.002 if self.optimizer == "adamw" else 0.01
        return self.lr if self.lr is not None else base * self.batch_size / 16

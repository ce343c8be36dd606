"""Every quantitative speed, FLOPs and parameter claim of the paper (as summarised in the seed), checked here.

`CLAIMS` holds each claim as data: what it compares, the paper's ratio (1080Ti, batch 128) and how it is
judged. `measure_models` builds every model the claims name (RepVGG converted, the baselines with their
conv-BN pairs folded), counts parameters and multiply-adds, and times them in interleaved rounds through one
runtime of the fast path; `operator_density` times the operators behind "3x3 conv has about 4x the
density"; `judge` turns the measured ratios into a status. Nothing is written here; the script
``benchmarks/paper_claims.py`` reports.

A claim's status is computed from its measured ratio (subject / reference):

* speed ("A runs r x as fast as B"): ``holds`` when A is at least 90% of the paper's margin (``ratio >= 0.9 r``
  and ``ratio > 1``), ``direction only`` when A is faster but by less, ``does not hold`` when it is not faster;
* ``fewer`` (parameters): holds when the ratio is below 1;
* ``about`` (a FLOPs or parameter ratio): holds within 5% of the paper's.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from repvgg.nn.complexity import count_macs, count_parameters
from repvgg.measure.timing import make_timer, time_interleaved

__all__ = ["CLAIMS", "MODEL_SIZES", "OPERATORS", "PAPER_TOP1", "Claim", "ClaimResult", "ModelMeasurement",
           "claim_ratio", "density_ratio", "evaluate_claims", "judge", "measure_models", "models_of",
           "operator_density", "published_top1", "segmentation_speeds"]

log = logging.getLogger(__name__)

#: Input side of each model that is not measured at 224: EfficientNet-B3 at its own 300, where its FLOPs give
#: the paper's 8.4x.
MODEL_SIZES = {"efficientnet_b3": 300}


@dataclass(frozen=True)
class Claim:
    """One claim: ``subject`` against ``reference`` in ``quantity``, the paper's ratio, and how it is judged."""

    text: str
    quantity: str  # "throughput", "macs", "params", "density" or "segmentation throughput"
    subject: str
    reference: str
    paper: float
    judged: str  # "faster", "fewer" or "about"


#: The seed's claims, in its order (Sec. 1.1, 3.1 and 3.3). Accuracy claims need ImageNet training and are not here.
CLAIMS: tuple[Claim, ...] = (
    Claim("3x3 conv has around 4x the computational density of the other operators", "density", "dense 3x3",
          "others", 4.0, "faster"),
    Claim("VGG-16 has 8.4x the FLOPs of EfficientNet-B3", "macs", "vgg16", "efficientnet_b3", 8.4, "about"),
    Claim("VGG-16 (8.4x the FLOPs) runs 1.8x as fast as EfficientNet-B3", "throughput", "vgg16",
          "efficientnet_b3", 1.8, "faster"),
    Claim("RepVGG-A0 is 33% faster than ResNet-18", "throughput", "repvgg_a0", "resnet18", 1.33, "faster"),
    Claim("RepVGG-A1 is 64% faster than ResNet-34", "throughput", "repvgg_a1", "resnet34", 1.64, "faster"),
    Claim("RepVGG-A2 is 83% faster than ResNet-50", "throughput", "repvgg_a2", "resnet50", 1.83, "faster"),
    Claim("RepVGG-B1g4 is 101% faster than ResNet-101", "throughput", "repvgg_b1g4", "resnet101", 2.01, "faster"),
    Claim("RepVGG-B1g2 is 2.66x as fast as ResNet-152", "throughput", "repvgg_b1g2", "resnet152", 2.66, "faster"),
    Claim("RepVGG-A0 has fewer parameters than ResNet-18", "params", "repvgg_a0", "resnet18", 1.0, "fewer"),
    Claim("RepVGG-A1 has fewer parameters than ResNet-34", "params", "repvgg_a1", "resnet34", 1.0, "fewer"),
    Claim("RepVGG-A2 has fewer parameters than ResNet-50", "params", "repvgg_a2", "resnet50", 1.0, "fewer"),
    Claim("RepVGG-B1g4 has fewer parameters than ResNet-101", "params", "repvgg_b1g4", "resnet101", 1.0, "fewer"),
    Claim("RepVGG-B1g2 has fewer parameters than ResNet-152", "params", "repvgg_b1g2", "resnet152", 1.0, "fewer"),
    Claim("RepVGG-B2 has 58% of VGG-16's parameters", "params", "repvgg_b2", "vgg16", 0.58, "about"),
    Claim("RepVGG-B2 runs 10% faster than VGG-16", "throughput", "repvgg_b2", "vgg16", 1.10, "faster"),
    Claim("RepVGG-A2 is 59% faster than EfficientNet-B0", "throughput", "repvgg_a2", "efficientnet_b0", 1.59,
          "faster"),
    Claim("RepVGG-B1 runs slightly faster than RegNetX-3.2GF", "throughput", "repvgg_b1", "regnet_x_3_2gf", 1.0,
          "faster"),
    Claim("PSPNet on RepVGG-A2 runs slightly faster than on ResNet-50", "segmentation throughput", "repvgg_a2",
          "resnet50", 1.0, "faster"),
    Claim("PSPNet on RepVGG-B1g2 runs slightly faster than on ResNet-101", "segmentation throughput",
          "repvgg_b1g2", "resnet101", 1.0, "faster"),
    Claim("PSPNet on RepVGG-B1g2-fast runs 62% faster than on ResNet-101", "segmentation throughput",
          "repvgg_b1g2_fast", "resnet101", 1.62, "faster"),
)

#: The paper's ImageNet top-1 of the RepVGGs (120 epochs, its Table 4).
PAPER_TOP1 = {"repvgg_a0": 72.41, "repvgg_a1": 74.46, "repvgg_a2": 76.48, "repvgg_b0": 75.14, "repvgg_b1": 78.37,
              "repvgg_b1g2": 77.78, "repvgg_b1g4": 77.58, "repvgg_b2": 78.78, "repvgg_b2g4": 78.50}


@dataclass(frozen=True)
class ClaimResult:
    """A claim with its measured ratio and the status computed from it."""

    claim: Claim
    measured: float | None
    status: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self.claim), "measured": self.measured, "status": self.status}


def judge(claim: Claim, measured: float | None) -> str:
    """The status of ``claim`` given its measured ratio (see the module docstring)."""
    if measured is None or not math.isfinite(measured):
        return "not measured"
    if claim.judged == "fewer":
        return "holds" if measured < 1 else "does not hold"
    if claim.judged == "about":
        return "holds" if abs(measured / claim.paper - 1) <= 0.05 else "does not hold"
    if measured <= 1:
        return "does not hold"
    return "holds" if measured >= 0.9 * claim.paper else "direction only"


@dataclass
class ModelMeasurement:
    """One model as the claims use it: parameters and multiply-adds per image (at ``img_size``), images/s."""

    name: str
    img_size: int
    params: int
    macs: int
    throughput: float | None = None
    runtime: str = ""


def _build(name: str) -> nn.Module:
    """A claim's model for inference: a RepVGG converted, a baseline with its conv-BN pairs folded."""
    from repvgg.nn.baselines import baseline
    from repvgg.nn.convert import reparameterize_model
    from repvgg.nn.registry import MODEL_SPECS, build_model

    if name in MODEL_SPECS:
        return reparameterize_model(build_model(name), inplace=True).eval()
    return baseline(name).eval()


def measure_models(names: Sequence[str], *, device: str = "cpu", runtime: str = "channels_last", batch_size: int = 8,
                   warmup: int = 1, rounds: int = 3, img_size: int | None = None) -> dict[str, ModelMeasurement]:
    """Count and time ``names`` (registered RepVGGs or baselines), each at ``img_size`` or its own size
    (`MODEL_SIZES`, else 224) through ``runtime`` of the fast path (checked against the eager model), in
    interleaved rounds, medians."""
    from repvgg.perf.fast import optimize_for_inference

    target = torch.device(device)
    measurements: dict[str, ModelMeasurement] = {}
    calls: dict[str, Callable[[], Any]] = {}
    for name in names:
        size = img_size or MODEL_SIZES.get(name, 224)
        model = _build(name)
        meta = copy.deepcopy(model).to("meta")
        measurements[name] = ModelMeasurement(name, size, count_parameters(model), count_macs(meta, (1, 3, size, size)))
        example = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(target)
        runner = optimize_for_inference(model.to(target), example, candidates=[runtime], measure=False)
        measurements[name].runtime = runner.backend
        calls[name] = functools.partial(runner, example)
        log.info("built %s (%d x %d, %.1f M parameters)", name, size, size, measurements[name].params / 1e6)
    timings = time_interleaved(calls, warmup=warmup, rounds=rounds, timer=make_timer(target),
                               pause_s=0.05 if target.type == "cpu" else 0.0)
    for name, timing in timings.items():
        measurements[name].throughput = timing.throughput(batch_size)
    return measurements


#: The operators of the density claim: name -> (kernel size, groups; 0 means depthwise).
OPERATORS = {"dense 3x3": (3, 1), "1x1": (1, 1), "depthwise 3x3": (3, 0), "depthwise 5x5": (5, 0),
             "grouped 3x3 (g=4)": (3, 4)}


def _operator(kernel: int, groups: int, channels: int) -> nn.Module:
    return nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=groups or channels).eval()


@torch.no_grad()
def operator_density(*, runtimes: Sequence[str] = ("eager", "channels_last", "onnxruntime"), channels: int = 128,
                     size: int = 56, batch_size: int = 8, device: str = "cpu", warmup: int = 2,
                     rounds: int = 5) -> list[dict[str, Any]]:
    """GFLOP/s (2 x multiply-adds / s) of each of `OPERATORS` on the same ``batch_size x channels x size x
    size`` feature map, on each runtime (one that cannot run an operator is left out, with a log line)."""
    from repvgg.perf.fast import optimize_for_inference

    target = torch.device(device)
    x = torch.randn(batch_size, channels, size, size, generator=torch.Generator().manual_seed(0)).to(target)
    calls, macs = {}, {}
    for op, (kernel, groups) in OPERATORS.items():
        module = _operator(kernel, groups, channels).to(target)
        macs[op] = count_macs(copy.deepcopy(module).to("meta"), tuple(x.shape))
        for runtime in runtimes:
            try:
                runner = optimize_for_inference(module, x, candidates=[runtime], measure=False)
            except ValueError as err:
                log.info("%s on %s: not available (%s)", op, runtime, err)
                continue
            calls[(op, runtime)] = (lambda r=runner: r(x))
    timings = time_interleaved({f"{op} | {rt}": fn for (op, rt), fn in calls.items()}, warmup=warmup, rounds=rounds,
                               timer=make_timer(target), pause_s=0.05 if target.type == "cpu" else 0.0)
    return [{"operator": op, "runtime": rt, "macs": macs[op],
             "gflops": 2 * macs[op] / timings[f"{op} | {rt}"].median / 1e9,
             "shape": [batch_size, channels, size, size]} for op, rt in calls]


def density_ratio(rows: Sequence[dict[str, Any]], runtime: str) -> float | None:
    """Dense 3x3 GFLOP/s over the geometric mean of the other operators', on ``runtime``."""
    rates = {r["operator"]: r["gflops"] for r in rows if r["runtime"] == runtime}
    others = [v for k, v in rates.items() if k != "dense 3x3"]
    if "dense 3x3" not in rates or not others:
        return None
    return rates["dense 3x3"] / math.exp(sum(math.log(v) for v in others) / len(others))


def segmentation_speeds(pairs: Sequence[str], *, img_size: int = 128, batch_size: int = 2,
                        rounds: int = 3) -> dict[str, float]:
    """Images/s of PSPNet (19 classes, full-width heads) on each backbone name in ``pairs`` (``repvgg_b1g2_fast``
    is B1g2 with only its last 5 layers dilated), converted or conv-BN folded, interleaved rounds, medians."""
    from repvgg.nn.convert import reparameterize_model
    from repvgg.segmentation.evaluate import segmenter_speed
    from repvgg.segmentation.pspnet import create_segmenter

    models = []
    for name in pairs:
        fast = name.endswith("_fast")
        net = create_segmenter(name.removesuffix("_fast"), 19, head_channels=512, aux_channels=256, fast=fast)
        models.append((name, reparameterize_model(net, inplace=True).eval()))
    batch = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    return {row["model"]: row["images_per_s"] for row in segmenter_speed(models, batch, rounds=rounds)}


def claim_ratio(claim: Claim, models: dict[str, ModelMeasurement], density: float | None,
                segmentation: dict[str, float]) -> float | None:
    """The measured ratio of ``claim`` (``None`` when a measurement it needs is missing)."""
    if claim.quantity == "density":
        return density
    if claim.quantity == "segmentation throughput":
        a, b = segmentation.get(claim.subject), segmentation.get(claim.reference)
        return None if a is None or b is None else a / b
    subject, reference = models.get(claim.subject), models.get(claim.reference)
    if subject is None or reference is None:
        return None
    values = {"throughput": (subject.throughput, reference.throughput), "macs": (subject.macs, reference.macs),
              "params": (subject.params, reference.params)}
    x, y = values[claim.quantity]
    return None if x is None or not y else x / y


def published_top1(name: str) -> tuple[float | None, str]:
    """ImageNet top-1 of ``name`` and where it comes from: the paper for RepVGG, torchvision's weights metadata
    (its first ImageNet weights, as the paper's baselines were) for the others; no download either way."""
    if name in PAPER_TOP1:
        return PAPER_TOP1[name], "the paper (120 epochs)"
    try:
        from torchvision.models import get_model_weights

        weights = get_model_weights(name)
    except (ValueError, KeyError, ImportError):
        return None, "not available without a download"
    chosen = getattr(weights, "IMAGENET1K_V1", None) or weights.DEFAULT
    return float(chosen.meta["_metrics"]["ImageNet-1K"]["acc@1"]), f"torchvision {chosen} metadata"


def models_of(claims: Sequence[Claim]) -> list[str]:
    """Every classification model the claims compare, in order of first mention."""
    names = [n for c in claims if c.quantity in ("throughput", "macs", "params") for n in (c.subject, c.reference)]
    return list(dict.fromkeys(names))


def evaluate_claims(claims: Sequence[Claim], models: dict[str, ModelMeasurement], density: float | None,
                    segmentation: dict[str, float]) -> list[ClaimResult]:
    """Each claim with its measured ratio and status."""
    results = []
    for claim in claims:
        ratio = claim_ratio(claim, models, density, segmentation)
        results.append(ClaimResult(claim, ratio, judge(claim, ratio)))
    return results


"""INT8 post-training quantization of the plain network through ONNX Runtime, measured on real data.

``quantize_model(weights, "out.onnx")``: the model is loaded (and converted, with the conversion checked
on a validation batch), exported to ONNX (checked against PyTorch), and quantized statically with ONNX
Runtime's tools: QDQ format, per-channel symmetric INT8 weights, asymmetric UINT8 activations whose
ranges come from ``calib_images`` training images (validation preprocessing), the calibration the fast path's INT8
runtimes use too (`quantize_onnx`). The INT8 file is judged against float32 on the whole
validation set on every runtime that is timed, by the accuracy guard of ``optimize_for_inference``
([`repvgg.quant.guard`][repvgg.quant.guard]): below it on every runtime, nothing is written and the run fails (exit 1)
naming the remedies. FP32 and INT8 are timed against each other, and the runtime to use is the fastest that holds the
guard.

Why it matters for RepVGG: the fused kernel sums three differently scaled branches, so weight and
activation ranges are wide and plain INT8 loses accuracy (QARepVGG, Chu et al., AAAI 2024); the
``qarepvgg_*`` models' block keeps them narrow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from repvgg.errors import RunFailed
from repvgg.io.card import write_onnx_metadata
from repvgg.io.export import export_onnx_file
from repvgg.io.onnx_run import ONNX_RUNTIMES, onnx_runner
from repvgg.io.loading import load_model, model_card
from repvgg.nn.convert import OutputDeviation, check_conversion, reparameterize_model
from repvgg.measure.timing import time_interleaved
from repvgg.quant.qat import train_qat
from repvgg.quant.config import QuantizeConfig
from repvgg.limits import check_batch_memory
from repvgg.quant.guard import Guard, require_passing, validation_guard
from repvgg.training.distributed import dataset_size
from repvgg.quant.qdq import batches, calibration_subset, quantize_onnx, quantized_conv_count
from repvgg.serialization import check_output_path, commit_staged, scratch_folder, staging_folder
from repvgg.training.config import TrainConfig
from repvgg.training.data import DatasetBundle, Relabelled, build_datasets

__all__ = ["QuantizeReport", "quantize_model", "runtime_speeds", "speed_runtimes"]

log = logging.getLogger(__name__)


@dataclass
class QuantizeReport:
    """What ``repvgg quantize`` measured and wrote."""

    output: str
    model: str
    dataset: str
    calibration: str
    calib_images: int
    val_images: int
    top1_fp32: float
    top1_int8: float
    agreement: float  # fraction of validation images where INT8 and FP32 predict the same class
    int8_speedup: float  # INT8 / FP32 throughput through `runtime`, same batch, interleaved medians
    fp32_images_per_s: float
    int8_images_per_s: float
    speed_input: list[int]
    quantized_convs: int
    convs: int
    converted: bool
    qat_epochs: int = 0
    runtime: str = "onnxruntime"  # the fastest runtime whose INT8 holds the guard (the numbers above are its)
    speeds: dict[str, dict[str, float]] = field(default_factory=dict)  # images/s, FP32 and INT8, per runtime timed
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)  # INT8 top-1, agreement, passed, per runtime
    guard: dict[str, float] = field(default_factory=dict)  # the accuracy guard's thresholds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)



def speed_runtimes(runtime: str) -> list[str]:
    """The runtimes ``--runtime`` times: ``auto`` is ONNX Runtime and, when it is installed, OpenVINO."""
    if runtime != "auto":
        return [runtime]
    try:
        import openvino  # noqa: F401
    except ImportError:
        log.info("OpenVINO is not installed (pip install 'repvgg[deploy]'): timing ONNX Runtime only")
        return ["onnxruntime"]
    return list(ONNX_RUNTIMES)


def runtime_speeds(fp32_path: Path, int8_path: Path, batch: torch.Tensor, runtimes: list[str], *,
                   rounds: int = 15) -> dict[str, dict[str, float]]:
    """Images/s of the FP32 and the INT8 file through each runtime: the same batch, interleaved rounds, medians."""
    calls = {}
    for runtime in runtimes:
        for key, path in (("fp32", fp32_path), ("int8", int8_path)):
            calls[f"{runtime}/{key}"] = (lambda run=onnx_runner(path, runtime): run(batch))
    results = time_interleaved(calls, warmup=3, rounds=rounds, pause_s=0.05)
    return {runtime: {key: results[f"{runtime}/{key}"].throughput(batch.shape[0]) for key in ("fp32", "int8")}
            for runtime in runtimes}


def _data_for(model: nn.Module, data: str | None, img_size: int | None) -> DatasetBundle:
    """The data to calibrate and measure on, prepared as the model's file records (its size by default)."""
    card = model_card(model)
    bundle = build_datasets(data, img_size=img_size, augment=False, preprocessing=card.recorded_preprocessing)
    label_map = card.label_map(bundle.classes, bundle.name)  # matched by name; a mismatch is refused
    if label_map is not None:
        bundle = dataclasses.replace(bundle, train=Relabelled(bundle.train, label_map),
                                     val=Relabelled(bundle.val, label_map), classes=list(card.classes))
    return bundle


def quantize_model(
    weights: str | os.PathLike[str] | nn.Module,
    output: str | os.PathLike[str],
    config: QuantizeConfig | None = None,
    **options: Any,
) -> QuantizeReport:
    """Convert (if needed), check, export and INT8-quantize a classifier; measure FP32 vs INT8.

    With ``qat_epochs`` the INT8 model comes from quantization-aware training instead
    (`repvgg.quant.qat`): a QAT run in the folder ``<output stem>-qat`` beside ``output``
    fine-tunes the converted model, and its QDQ export is measured here like the post-training one.

    Args:
        weights: a weights file (any format [`repvgg.load_model`][repvgg.io.loading.load_model] reads, a run's
            ``best.pt`` included) or a model.
        output: the INT8 ``.onnx`` file to write.
        config: the options ([`QuantizeConfig`][repvgg.quant.config.QuantizeConfig]): ``data`` (an ImageFolder root;
            ``None`` is the embedded digits), ``img_size`` (default: the size the weights file records),
            ``calib_images`` (training images, validation preprocessing, that set the activation ranges),
            ``calibration`` (``minmax``, ``entropy`` or ``percentile``), ``speed_batch``, ``speed_img_size`` and
            ``speed_rounds`` (the timing behind ``int8_speedup``),
            ``qat_epochs``, ``qat_lr`` and ``device`` (quantization-aware training instead of calibration),
            ``overwrite`` (the output and the QAT run folder).
        **options: fields of ``config`` to replace, e.g. ``quantize_model(w, "int8.onnx", calib_images=64)``.

    Raises:
        ValueError: bad arguments or data (an empty or mis-shaped calibration set, another class count).
        ConversionMismatch: the converted or exported FP32 model does not compute what its source does.
        RunFailed: ONNX Runtime quantized no convolution, or INT8 outputs are not finite.
    """
    cfg = dataclasses.replace(config or QuantizeConfig(), **options)
    output = Path(output)
    reads = [cfg.data] + ([] if isinstance(weights, nn.Module) else [weights])
    check_output_path(output, reads=reads, overwrite=cfg.overwrite, suffixes=(".onnx",))
    qat_int8 = None
    if cfg.qat_epochs:
        if isinstance(weights, nn.Module):
            raise ValueError("quantization-aware training starts from a weights file; save the model first")
        qat_dir = output.with_name(output.stem + "-qat")
        summary = train_qat(TrainConfig(qat=True, weights=str(weights), epochs=cfg.qat_epochs, lr=cfg.qat_lr,
                                        data=cfg.data, img_size=cfg.img_size, output=str(qat_dir),
                                        overwrite=cfg.overwrite, device=cfg.device))
        if summary.get("interrupted"):
            raise KeyboardInterrupt(f"QAT stopped early; continue it with: repvgg train --resume {qat_dir}")
        qat_int8 = qat_dir / "int8.onnx"
    return _quantize(weights, output, cfg, qat_int8=qat_int8)


@torch.no_grad()
def _quantize(weights: str | os.PathLike[str] | nn.Module, output: Path, cfg: QuantizeConfig, *,
              qat_int8: Path | None) -> QuantizeReport:
    data, img_size, calib_images, method = cfg.data, cfg.img_size, cfg.calib_images, cfg.calibration
    speed_batch, speed_img_size, qat_epochs = cfg.speed_batch, cfg.speed_img_size, cfg.qat_epochs
    model = load_model(weights) if not isinstance(weights, nn.Module) else weights
    model = model.eval()
    bundle = _data_for(model, data, img_size)
    side = bundle.preprocessing.img_size  # what the timing and the calibration will allocate, bounded first
    check_batch_memory(speed_batch, (3, speed_img_size or side, speed_img_size or side), "--speed-batch")
    check_batch_memory(min(calib_images, dataset_size(bundle.train)), (3, side, side), "--calib-images", held=True)
    calibration = calibration_subset(bundle.train, calib_images)
    val_batch, _ = next(iter(batches(bundle.val, 16)))

    converted = not getattr(model, "deploy", True)
    plain = reparameterize_model(model).float().cpu()
    deviation = OutputDeviation()
    deviation.update(model(val_batch), plain(val_batch))
    check_conversion(deviation.relative, f"the converted {getattr(model, 'name', 'model')}")

    with staging_folder(output) as staging:
        scratch = scratch_folder(staging)
        fp32 = scratch / "fp32.onnx"
        int8 = Path(staging) / output.name
        export_onnx_file(plain, val_batch, fp32)
        deviation = OutputDeviation()
        deviation.update(plain(val_batch), onnx_runner(fp32)(val_batch))
        check_conversion(deviation.relative, "the FP32 ONNX export (run by ONNX Runtime)")
        if qat_int8 is not None:
            shutil.copyfile(qat_int8, int8)
        else:
            log.info("calibrating %s on %d training images (%s)", getattr(model, "name", "model"),
                     len(calibration), method)
            quantize_onnx(fp32, int8, calibration, method=method)
        write_onnx_metadata(int8, bundle.card.metadata())  # the classes and the preprocessing measured with
        quantized, convs = quantized_conv_count(int8)
        if quantized == 0:
            raise RunFailed("ONNX Runtime quantized none of the convolutions; nothing was written")
        runtimes = speed_runtimes(cfg.runtime)
        log.info("judging INT8 against float32 on %d validation images (%s)", dataset_size(bundle.val),
                 ", ".join(runtimes))
        # QAT fine-tunes the weights on purpose: its INT8 model is held to float32's accuracy, not its predictions
        guard = Guard(0.0 if qat_int8 is not None else cfg.min_agreement, cfg.max_top1_drop)
        results = validation_guard(plain, {runtime: onnx_runner(int8, runtime) for runtime in runtimes},
                                   batches(bundle.val, 64), guard, device=torch.device("cpu"))
        require_passing(results, guard, f"the INT8 {getattr(model, 'name', 'model')}")
        judged_on = next(iter(results.values())).images
        if judged_on < 100:
            log.warning("the accuracy guard judged INT8 on only %d validation images (one image is %.1f%% of the "
                        "agreement): its verdict is weak; give more validation images", judged_on, 100 / judged_on)
        size = speed_img_size or val_batch.shape[-1]
        speed_input = torch.randn(speed_batch, val_batch.shape[1], size, size,
                                  generator=torch.Generator().manual_seed(0))
        if size != val_batch.shape[-1]:
            # ranges calibrated at the data's size apply to any size; the speed file is the same network
            fp32_speed, int8_speed = scratch / "fp32_speed.onnx", scratch / "int8_speed.onnx"
            export_onnx_file(plain, speed_input, fp32_speed)
            if qat_int8 is not None:
                int8_speed = int8  # the QAT export takes any height and width
            else:
                quantize_onnx(fp32_speed, int8_speed, _Resized(calibration, size), method=method)
        else:
            fp32_speed, int8_speed = fp32, int8
        speeds = runtime_speeds(fp32_speed, int8_speed, speed_input, runtimes, rounds=cfg.speed_rounds)
        commit_staged(int8, output)
    # the runtime to use: the fastest whose INT8 holds the guard
    fastest = max((r for r in runtimes if results[r].passed), key=lambda runtime: speeds[runtime]["int8"])
    fp32_rate, int8_rate, chosen = speeds[fastest]["fp32"], speeds[fastest]["int8"], results[fastest]
    return QuantizeReport(
        output=str(output), model=getattr(model, "name", type(model).__name__), dataset=bundle.name,
        calibration="qat" if qat_int8 is not None else method,
        calib_images=0 if qat_int8 is not None else len(calibration), val_images=chosen.images,
        top1_fp32=chosen.top1_reference, top1_int8=chosen.top1, agreement=chosen.agreement,
        int8_speedup=int8_rate / fp32_rate, fp32_images_per_s=fp32_rate, int8_images_per_s=int8_rate,
        speed_input=list(speed_input.shape), quantized_convs=quantized, convs=convs, converted=converted,
        qat_epochs=qat_epochs, runtime=fastest, speeds=speeds,
        accuracy={r: {"top1_int8": results[r].top1, "agreement": results[r].agreement, "passed": results[r].passed}
                  for r in runtimes},
        guard={"min_agreement": guard.min_agreement, "max_top1_drop": guard.max_top1_drop},
    )


class _Resized(Dataset):
    """The calibration images resized to another square size (for the speed file only)."""

    def __init__(self, dataset: Dataset, size: int) -> None:
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return dataset_size(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        resized = nn.functional.interpolate(image[None], size=(self.size, self.size), mode="bilinear",
                                            align_corners=False)
        return resized[0], label

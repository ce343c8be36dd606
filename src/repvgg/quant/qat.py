"""Quantization-aware training: fine-tune the converted (plain) network with fake quantization, export INT8.

A task of the training engine ([`repvgg.training.engine.fit`][repvgg.training.engine.fit]), so a QAT run is resumable,
``torchrun``-ready and checked like any other. The trained model (``--weights``) is converted to its plain
form (checked on a validation batch), prepared with PyTorch's FX graph-mode QAT (``prepare_qat_fx``;
the eager API is deprecated) using fake quantizers that match ONNX Runtime's QDQ INT8: per-channel
symmetric INT8 weights, per-tensor asymmetric UINT8 activations. After fine-tuning, the fake-quantized
network is exported to ONNX, where each fake quantizer becomes a QuantizeLinear/DequantizeLinear pair
(the same QDQ format as ``repvgg quantize``'s post-training path), and the INT8 file is evaluated with
ONNX Runtime.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from repvgg.errors import RunFailed
from repvgg.io.loading import load_model, model_card
from repvgg.nn.convert import OutputDeviation, check_conversion, reparameterize_model
from repvgg.nn.spec import RepVGGSpec
from repvgg.nn.registry import build_model
from repvgg.training.classification import ClassificationTask
from repvgg.training.config import TrainConfig
from repvgg.training.data import collate_readable
from repvgg.training.engine import fit
from repvgg.io.onnx_run import onnx_runner
from repvgg.quant.guard import Guard, require_passing, validation_guard
from repvgg.quant.qdq import batches, export_fake_quant_onnx, qat_qconfig_mapping, quantized_conv_count

__all__ = ["QATTask", "prepare_qat", "train_qat"]

logger = logging.getLogger(__name__)


def prepare_qat(plain: nn.Module, example: torch.Tensor) -> nn.Module:
    """A trainable fake-quantized copy of the plain (converted) network ``plain``."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX graph mode announces its successor; it is what torch ships
        prepared = prepare_qat_fx(copy.deepcopy(plain).train(), qat_qconfig_mapping(), (example,))
    for name in ("name", "num_classes", "in_chans"):
        if hasattr(plain, name):
            setattr(prepared, name, getattr(plain, name))
    return prepared


class QATTask(ClassificationTask):
    """Fine-tune a trained classifier's plain network with fake quantization (``repvgg train --qat``)."""


    def setup(self, config: TrainConfig, ctx: Any, resumed: Mapping[str, Any] | None = None) -> tuple[TrainConfig, Any]:
        if not config.weights:
            raise ValueError("QAT fine-tunes a trained model: pass its weights (--weights RUN/best.pt)")
        if resumed is not None and "source" in resumed:
            # The architecture alone: the fine-tuned weights come from the checkpoint, not the initial file.
            described = resumed["source"]
            self.source = build_model(RepVGGSpec.from_dict(described["spec"]), num_classes=described["num_classes"],
                                      in_chans=described["in_chans"], deploy=True).eval()
            self.source.name = described["arch"]
        else:
            self.source = load_model(config.weights).eval()
            recorded = model_card(self.source).recorded_preprocessing
            if config.img_size is None and recorded is not None:  # fine-tuned at the size it was trained at
                config = config.updated(img_size=recorded.img_size)
        config, train_set = super().setup(config.updated(model=self.source.name), ctx, resumed)
        if self.source.num_classes != self.bundle.num_classes:
            raise ValueError(f"{config.weights} has {self.source.num_classes} classes but the data has "
                             f"{self.bundle.num_classes}; fine-tune it on the data it was trained on")
        return config, train_set

    def build_model(self, config: TrainConfig, device: torch.device) -> nn.Module:
        source = self.source
        plain = reparameterize_model(source)
        example, _ = next(iter(DataLoader(self.bundle.val, batch_size=16, collate_fn=collate_readable)))
        with torch.no_grad():
            deviation = OutputDeviation()
            deviation.update(source(example), plain(example))
        check_conversion(deviation.relative, f"the converted {source.name}")
        return prepare_qat(plain, example).to(device)

    def checkpoint_fields(self, model: nn.Module) -> dict[str, Any]:
        source = self.source
        return {"arch": getattr(model, "name", "qat"), "num_classes": self.bundle.num_classes, "qat": True,
                **self.bundle.card.metadata(),
                "source": {"arch": source.name, "spec": source.spec.to_dict(), "num_classes": source.num_classes,
                           "in_chans": source.in_chans}}

    def save(self, model: nn.Module, plain: nn.Module, summary: dict[str, Any], history: list[dict[str, Any]],
             output: Path) -> None:
        from repvgg.plots import plot_training_curves

        example, _ = next(iter(DataLoader(self.bundle.val, batch_size=2, collate_fn=collate_readable)))
        int8 = export_fake_quant_onnx(model, example, output / "int8.onnx", metadata=self.bundle.card.metadata())
        quantized, convs = quantized_conv_count(int8)
        if quantized == 0:
            int8.unlink()
            raise RunFailed("the QAT export holds no quantized convolution; nothing was written")
        # held to the accuracy guard against the float32 model it fine-tuned (its weights changed on purpose: the
        # top-1 drop counts, not the agreement)
        guard = Guard(min_agreement=0.0)
        judged = validation_guard(self.source, {"onnxruntime": onnx_runner(int8)}, batches(self.bundle.val, 64), guard,
                                  device=torch.device("cpu"))["onnxruntime"]
        if not judged.passed:
            int8.unlink()
            require_passing({"onnxruntime": judged}, guard, "the QAT INT8 model",
                            "int8.onnx was not written; the fine-tuned checkpoints were.")
        summary.update(top1_int8=judged.top1, top1_source=judged.top1_reference, int8_onnx=str(int8),
                       quantized_convs=quantized, convs=convs)
        plot_training_curves(history, output / "curves.png", title=f"QAT of {summary['model']} on {self.bundle.name}")
        logger.info("QAT: fake-quantized top-1 %.2f%%, INT8 (ONNX Runtime) top-1 %.2f%%, %d of %d convs quantized",
                    summary["val_top1"], summary["top1_int8"], quantized, convs)


def train_qat(config: TrainConfig) -> dict[str, Any]:
    """Run a QAT fine-tune described by ``config`` (``qat=True``, ``weights`` the trained model); the summary."""
    if not config.qat:
        config = config.updated(qat=True)
    return fit(QATTask(), config)

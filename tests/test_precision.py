"""Precision as a choice guarded by accuracy: BF16 only where the CPU computes it natively, INT8 only after it
passes the accuracy guard on validation images, and ``--amp`` on the CPU. The decisions are tested with the
CPU's capabilities faked, so no test needs BF16, VNNI or AMX hardware."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import repvgg
from repvgg.cli import main
from repvgg.measure import environment
from repvgg.measure.environment import CPUFeatures
from repvgg.perf.fast import optimize_for_inference, precisions_to_weigh
from repvgg.quant.guard import Guard, PrecisionRejected, validation_guard
from repvgg.training.data import build_datasets

AVX2 = CPUFeatures(avx2=True)
AMX = CPUFeatures(avx2=True, avx512=True, avx512_bf16=True, vnni=True, amx_bf16=True, amx_int8=True)


def _fake_cpu(monkeypatch: pytest.MonkeyPatch, features: CPUFeatures) -> None:
    monkeypatch.setattr(environment, "cpu_features", lambda: features)


# --- the decisions, with the capability faked -----------------------------------------------------------

def test_bf16_is_weighed_only_where_the_cpu_computes_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 3, 8, 8)
    _fake_cpu(monkeypatch, AVX2)
    assert precisions_to_weigh("auto", x, calibration=None) == ["float32"]
    assert precisions_to_weigh("auto", x, calibration=[x]) == ["float32", "int8"]
    _fake_cpu(monkeypatch, AMX)
    assert precisions_to_weigh("auto", x, calibration=[x]) == ["float32", "bfloat16", "int8"]
    assert precisions_to_weigh(torch.int8, x, calibration=[x]) == ["int8"]
    assert precisions_to_weigh(None, x, calibration=None) == ["float32"]  # the input's dtype, as before
    with pytest.raises(ValueError, match="needs calibration"):
        precisions_to_weigh("int8", x, calibration=None)
    with pytest.raises(ValueError, match="unsupported dtype"):
        precisions_to_weigh("int4", x, calibration=None)
    assert AMX.describe() == "AVX-512, AVX512-BF16, VNNI, AMX" and AVX2.describe() == "AVX2"


def test_openvino_bf16_needs_native_bf16(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from repvgg.perf.runtimes.base import BuildContext, Unsupported
    from repvgg.perf.runtimes.openvino import build_openvino

    _fake_cpu(monkeypatch, AVX2)
    monkeypatch.setattr("repvgg.perf.runtimes.openvino.cpu_features", environment.cpu_features)
    ctx = BuildContext(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), tmp_path, precision="bfloat16")
    with pytest.raises(Unsupported, match="no native BF16"):
        build_openvino(ctx)


class _Logits(nn.Module):
    """A 'model' whose logits are its input, flattened: predictions set by the test."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_the_validation_guard_holds_both_thresholds() -> None:
    logits = torch.eye(10).repeat(20, 1)  # 200 images, predicted class = label
    labels = torch.arange(10).repeat(20)
    batches = [(logits[i: i + 50], labels[i: i + 50]) for i in range(0, 200, 50)]

    def flipping(count: int):
        def run(x: torch.Tensor) -> torch.Tensor:
            y = x.clone()
            y[:count] = y[:count].roll(1, dims=1)  # the first `count` images of each batch predicted wrongly
            return y
        return run

    results = validation_guard(_Logits(), {"same": flipping(0), "one": flipping(1), "five": flipping(5)}, batches,
                               Guard(), device=torch.device("cpu"))
    assert results["same"].passed and results["same"].agreement == 1.0
    assert not results["one"].passed and results["one"].agreement == pytest.approx(0.98)  # 4 of 200 flipped
    relaxed = validation_guard(_Logits(), {"one": flipping(1)}, batches, Guard(min_agreement=0.98, max_top1_drop=2.0),
                               device=torch.device("cpu"))
    assert relaxed["one"].passed and relaxed["one"].top1 == pytest.approx(98.0)
    strict_drop = validation_guard(_Logits(), {"one": flipping(1)}, batches, Guard(min_agreement=0.9,
                                                                                  max_top1_drop=1.0),
                                   device=torch.device("cpu"))
    assert not strict_drop["one"].passed  # 2 points below float32
    with pytest.raises(ValueError):
        Guard(min_agreement=1.5)


# --- a trained model on the digits: INT8 chosen only when it holds ----------------------------------------

@pytest.fixture(scope="module")
def digits_int8(qa_digits_run: Path):
    """A QARepVGG trained on the digits at 24x24 (8 epochs of 11 steps), its calibration and validation batches."""
    model = repvgg.load_model(qa_digits_run / "deploy.safetensors")
    bundle = build_datasets(None, img_size=24, augment=False)
    calibration = [images for images, _ in DataLoader(bundle.train, batch_size=128)][:6]
    validation = list(DataLoader(bundle.val, batch_size=120))
    return model, calibration, validation


def _report(runner, name: str, precision: str):
    return next(r for r in runner.reports if (r.name, r.precision) == (name, precision))


def test_auto_accepts_int8_when_the_guard_holds_and_rejects_a_broken_calibration(digits_int8) -> None:
    model, calibration, validation = digits_int8
    example = validation[0][0][:8]
    # The guard's thresholds are settable: a 24x24 model of 1.7M parameters is allowed one more flip in 500.
    guard = dict(min_agreement=0.99, max_top1_drop=1.0)
    runner = optimize_for_inference(model, example, dtype="auto", calibration=calibration, validation=validation,
                                    candidates=["onnxruntime"], rounds=2, pause_s=0.0, **guard)
    int8 = _report(runner, "onnxruntime", "int8")
    assert int8.status == "ok" and int8.agreement >= 0.99 and int8.top1_reference - int8.top1 <= 1.0
    assert runner.dtype in (torch.float32, torch.int8)  # the faster of the two accepted, whichever it is here
    # dtype="int8" asked for and accepted: test_predict's Predictor(dtype="int8") runs that path end to end

    broken = [images * 0.02 for images in calibration]  # ranges 50x too narrow: activations saturate
    runner = optimize_for_inference(model, example, dtype="auto", calibration=broken, validation=validation,
                                    candidates=["onnxruntime"], rounds=2, pause_s=0.0)
    assert _report(runner, "onnxruntime", "int8").status == "inaccurate" and runner.dtype == torch.float32
    with pytest.raises(PrecisionRejected, match="fails the accuracy guard.*qarepvgg_"):  # asked for: refused
        optimize_for_inference(model, example, dtype="int8", calibration=broken, validation=validation,
                               candidates=["onnxruntime"])


def test_no_reduced_precision_is_chosen_without_validation(digits_int8, caplog: pytest.LogCaptureFixture) -> None:
    model, calibration, validation = digits_int8
    example = validation[0][0][:8]
    runner = optimize_for_inference(model, example, dtype="auto", calibration=calibration, candidates=["onnxruntime"],
                                    rounds=2, pause_s=0.0)
    assert runner.dtype == torch.float32 and {r.precision for r in runner.reports} == {"float32"}
    with pytest.raises(ValueError, match="held to the accuracy guard on labelled validation images"):
        optimize_for_inference(model, example, dtype="int8", calibration=calibration, candidates=["onnxruntime"])
    with caplog.at_level(logging.WARNING, logger="repvgg.perf.fast"):
        explicit = optimize_for_inference(model, example, dtype="int8", calibration=calibration,
                                          candidates=["onnxruntime"], check_accuracy=False)
    assert explicit.dtype == torch.int8 and "accuracy is not checked" in caplog.text  # the user's choice, said


def test_openvino_runs_the_same_int8_file(digits_int8) -> None:
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the deploy extra installs it)")
    model, calibration, validation = digits_int8
    example = validation[0][0][:8]
    runner = optimize_for_inference(model, example, dtype="int8", calibration=calibration, validation=validation,
                                    candidates=["openvino"], min_agreement=0.99, max_top1_drop=1.0)
    assert runner.backend == "openvino" and runner.dtype == torch.int8
    assert _report(runner, "openvino", "int8").agreement >= 0.99


# --- --amp on the CPU ---------------------------------------------------------------------------------------

def test_amp_trains_in_bf16_where_the_cpu_has_it_and_converts_exactly(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from repvgg.training import devices
    from repvgg.training.classification import ClassificationTask

    seen: list[tuple[bool, torch.dtype]] = []
    step = ClassificationTask.training_step

    def recording(self, net, model, batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return step(self, net, model, batch)

    monkeypatch.setattr(ClassificationTask, "training_step", recording)
    monkeypatch.setattr(devices, "cpu_features", lambda: AMX)  # the capability faked: bf16 is emulated here
    out = tmp_path / "run"
    # 89 training images: 1 step of 64 (bfloat16 is emulated on most test machines, hence slow)
    assert main(["train", "--model", "repvgg_tiny", "--epochs", "1", "--batch-size", "64", "--val-fraction", "0.95",
                 "--img-size", "16", "--device", "cpu", "--amp", "--no-inference-speed", "--output", str(out)]) == 0
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["relative_error"] <= 1e-4 and summary["val_top1"] == summary["val_top1_deploy"]


def test_amp_without_native_bf16_trains_in_float32_and_says_why(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from repvgg.training import devices

    monkeypatch.setattr(devices, "cpu_features", lambda: AVX2)
    with caplog.at_level(logging.INFO, logger="repvgg.training.devices"):
        assert devices.autocast_dtype(True, torch.device("cpu")) is None
    assert "no native BF16" in caplog.text and "AVX2" in caplog.text
    monkeypatch.setattr(devices, "cpu_features", lambda: AMX)
    assert devices.autocast_dtype(True, torch.device("cpu")) == torch.bfloat16
    assert devices.autocast_dtype(False, torch.device("cpu")) is None

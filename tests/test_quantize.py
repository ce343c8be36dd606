"""``repvgg quantize``: INT8 through ONNX Runtime, calibrated and measured on the digits; bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import repvgg
from repvgg.cli import main
from repvgg.io.checkpoint import load_checkpoint
from repvgg.quant.qdq import quantize_onnx, quantized_conv_count
from repvgg.io.export import export_onnx_file, onnxruntime_session


@pytest.fixture(scope="module")
def trained_qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qa") / "run"
    assert main(["train", "--model", "qarepvgg_tiny", "--epochs", "2", "--img-size", "16", "--device", "cpu",
                 "--output", str(out)]) == 0
    return out


def test_quantize_a_trained_run_writes_a_checked_int8_model(trained_qa: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "int8.onnx"
    # two epochs of a tiny model: the guard's limits raised by the user, as the refusal suggests
    assert main(["quantize", str(trained_qa / "best.pt"), str(out), "--calib-images", "64", "--min-agreement", "0.97",
                 "--max-top1-drop", "2", "--speed-rounds", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["guard"] == {"min_agreement": 0.97, "max_top1_drop": 2.0}
    for runtime, accuracy in report["accuracy"].items():  # every runtime timed was scored, and the one named holds
        assert set(accuracy) == {"top1_int8", "agreement", "passed"}, runtime
    assert report["accuracy"][report["runtime"]]["passed"] and report["agreement"] >= 0.97
    for key in ("top1_fp32", "top1_int8", "agreement", "int8_speedup"):
        assert key in report, key
    summary = json.loads((trained_qa / "summary.json").read_text())
    assert report["top1_fp32"] == pytest.approx(summary["val_top1_deploy"], abs=0.3)  # same model, ORT vs torch
    assert report["val_images"] == 360 and report["calib_images"] == 64 and report["converted"] is True
    assert abs(report["top1_int8"] - report["top1_fp32"]) <= 5 and report["agreement"] >= 0.9
    assert report["quantized_convs"] == report["convs"] > 0 and report["int8_speedup"] > 0
    quantized, convs = quantized_conv_count(out)
    assert quantized == convs == report["convs"]
    session = onnxruntime_session(out)  # runs in ONNX Runtime, dynamic batch
    logits = session.run(None, {session.get_inputs()[0].name: torch.randn(5, 3, 16, 16).numpy()})[0]
    assert logits.shape == (5, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]  # no staging files left
    # --runtime auto timed every runtime installed and named the one that ran INT8 fastest
    timed = set(report["speeds"])
    assert "onnxruntime" in timed and report["runtime"] in timed
    assert report["int8_images_per_s"] == max(speeds["int8"] for speeds in report["speeds"].values())


def test_quantize_times_the_runtime_asked_for(trained_qa: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the deploy extra installs it)")
    out = tmp_path / "int8.onnx"
    assert main(["quantize", str(trained_qa / "best.pt"), str(out), "--calib-images", "64", "--runtime",
                 "openvino", "--min-agreement", "0.97", "--max-top1-drop", "2", "--speed-rounds",
                 "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runtime"] == "openvino" and set(report["speeds"]) == {"openvino"}


@pytest.mark.parametrize("name, extra", [("fp32.onnx", []), ("fp32_speed.onnx", ["--speed-img-size", "24"]),
                                         ("int8_speed.onnx", ["--speed-img-size", "24"])])
def test_the_written_file_is_the_judged_int8_model_whatever_its_name(trained_qa: Path, tmp_path: Path, name: str,
                                                                      extra: list[str],
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The file written is the INT8 model the guard judged, and the speed-up is float32's file against INT8's, even
    when the output is named as one of the files the check makes on the way (``fp32.onnx``, ``fp32_speed.onnx``)."""
    from repvgg.quant import ptq

    import hashlib

    timed: list[tuple[int, int]] = []
    judged: set[str] = set()
    speeds, runner = ptq.runtime_speeds, ptq.onnx_runner

    def keep_judged(path: Path, *args: object) -> object:  # what the parity check and the guard run (before timing)
        if not timed:
            judged.add(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        return runner(path, *args)

    def count_timed(fp32: Path, int8: Path, *args: object, **kwargs: object) -> object:
        timed.append((quantized_conv_count(fp32)[0], quantized_conv_count(int8)[0]))
        return speeds(fp32, int8, *args, **kwargs)

    monkeypatch.setattr(ptq, "runtime_speeds", count_timed)
    monkeypatch.setattr(ptq, "onnx_runner", keep_judged)
    out = tmp_path / name
    assert main(["quantize", str(trained_qa / "best.pt"), str(out), "--calib-images", "64", "--runtime",
                 "onnxruntime", "--min-agreement", "0", "--max-top1-drop", "100", "--speed-rounds", "1", *extra]) == 0
    report = json.loads(capsys.readouterr().out)
    assert quantized_conv_count(out)[0] == report["quantized_convs"] > 0  # INT8, as reported
    assert hashlib.sha256(out.read_bytes()).hexdigest() in judged  # the very file the guard ran
    assert len(timed) == 1 and timed[0][0] == 0 and timed[0][1] > 0  # float32 timed against INT8
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_quantize_refuses_bad_input_and_writes_nothing(trained_qa: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "int8.onnx"
    weights = str(trained_qa / "deploy.safetensors")
    assert main(["quantize", weights, str(out), "--calib-images", "0"]) == 2
    assert "--calib-images: the value must be between 1 and" in capsys.readouterr().err
    assert main(["quantize", weights, str(tmp_path / "int8.txt")]) == 2
    out.write_text("mine")
    assert main(["quantize", weights, str(out)]) == 2 and out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]
    # a model of another class count than the data
    other = tmp_path / "other.safetensors"
    repvgg.save_weights(repvgg.create_model("qarepvgg_tiny", num_classes=7), other)
    assert main(["quantize", str(other), str(tmp_path / "x.onnx")]) == 2
    assert "classes" in capsys.readouterr().err


def test_quantize_fails_a_broken_model_with_nothing_written(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    model = repvgg.create_model("qarepvgg_tiny", num_classes=10)
    with torch.no_grad():
        model.stage2[0].rbr_dense.conv.weight.fill_(float("inf"))
    repvgg.save_weights(model, tmp_path / "broken.safetensors")
    assert main(["quantize", str(tmp_path / "broken.safetensors"), str(tmp_path / "x.onnx")]) == 1
    assert "NaN or infinite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors"]


def test_a_mis_shaped_calibration_set_is_refused(tmp_path: Path) -> None:
    plain = repvgg.reparameterize_model(repvgg.create_model("repvgg_tiny", num_classes=10))
    fp32 = export_onnx_file(plain, torch.randn(2, 3, 32, 32), tmp_path / "fp32.onnx")
    wrong = torch.utils.data.TensorDataset(torch.randn(4, 1, 32, 32), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        quantize_onnx(fp32, tmp_path / "int8.onnx", wrong)
    with pytest.raises(ValueError, match="calibration method"):
        quantize_onnx(fp32, tmp_path / "int8.onnx", wrong, method="magic")
    assert not (tmp_path / "int8.onnx").exists()


def test_quantization_aware_training_exports_a_qdq_int8_model(trained_qa: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "qat.onnx"
    assert main(["quantize", str(trained_qa / "best.pt"), str(out), "--qat-epochs", "1", "--device", "cpu",
                 "--speed-rounds", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"] == "qat" and report["qat_epochs"] == 1
    assert report["quantized_convs"] == report["convs"] > 0 and abs(report["top1_int8"] - report["top1_fp32"]) <= 5
    run = tmp_path / "qat-qat"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["top1_int8"] == pytest.approx(report["top1_int8"])  # the same INT8 file, measured twice
    config = load_checkpoint(run / "last.pt")["config"]
    assert config["qat"] is True and config["lr"] == pytest.approx(0.05 * 64 / 256 / 10) and config["model"] == \
        "qarepvgg_tiny"
    from repvgg.io.card import read_card

    digits = [str(i) for i in range(10)]  # the QAT run's own INT8 file and the one quantize wrote name the classes
    for int8 in (run / "int8.onnx", out):
        classes, preprocessing = read_card(int8, num_classes=10)
        assert classes == digits and preprocessing.img_size == 16 and preprocessing.grayscale
    session = onnxruntime_session(out)  # any input size: the QAT export has dynamic height and width
    assert session.run(None, {session.get_inputs()[0].name: torch.randn(2, 3, 48, 48).numpy()})[0].shape == (2, 10)
    # QAT needs a trained model to start from
    assert main(["train", "--qat", "--device", "cpu", "--output", str(tmp_path / "none")]) == 2

"""Bad runs are reported as bad, bad input gets a message, and nothing finished or given is lost.

Exit statuses: 1 for a run that failed (diverged, a conversion that does not match), 2 for bad input.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_bn, run_process
from PIL import Image

import repvgg
from repvgg.cli import main
from repvgg.errors import ConversionMismatch, TrainingDiverged
from repvgg.io.checkpoint import load_checkpoint, save_checkpoint
from repvgg.serialization import atomic_write
from repvgg.training import engine
from repvgg.training.classification import ClassificationTask, train
from repvgg.training.config import TrainConfig
from repvgg.training.data import scan_class_folders
from repvgg.training.images import load_rgb

TINY = ["--model", "repvgg_tiny", "--device", "cpu", "--batch-size", "128", "--img-size", "16"]  # 11 steps per epoch


def _train(out: Path, *extra: str) -> int:
    return main(["train", *TINY, "--epochs", "1", "--output", str(out), *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _train(out) == 0
    return out


# --- diverged runs and non-finite outputs -------------------------------------------------------

def test_a_diverging_run_stops_with_exit_1_and_writes_no_model(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--lr", "900", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "Traceback" not in err
    assert not (out / "deploy.safetensors").exists() and not (out / "summary.json").exists()


def test_non_finite_validation_keeps_the_last_good_checkpoint(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    evaluate = ClassificationTask.evaluate
    calls = []

    def nan_after_the_first_epoch(self, model, loader):
        calls.append(1)
        row = evaluate(self, model, loader)
        return row if len(calls) == 1 else {**row, "val_loss": float("nan")}

    monkeypatch.setattr(ClassificationTask, "evaluate", nan_after_the_first_epoch)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="val_loss not finite.*last good checkpoint"):
        train(TrainConfig(model="repvgg_tiny", epochs=3, batch_size=128, img_size=16, device="cpu", output=str(out)))
    assert load_checkpoint(out / "last.pt")["epoch"] == 1  # epoch 2 was not saved
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (out / "deploy.safetensors").exists()


@pytest.mark.parametrize("stop_after_steps", [3, None], ids=["stopped", "epoch-end"])
def test_infinite_statistics_under_a_finite_loss_are_never_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  stop_after_steps: int | None) -> None:
    """A loss can stay finite while a BN statistic has overflowed: a stopped run, or an epoch's end, then writes no
    checkpoint that a resume would fail on at once."""
    step = ClassificationTask.training_step
    calls = []

    def overflowing(self, net, model, batch):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                model.stage1[0].rbr_dense.bn.running_var.fill_(float("inf"))
        return step(self, net, model, batch)

    monkeypatch.setattr(ClassificationTask, "training_step", overflowing)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"1 tensor\(s\) of the model \(e.g. stage1.0.rbr_dense.bn.running_var\) "
                                               "not finite.*no checkpoint had been written yet"):
        train(TrainConfig(model="repvgg_tiny", img_size=16, epochs=1, batch_size=128, device="cpu", output=str(out),
                          stop_after_steps=stop_after_steps, inference_speed=False))
    assert not (out / "last.pt").exists()


def test_eval_of_nan_weights_fails_instead_of_scoring(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = repvgg.create_model("repvgg_tiny", num_classes=10)
    with torch.no_grad():
        model.stage1[0].rbr_dense.conv.weight.fill_(float("nan"))
    repvgg.save_weights(model, tmp_path / "nan.safetensors")
    assert main(["eval", "--weights", str(tmp_path / "nan.safetensors"), "--device", "cpu"]) == 1
    assert "NaN or infinite" in capsys.readouterr().err


def test_output_deviation_never_calls_nan_identical() -> None:
    from repvgg.nn.convert import OutputDeviation

    deviation = OutputDeviation()
    reference = torch.ones(2, 3)
    deviation.update(reference, reference.clone())
    assert deviation.relative == 0 and deviation.max_abs_diff == 0
    deviation.update(reference, torch.full((2, 3), float("nan")))
    assert np.isnan(deviation.relative) and np.isnan(deviation.max_abs_diff)


# --- conversions that do not match are refused, with no file --------------------------------------

def _corrupting(convert):
    def corrupt(model, *args, **kwargs):
        plain = convert(model, *args, **kwargs)
        with torch.no_grad():
            next(p for n, p in plain.named_parameters() if "rbr_reparam.weight" in n).mul_(3.0)
        return plain
    return corrupt


def test_train_refuses_a_converted_model_that_does_not_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(engine, "reparameterize_model", _corrupting(engine.reparameterize_model))
    out = tmp_path / "run"
    assert _train(out) == 1
    assert "relative deviation" in capsys.readouterr().err
    assert not (out / "deploy.safetensors").exists() and not (out / "summary.json").exists()


def test_seg_train_refuses_a_converted_model_that_does_not_match(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "reparameterize_model", _corrupting(engine.reparameterize_model))
    out = tmp_path / "seg"
    code = main(["seg-train", "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--synthetic-train", "16",
                 "--synthetic-val", "4", "--synthetic-size", "32", "--head-channels", "8", "--aux-channels", "0",
                 "--baseline", "none", "--output", str(out)])
    assert code == 1
    assert not (out / "deploy.safetensors").exists() and not (out / "summary.json").exists()


def test_convert_refuses_a_mismatch_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from repvgg.io import loading

    source = tmp_path / "a.safetensors"
    repvgg.save_weights(randomize_bn(repvgg.create_model("repvgg_tiny", num_classes=10)), source)
    monkeypatch.setattr(loading, "reparameterize_model", _corrupting(loading.reparameterize_model))
    with pytest.raises(ConversionMismatch, match="relative deviation"):
        loading.convert_checkpoint(source, tmp_path / "b.safetensors", img_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_export_refuses_a_mismatch_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from repvgg.io import export

    model = randomize_bn(repvgg.create_model("repvgg_tiny", num_classes=10)).eval()
    original = export.export_onnx_file

    def export_another_model(m, example, path, **kwargs):
        return original(_corrupting(repvgg.reparameterize_model)(m), example, path, **kwargs)

    monkeypatch.setattr(export, "export_onnx_file", export_another_model)
    with pytest.raises(ConversionMismatch):
        export.export_onnx(model, tmp_path / "m.onnx", img_size=32)
    assert list(tmp_path.iterdir()) == []


def test_export_leaves_the_callers_model_as_it_was(tmp_path: Path) -> None:
    model = repvgg.reparameterize_model(repvgg.create_model("repvgg_tiny", num_classes=10)).double().train()
    repvgg.export_onnx(model, tmp_path / "m.onnx", img_size=32)
    assert model.training and next(model.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="already exists"):
        repvgg.export_onnx(model, tmp_path / "m.onnx", img_size=32)


# --- nothing finished or given is overwritten ------------------------------------------------------

def test_a_finished_run_is_refused_unless_resumed_or_overwritten(finished_run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(finished_run)
    assert _train(finished_run) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert main(["train", "--model", "repvgg_nope", "--output", str(finished_run)]) == 2  # fails early
    assert main(["train", *TINY, "--model", "repvgg_a0", "--resume", str(finished_run), "--epochs", "2"]) == 2
    assert "was trained with other model" in capsys.readouterr().err
    assert _snapshot(finished_run) == before  # config.yaml and every other file untouched
    file = tmp_path / "a_file"
    file.write_text("mine")
    assert _train(file) == 2 and file.read_text() == "mine"


def test_overwrite_replaces_a_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(out) == 0
    (out / "best.pt").unlink()
    (out / "tensorboard").mkdir()  # as --tensorboard leaves it: its events would mix with the next run's
    (out / "tensorboard" / "events.out.tfevents.1.old").write_bytes(b"")
    old_summary = (out / "summary.json").read_text()
    assert _train(out, "--overwrite", "--seed", "1") == 0
    assert (out / "best.pt").is_file() and (out / "summary.json").read_text() != old_summary
    assert not (out / "tensorboard").exists()
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["overwrite"] is False


def test_resume_from_an_ema_best_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _train(out, "--ema-decay", "0.9") == 0
    assert load_checkpoint(out / "best.pt")["weights_from"] == "ema"
    assert main(["train", "--resume", str(out / "best.pt"), "--epochs", "2"]) == 2
    assert "resume from last.pt" in capsys.readouterr().err


def test_convert_never_writes_over_its_input_or_into_a_folder(finished_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "train.safetensors"
    repvgg.save_weights(repvgg.create_model("repvgg_tiny", num_classes=10), source)
    before = source.read_bytes()
    assert main(["convert", str(source), str(source)]) == 2
    assert "is the input file" in capsys.readouterr().err and source.read_bytes() == before
    folder = tmp_path / "out.safetensors"
    folder.mkdir()
    assert main(["convert", str(source), str(folder)]) == 2
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "out.safetensors", "train.safetensors"]
    assert main(["convert", str(source), str(tmp_path / "x.safetensors"), "--img-size", "0"]) == 2
    existing = tmp_path / "y.safetensors"
    existing.write_text("mine")
    assert main(["convert", str(source), str(existing), "--img-size", "32"]) == 2 and existing.read_text() == "mine"
    assert main(["convert", str(source), str(existing), "--img-size", "32", "--overwrite"]) == 0


def test_atomic_write_leaves_the_old_file_and_no_temporary_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, target)
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.load(target, weights_only=True) == {"epoch": 1}


def test_a_signal_during_the_final_evaluation_waits_for_the_files(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    compare = ClassificationTask.compare

    def signalled(self, model, plain, loader):
        os.kill(os.getpid(), signal.SIGTERM)  # a kill arriving while the run is finishing
        return compare(self, model, plain, loader)

    monkeypatch.setattr(ClassificationTask, "compare", signalled)
    escaped: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: escaped.append(1))  # the test survives a broken engine
    try:
        out = tmp_path / "run"
        summary = train(TrainConfig(model="repvgg_tiny", epochs=1, batch_size=128, img_size=16, device="cpu",
                                    inference_speed=False, output=str(out)))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not escaped, "the signal reached the default handler: the run would have died mid-write"
    assert "interrupted" not in summary
    assert (out / "deploy.safetensors").is_file() and (out / "summary.json").is_file()


# --- bad input: a message, exit status 2, no traceback ----------------------------------------------

def test_bad_config_files_and_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "tag.yaml": "epochs: !!python/object/apply:os.system ['echo hacked']\n",
        "syntax.yaml": "epochs: [1, 2\n",
        "type.yaml": "epochs: three\n",
        "list.json": "[1, 2]",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["train", "--config", str(tmp_path / name), "--print-config"]) == 2, name
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err and "hacked" not in err, name
    assert main(["train", "--config", str(tmp_path / "type.yaml"), "--print-config"]) == 2
    assert "epochs must be an integer" in capsys.readouterr().err
    # a flag overrides the bad value
    assert main(["train", "--config", str(tmp_path / "type.yaml"), "--epochs", "2", "--print-config"]) == 0
    assert "epochs: 2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="log_interval"):
        TrainConfig(log_interval=0)
    assert TrainConfig(resume="x").updated(resume=None).resume is None


def test_resume_from_a_checkpoint_without_rng_state(finished_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    payload = load_checkpoint(finished_run / "last.pt")
    del payload["rng"]
    run = tmp_path / "run"
    save_checkpoint(payload, run / "last.pt")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "not a resumable training checkpoint" in capsys.readouterr().err


def test_pickled_backbone_weights_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = tmp_path / "EVIL.pt"
    torch.save({"conv1.weight": Path("not a tensor")}, evil)  # needs code to unpickle
    code = main(["seg-train", "--backbone", "resnet50", "--backbone-weights", str(evil), "--device", "cpu",
                 "--output", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_zero_byte_segmentation_files_are_named(tmp_path: Path) -> None:
    from repvgg.segmentation.data import SegmentationFolder, load_label

    for split in ("train",):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
    (tmp_path / "images" / "train" / "a.png").write_bytes(b"")
    (tmp_path / "labels" / "train" / "a.png").write_bytes(b"")
    folder = SegmentationFolder(tmp_path, "train", 3)
    with pytest.raises(ValueError, match="a.png"):
        folder.verify()
    with pytest.raises(ValueError, match="cannot read label"):
        load_label(tmp_path / "labels" / "train" / "a.png", 3)


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100], [257 * 200, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert rgb.shape == (2, 2, 3) and rgb[..., 0].tolist() == [[0, 100], [200, 255]]
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        load_rgb(tmp_path / "empty.png")


def test_a_directory_link_loop_counts_each_image_once(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / c / "x.png")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    classes, samples = scan_class_folders(tmp_path)
    assert classes == ["a", "b"] and len(samples) == 2


@pytest.mark.timeout(900)  # above run_process's own limit, which ends the process
def test_huge_metadata_is_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    spec = repvgg.get_spec("repvgg_a0").to_dict() | {"width_multipliers": [8.0, 8.0]}
    bombs = {"repvgg.load_model": {"format": "repvgg", "arch": "repvgg_a0", "spec": json.dumps(spec),
                                   "deploy": "false"},  # 2.6 GiB of parameters
             "repvgg.segmentation.load_segmenter": {"format": "repvgg-segmenter", "deploy": "false", "segmenter":
                                                    json.dumps({"backbone": "repvgg_tiny", "num_classes": 3,
                                                                "head_channels": 2_000_000})},  # 69 GiB
             "repvgg.detection.load_detector": {"format": "repvgg-detector", "deploy": "false", "detector":
                                                json.dumps({"backbone": "repvgg_tiny", "num_classes": 1_000_000,
                                                            "fpn_channels": 4096})}}  # 137 GiB
    code = "import importlib\n"
    for i, (loader, metadata) in enumerate(bombs.items()):
        path = str(tmp_path / f"{i}.safetensors")
        save_file({"linear.weight": torch.zeros(2, 2)}, path, metadata=metadata)
        module, name = loader.rsplit(".", 1)
        code += (f"try:\n    getattr(importlib.import_module({module!r}), {name!r})({path!r})\n"
                 "except ValueError as err:\n    print('refused', err)\n")
    # VmHWM: this process's own peak resident memory (getrusage would report the parent's peak, kept
    # across fork and exec on Linux).
    code += "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))\n"
    result = run_process([sys.executable, "-c", code], timeout=600)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 4, result.stderr[-2000:]
    assert all(line.startswith("refused") for line in lines[:3]), lines
    peak_mib = int(lines[-1]) / 1024
    assert peak_mib < 1500


def test_features_only_weights_load_back(tmp_path: Path) -> None:
    backbone = randomize_bn(repvgg.create_model("repvgg_tiny", features_only=True, out_indices=(2, 4))).eval()
    repvgg.save_weights(backbone, tmp_path / "b.safetensors")
    loaded = repvgg.load_model(tmp_path / "b.safetensors").eval()
    assert loaded.features_only and loaded.out_indices == [2, 4]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), backbone(x)))


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import repvgg.cli.info as info

    def buggy(args):
        raise TypeError("a bug, not bad input")

    monkeypatch.setattr(info, "run", buggy)
    with pytest.raises(TypeError, match="a bug"):
        main(["info"])

"""The main job end to end on tiny budgets: digits and folder data, resume, signals, distributed, bad data."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_process, started_process, wait_for, write_image_folder
from PIL import Image

from repvgg.io.checkpoint import load_checkpoint
from repvgg.cli import main
from repvgg.training.config import TrainConfig
from repvgg.io.card import Preprocessing
from repvgg.training.data import (ToNormalizedTensor, build_datasets, check_image_folder, eval_transform,
                                   folder_transforms)
from repvgg.training.digits import digits_split
from repvgg.training.devices import training_memory_format
from repvgg.training.classification import train

TINY = ["--model", "repvgg_tiny", "--device", "cpu", "--batch-size", "128"]  # 11 steps per epoch


def test_digits_split_is_fixed_and_stratified() -> None:
    a = digits_split(0.2)
    b = digits_split(0.2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    x_train, y_train, x_val, y_val = a
    assert len(y_train) + len(y_val) == 1797 and len(y_val) == 360
    assert torch.bincount(y_val).min() >= 35  # every class present in proportion
    bundle = build_datasets(None, img_size=32)
    image, label = bundle.val[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


def test_train_cli_on_digits_writes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--output", str(out)]) == 0
    for name in ("summary.json", "metrics.jsonl", "last.pt", "best.pt", "deploy.safetensors", "config.yaml",
                 "curves.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "dataset", "epochs", "val_top1", "val_top1_deploy", "max_abs_diff", "train_images_per_s",
                "prediction_agreement", "params_train", "params_deploy", "infer_images_per_s_deploy"):
        assert key in summary, key
    assert summary["model"] == "repvgg_tiny" and summary["epochs"] == 2 and summary["val_images"] == 360
    assert summary["val_top1"] == summary["val_top1_deploy"]
    assert summary["prediction_agreement"] == 1.0
    assert summary["params_deploy"] < summary["params_train"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "val_loss", "val_top1", "lr", "epoch_time_s"} <= set(rows[0])
    assert rows[1]["lr"] < rows[0]["lr"] or rows[0]["lr"] == rows[1]["lr"] == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["val_top1"] == summary["val_top1"]
    # the saved files rebuild and evaluate from the file alone
    assert main(["eval", "--weights", str(out / "deploy.safetensors"), "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["form"] == "deploy" and evaluated["val_top1"] == pytest.approx(summary["val_top1_deploy"])


def test_loader_workers_end_with_the_run(tmp_path: Path) -> None:
    # Left to the garbage collector, persistent workers outlive the run and can each stall a later collection
    # for PyTorch's 5 s status timeout.
    import multiprocessing

    before = set(multiprocessing.active_children())
    train(TrainConfig(model="repvgg_tiny", epochs=1, batch_size=64, img_size=16, val_fraction=0.8, workers=2,
                      device="cpu", inference_speed=False, output=str(tmp_path / "run")))
    assert set(multiprocessing.active_children()) <= before


def test_train_on_an_image_folder(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data")
    # the optional recipe pieces run too: RandAugment, cutmix, channels_last, gradient checkpointing
    summary = train(TrainConfig(model="repvgg_tiny", data=str(root), img_size=32, epochs=1, batch_size=6,
                                device="cpu", output=str(tmp_path / "run"), auto_augment="rand-m9-mstd0.5",
                                cutmix=1.0, channels_last=True, grad_checkpointing=True))
    assert summary["num_classes"] == 3 and summary["val_images"] == 18
    assert summary["val_top1"] == summary["val_top1_deploy"]


def test_folder_transforms_are_timms_with_one_fused_tensor_step() -> None:
    from timm.data import create_transform
    from torchvision.transforms.functional import pil_to_tensor

    image = Image.fromarray(torch.randint(0, 256, (300, 250, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    train_tf, val_tf, preprocessing = folder_transforms(224, random_erasing=0.25)
    assert (preprocessing.img_size, preprocessing.resize, preprocessing.interpolation) == (224, 256, "bilinear")
    reference = create_transform((3, 224, 224), is_training=False, crop_pct=0.875, interpolation="bilinear")
    ours = val_tf(image)
    assert ours.shape == (3, 224, 224) and ours.is_contiguous()
    assert (ours - reference(image)).abs().max() < 1e-5
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names[-2:] == ["ToNormalizedTensor", "RandomErasing"] and "Normalize" not in names
    assert "ColorJitter" not in names  # the paper's recipe; timm's is one flag away
    assert "ColorJitter" in [type(t).__name__ for t in folder_transforms(224, color_jitter=0.4)[0].transforms]
    fused = ToNormalizedTensor((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))(image)
    assert torch.allclose(fused, (pil_to_tensor(image) / 255 - 0.5) / torch.tensor([0.25, 0.5, 1.0]).reshape(3, 1, 1),
                          atol=1e-6)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_the_evaluation_transform_gives_timms_pixels(interpolation: str) -> None:
    """The evaluation transform (written without torchvision, whose import is slow) crops the same pixels as timm's
    ``create_transform``: portrait, landscape, square, already at the resize, odd sizes, a long strip, grey."""
    from timm.data import create_transform

    generator = torch.Generator().manual_seed(1)
    for img_size, crop_pct, grayscale in ((224, 0.875, False), (32, 1.0, True), (37, 0.9, False), (17, 0.33, False)):
        p = Preprocessing(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation, grayscale=grayscale)
        reference = create_transform((3, img_size, img_size), is_training=False, crop_pct=crop_pct,
                                     interpolation=interpolation, crop_mode="center")
        steps = reference.transforms[:-2]  # resize, centre crop (then to tensor and normalise)
        ours = eval_transform(p)
        for height, width in ((300, 250), (250, 300), (p.resize, p.resize + 7), (p.resize, p.resize), (97, 61),
                              (3, 40), (1, 1), (513, 512)):
            image = Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator,
                                                  dtype=torch.uint8).numpy())
            expected = image.convert("L").convert("RGB") if grayscale else image
            for step in steps:
                expected = step(expected)
            got = ours(image)
            assert got.shape == (3, img_size, img_size), (height, width)
            assert torch.equal(got, ToNormalizedTensor(p.mean, p.std)(expected)), (img_size, height, width)
            assert (got - reference(image.convert("L").convert("RGB") if grayscale else image)).abs().max() < 1e-5


def _final_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


#: 359 training images: 5 steps of 64 per epoch.
RESUMED = dict(model="repvgg_tiny", img_size=16, epochs=2, batch_size=64, device="cpu", ema_decay=0.9, mixup=0.2,
               custom_l2=True, val_fraction=0.8, inference_speed=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The run the interrupted and resumed ones must reproduce (made once for every stop)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "full"
    return out, train(TrainConfig(**RESUMED, output=str(out)))


@pytest.mark.parametrize("stop_after", [3, 5])  # mid-epoch, and exactly at an epoch boundary
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path, stop_after: int,
                                                                uninterrupted: tuple[Path, dict]) -> None:
    common = RESUMED
    # mid-epoch, the interrupted run loads its data in two persistent worker processes: each sample's
    # augmentation has its own seed, so neither the workers nor the resume change what the model sees
    workers = 2 if stop_after == 3 else 0
    full_run, full = uninterrupted
    part = train(TrainConfig(**common, output=str(tmp_path / "part"), stop_after_steps=stop_after, workers=workers))
    assert part["interrupted"] is True
    state = load_checkpoint(tmp_path / "part" / "last.pt")
    assert state["global_step"] == stop_after
    resumed = train(TrainConfig(**common, output=str(tmp_path / "part"), resume=str(tmp_path / "part"),
                                workers=workers))
    a, b = _final_weights(full_run / "last.pt"), _final_weights(tmp_path / "part" / "last.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_top1"] == full["val_top1"]
    rows = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2


@pytest.mark.timeout(1500)
def test_sigterm_saves_a_resumable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "repvgg", "train", *TINY, "--img-size", "16", "--epochs", "200", "--output", str(out)]
    with started_process(cmd, tmp_path / "logs", env={**os.environ, "OMP_NUM_THREADS": "1"}) as proc:
        # Hang detectors only: the first epoch takes seconds here and minutes on the slowest machine.
        assert wait_for((out / "last.pt").exists, proc, timeout=900), (tmp_path / "logs" / "stderr.txt").read_text()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    err = (tmp_path / "logs" / "stderr.txt").read_text()
    assert proc.returncode == 130, err
    assert "--resume" in err
    state = load_checkpoint(out)
    assert 1 <= state["epoch"] < 200
    assert not (out / "summary.json").exists()


def test_config_file_and_flag_precedence(tmp_path: Path) -> None:
    from repvgg.cli import build_parser
    from repvgg.cli.train import resolve_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: repvgg_tiny\nepochs: 7\nbatch-size: 16\n")
    args = build_parser().parse_args(["train", "--config", str(cfg), "--epochs", "3", "--spec", "depths=[1,1,1,1,1]"])
    config = resolve_config(args)
    assert (config.model, config.epochs, config.batch_size) == ("repvgg_tiny", 3, 16)
    assert config.model_overrides == {"depths": [1, 1, 1, 1, 1]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochz": 3}))
    with pytest.raises(ValueError, match="epochz"):
        resolve_config(build_parser().parse_args(["train", "--config", str(bad)]))


@pytest.mark.parametrize(
    "layout, message",
    [("missing_val", "no 'val' folder"), ("no_classes", "no class sub-folders"), ("empty", "contains no images"),
     ("mismatch", "class folders differ")],
)
def test_bad_folder_layouts_are_explained(tmp_path: Path, layout: str, message: str) -> None:
    root = write_image_folder(tmp_path / "data", classes=2, per_class=2)
    if layout == "missing_val":
        for f in (root / "val").rglob("*.png"):
            f.unlink()
        for d in sorted((root / "val").glob("*")):
            d.rmdir()
        (root / "val").rmdir()
    elif layout == "no_classes":
        for f in (root / "train").rglob("*.png"):
            f.unlink()
        for d in (root / "train").glob("*"):
            d.rmdir()
    elif layout == "empty":
        for f in (root / "val").rglob("*.png"):
            f.unlink()
    elif layout == "mismatch":
        (root / "val" / "class_1").rename(root / "val" / "class_9")
    with pytest.raises(ValueError, match=message) as info:
        check_image_folder(root)
    assert "ROOT/train/<class_name>" in str(info.value)


def test_missing_data_folder_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *TINY, "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "r")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_corrupt_image_fails_naming_the_file_or_is_skipped(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", classes=2, per_class=4)
    bad = root / "train" / "class_0" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bundle = build_datasets(str(root), img_size=32)
    index = [i for i, (p, _) in enumerate(bundle.train.samples) if p.endswith("class_0/2.png")][0]
    with pytest.raises(ValueError, match="2.png"):
        bundle.train[index]
    skipping = build_datasets(str(root), img_size=32, bad_images="skip")
    assert skipping.train[index] is None and skipping.train.take_skipped() == 1  # skipped, not replaced
    with pytest.raises(ValueError, match="class_0/2.png"):
        train(TrainConfig(model="repvgg_tiny", data=str(root), img_size=32, epochs=1, batch_size=4, device="cpu",
                          output=str(tmp_path / "run")))


@pytest.mark.timeout(900)  # above run_process's own limit, which ends the process
def test_channels_last_training_on_cpu_avoids_the_avx2_hang(tmp_path: Path) -> None:
    # oneDNN's AVX2 kernel for the channels-last backward of Conv2d(3, 32, 1, stride=2) (the stem's 1x1
    # branch) can spin forever; ONEDNN_MAX_CPU_ISA=AVX2 selects that kernel on AVX-512 machines too.
    # The limit is a hang detector, far above the few seconds this takes.
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    cmd = [sys.executable, "-m", "repvgg", "train", "--model", "repvgg_tiny", "--device", "cpu", "--batch-size", "6",
           "--channels-last", "--epochs", "1", "--stop-after-steps", "4", "--output", str(tmp_path / "run")]
    result = run_process(cmd, timeout=600, env=env)
    assert result.returncode == 130, result.stderr[-3000:]  # stopped after its step budget, resumable
    assert "--channels-last applies to CUDA only" in result.stderr
    assert load_checkpoint(tmp_path / "run" / "last.pt")["global_step"] == 4


def test_training_memory_format_is_channels_last_only_on_cuda() -> None:
    assert training_memory_format(True, torch.device("cpu")) == torch.contiguous_format
    assert training_memory_format(False, torch.device("cuda")) == torch.contiguous_format
    assert training_memory_format(True, torch.device("cuda")) == torch.channels_last


def test_tensorboard_and_custom_trackers_receive_the_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Recorder:
        def __init__(self) -> None:
            self.steps, self.epochs, self.closed = [], [], False

        def log_step(self, step, scalars):
            self.steps.append((step, dict(scalars)))

        def log_epoch(self, epoch, row):
            self.epochs.append((epoch, dict(row)))

        def close(self):
            self.closed = True

    recorder = Recorder()
    out = tmp_path / "run"
    train(TrainConfig(model="repvgg_tiny", epochs=2, batch_size=64, img_size=16, device="cpu", output=str(out),
                      log_interval=5, tensorboard=True), trackers=[recorder])
    assert recorder.closed and [e for e, _ in recorder.epochs] == [1, 2]
    assert [s for s, _ in recorder.steps] == [5, 10, 15, 20, 27, 32, 37, 42]  # every 5th step of each epoch
    assert {"train_loss", "lr"} <= set(recorder.steps[0][1]) and "val_top1" in recorder.epochs[0][1]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/val_top1", "epoch/train_loss", "step/train_loss", "step/lr"} <= tags
    val = [e.value for e in events.Scalars("epoch/val_top1")]
    assert val == pytest.approx([row["val_top1"] for _, row in recorder.epochs])


def test_mixup_takes_batches_of_any_size(tmp_path: Path) -> None:
    """timm's Mixup takes even batches only: an odd batch or micro-batch (or one left short by a skipped image)
    trains, its last image unmixed with its label's smoothed target (it failed with an AssertionError traceback)."""
    from repvgg.training.classification import _loss_function

    config = TrainConfig(model="repvgg_tiny", mixup=0.2, label_smoothing=0.1)
    _, mix = _loss_function(config, 4)
    images, labels = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 1])
    last = images[4].clone()
    mixed, targets = mix(images.clone(), labels)
    assert mixed.shape == images.shape and torch.equal(mixed[4], last)
    assert torch.allclose(targets.sum(1), torch.ones(5)) and torch.allclose(targets[4], torch.tensor(
        [0.025, 0.925, 0.025, 0.025]))
    assert torch.equal(mix(images[:1], labels[:1])[0], images[:1])
    summary = train(TrainConfig(model="repvgg_tiny", img_size=16, epochs=1, batch_size=6, mixup=0.2,
                                accumulation_steps=2, device="cpu", stop_after_steps=2, inference_speed=False,
                                output=str(tmp_path / "run")))  # micro-batches of 3
    assert summary["interrupted"] is True


def test_a_resume_goes_on_with_the_loss_scale_of_float16_amp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 AMP's GradScaler state (its loss scale) is saved and restored: a resume started again at 65536 and
    skipped steps until it shrank back. Float16 AMP needs CUDA; here an enabled CPU GradScaler stands in."""
    import repvgg.training.engine as engine

    real = torch.amp.GradScaler
    monkeypatch.setattr(engine.torch.amp, "GradScaler", lambda device, enabled: real("cpu", enabled=True))
    config = dict(model="repvgg_tiny", img_size=16, epochs=1, batch_size=64, device="cpu", inference_speed=False,
                  output=str(tmp_path / "run"))
    assert train(TrainConfig(**config, stop_after_steps=2))["interrupted"] is True
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["scaler"]["scale"] == 65536.0
    state["scaler"]["scale"] = 512.0
    torch.save(state, tmp_path / "run" / "last.pt")
    train(TrainConfig(**config, stop_after_steps=1, resume=str(tmp_path / "run")))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["scaler"]["scale"] == 512.0

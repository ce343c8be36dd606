"""repvgg seg-train / seg-eval end to end on tiny budgets: outputs, conversion, resume, signals, folder data."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_process, started_process, wait_for
import torch
import yaml
from PIL import Image

from repvgg.io.checkpoint import load_checkpoint
from repvgg.cli import build_parser, main
from repvgg.segmentation.config import SegTrainConfig
from repvgg.segmentation.train import poly_learning_rate, segmenter_config, train_segmenter
from repvgg.segmentation.weights import load_segmenter

TINY = ["--synthetic-train", "16", "--synthetic-val", "8", "--synthetic-size", "32", "--batch-size", "8",
        "--head-channels", "16", "--aux-channels", "8", "--device", "cpu"]
TINY_CONFIG = dict(synthetic_train=16, synthetic_val=8, synthetic_size=32, batch_size=4, head_channels=16,
                   aux_channels=8, device="cpu", baseline="none")
OUTPUTS = ("summary.json", "metrics.jsonl", "last.pt", "best.pt", "deploy.safetensors", "config.yaml", "curves.png",
           "predictions.png")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One epoch of `repvgg seg-train` on 16 generated 32x32 scenes, with the ResNet-50 speed baseline."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("seg") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["seg-train", *TINY, "--epochs", "1", "--output", str(out)]) == 0
    return out, stdout.getvalue()


def test_seg_train_writes_every_output_and_the_converted_model_agrees(smoke_run: tuple[Path, str]) -> None:
    out, printed = smoke_run
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "dataset", "epochs", "val_miou", "val_miou_deploy", "pixel_accuracy", "per_class_iou",
                "max_abs_diff", "pixel_agreement", "speed", "params_train", "params_deploy", "train_images_per_s"):
        assert key in summary, key
    assert summary["model"] == "pspnet_repvgg_tiny" and summary["epochs"] == 1
    assert summary["dataset"] == "synthetic-shapes" and summary["val_images"] == 8
    assert list(summary["per_class_iou"]) == ["background", "circle", "square", "triangle", "cross"]
    assert summary["val_miou"] == summary["val_miou_deploy"]
    assert summary["per_class_iou"] == summary["per_class_iou_deploy"]
    assert summary["pixel_agreement"] == 1.0 and summary["max_abs_diff"] < 1e-4
    assert summary["params_deploy"] < summary["params_train"]
    assert [row["model"] for row in summary["speed"]][:2] == ["training-time", "converted"]
    assert summary["speed"][2]["model"].startswith("resnet50 PSPNet")
    assert all(row["images_per_s"] > 0 for row in summary["speed"])
    assert summary["speed_input"] == [8, 3, 32, 32]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert {"train_loss", "val_loss", "val_miou", "val_pixel_accuracy", "lr", "epoch_time_s"} <= set(rows[0])
    assert rows[0]["val_miou"] == pytest.approx(summary["val_miou"])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["synthetic_size"] == 32 and config["output"] == str(out)
    with Image.open(out / "predictions.png") as img:
        assert img.width > 300 and img.height > img.width  # one row of three panels per sample

    assert "| circle" in printed and "mean IoU" in printed and "images/s" in printed
    assert "resnet50 PSPNet" in printed


def test_deploy_file_rebuilds_the_converted_segmenter(smoke_run: tuple[Path, str]) -> None:
    out, _ = smoke_run
    deployed, meta = load_segmenter(out / "deploy.safetensors")
    trained, trained_meta = load_segmenter(out / "best.pt")
    assert deployed.deploy and deployed.aux_head is None and not trained.deploy
    assert meta["classes"] == trained_meta["classes"] == ["background", "circle", "square", "triangle", "cross"]
    assert meta["data"]["synthetic"]["image_size"] == 32
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), trained.eval()(x), rtol=1e-4, atol=1e-4)


def test_seg_eval_on_the_deploy_file_and_on_best_pt(smoke_run: tuple[Path, str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["seg-eval", "--weights", str(out / "deploy.safetensors"), "--device", "cpu", "--baseline", "none",
                 "--json-out", str(tmp_path / "deploy.json")]) == 0
    printed = capsys.readouterr().out
    deploy = json.loads((tmp_path / "deploy.json").read_text())
    assert deploy["form"] == "converted" and deploy["val_images"] == 8  # the training data, rebuilt from the file
    assert deploy["val_miou"] == pytest.approx(summary["val_miou_deploy"])
    assert [row["model"] for row in deploy["speed"]] == ["converted"]
    assert "| circle" in printed and "images/s" in printed

    assert main(["seg-eval", "--weights", str(out / "best.pt"), "--device", "cpu", "--no-speed",
                 "--json-out", str(tmp_path / "best.json")]) == 0
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["form"] == "training-time" and "speed" not in best
    assert best["val_miou"] == best["val_miou_deploy"] == pytest.approx(summary["val_miou"])
    assert best["pixel_agreement"] == 1.0
    capsys.readouterr()
    assert main(["seg-eval", "--weights", str(out / "best.pt"), "--device", "cpu", "--no-speed", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_miou"] == best["val_miou"]  # stdout is one JSON document


def test_seg_eval_refuses_files_it_cannot_rebuild(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "classifier.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, foreign)
    assert main(["seg-eval", "--weights", str(foreign), "--no-speed"]) == 2
    assert "not a segmenter file" in capsys.readouterr().err
    assert main(["seg-eval", "--weights", str(tmp_path / "missing.safetensors"), "--no-speed"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["seg-eval", "--weights", str(tmp_path), "--no-speed", "--baseline", "resnet101"]) == 2
    assert "--baseline resnet101 is timed next to the model" in capsys.readouterr().err  # not ignored
    assert main(["seg-eval", "--weights", str(tmp_path), "--no-speed"]) == 2  # a run folder, say
    assert f"{tmp_path} is a folder; name a segmenter weights file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The run the interrupted and resumed ones must reproduce (made once for every stop)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "full"
    return out, train_segmenter(SegTrainConfig(**dict(TINY_CONFIG, epochs=2), output=str(out)))


@pytest.mark.parametrize("stop_after", [3, 4])  # mid-epoch, and exactly at the epoch boundary
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path, stop_after: int,
                                                                uninterrupted: tuple[Path, dict]) -> None:
    common = dict(TINY_CONFIG, epochs=2)  # 4 steps per epoch
    full_run, full = uninterrupted
    part = train_segmenter(SegTrainConfig(**common, output=str(tmp_path / "part"), stop_after_steps=stop_after))
    assert part["interrupted"] is True
    assert load_checkpoint(tmp_path / "part" / "last.pt")["global_step"] == stop_after
    resumed = train_segmenter(SegTrainConfig(**common, output=str(tmp_path / "part"), resume=str(tmp_path / "part")))
    a = load_checkpoint(full_run / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_miou"] == full["val_miou"]
    assert len((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.timeout(1500)
def test_sigint_saves_a_resumable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "repvgg", "seg-train", *TINY, "--epochs", "500", "--baseline", "none",
           "--output", str(out)]
    with started_process(cmd, tmp_path / "logs", env={**os.environ, "OMP_NUM_THREADS": "1"}) as proc:
        # Hang detectors only, far above the time a slow machine needs.
        assert wait_for((out / "last.pt").exists, proc, timeout=900), (tmp_path / "logs" / "stderr.txt").read_text()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    err = (tmp_path / "logs" / "stderr.txt").read_text()
    assert proc.returncode == 130, err
    assert "seg-train --resume" in err
    state = load_checkpoint(out)
    assert 1 <= state["epoch"] < 500 and "segmenter" in state
    assert not (out / "summary.json").exists()


@pytest.mark.timeout(1500)  # above run_process's own limit, which ends the processes
def test_two_process_gloo_run(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # a free port
           "--log-dir", str(tmp_path / "torchrun"), "-m", "repvgg", "seg-train", *TINY, "--epochs", "1", "--baseline",
           "none", "--output", str(out)]
    result = run_process(cmd, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["val_images"] == 8  # the two evaluation shards add up exactly
    assert summary["val_miou"] == summary["val_miou_deploy"] and summary["pixel_agreement"] == 1.0


def _write_folder(root: Path) -> Path:
    """4 train and 2 val image/label pairs of 3 classes, with ignore pixels; one val image of another size."""
    rng = np.random.default_rng(0)
    sizes = {"train": [(32, 32)] * 4, "val": [(32, 32), (28, 36)]}
    for split, shapes in sizes.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            label = np.zeros((h, w), np.uint8)
            label[:, w // 2:] = 1
            label[h // 2:, : w // 3] = 2
            label[:2] = 255  # an unlabelled strip
            ids = label.astype(np.int64) % 8  # the ignore strip gets a colour of its own
            image = np.stack([ids * 90, 255 - ids * 70, ids * 40], -1)
            image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{split}_{i}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{split}_{i}.png")
    (root / "classes.txt").write_text("ground\nsky\ntree\n")
    return root


def test_folder_dataset_trains_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _write_folder(tmp_path / "data")
    summary = train_segmenter(SegTrainConfig(**dict(TINY_CONFIG, batch_size=2), data=str(root), crop_size=32,
                                             epochs=1, output=str(tmp_path / "run")))
    assert summary["dataset"] == "data" and summary["val_images"] == 2
    assert list(summary["per_class_iou"]) == ["ground", "sky", "tree"]
    assert summary["val_miou"] == summary["val_miou_deploy"] and summary["pixel_agreement"] == 1.0
    assert summary["speed_input"][0] == 1  # validation images of different sizes go one at a time
    assert main(["seg-eval", "--weights", str(tmp_path / "run" / "deploy.safetensors"), "--data", str(root),
                 "--device", "cpu", "--no-speed"]) == 0
    assert "| sky" in capsys.readouterr().out


def test_poly_learning_rate() -> None:
    assert poly_learning_rate(0, 100, 0.01) == 0.01
    assert poly_learning_rate(50, 100, 0.01) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_learning_rate(100, 100, 0.01) == 0.0
    assert poly_learning_rate(30, 100, 0.1, power=1.0) == pytest.approx(0.07)


def test_config_file_flags_and_errors(tmp_path: Path) -> None:
    from repvgg.cli.train import resolve_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: repvgg_tiny_b\nepochs: 7\nscale-range: [0.5, 1.0]\nfast: true\n")
    config = resolve_config(build_parser().parse_args(["seg-train", "--config", str(cfg), "--epochs", "3"]))
    assert (config.backbone, config.epochs, config.fast, config.scale_range) == ("repvgg_tiny_b", 3, True, (0.5, 1.0))
    assert segmenter_config(config, 5).dilated_layers == 5
    assert SegTrainConfig.from_dict(config.to_dict()) == config
    assert SegTrainConfig().resolved_lr == 0.05 and SegTrainConfig(data="x", batch_size=32).resolved_lr == 0.02
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochz": 3}))
    with pytest.raises(ValueError, match="epochz"):
        resolve_config(build_parser().parse_args(["seg-train", "--config", str(bad)]))
    with pytest.raises(ValueError, match="at least 2|>= 2|between 2 and"):
        SegTrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="fast means dilated_layers=5"):
        SegTrainConfig(fast=True, dilated_layers=3)
    with pytest.raises(ValueError, match="num_classes .* the generated scenes have their own 5 classes"):
        SegTrainConfig(num_classes=2)  # was ignored: a 5-class model, config.yaml saying 2
    assert SegTrainConfig(data="x", num_classes=2).num_classes == 2
    for value in (5, [[1], 2], {"a": 1}, "ab", [True, 2]):  # a TypeError traceback, or an unnamed field, before
        with pytest.raises(ValueError, match="scale_range must be 2 numbers or null"):
            SegTrainConfig(scale_range=value)  # type: ignore[arg-type]
    assert main(["seg-train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "r")]) == 2

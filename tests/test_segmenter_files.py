"""Segmenter files and the data they are scored on: every field of an edited file checked by type and range before
use (as detector files are), the data folder a file records never written into, and class names read by the one rule
and compared with the model's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import edited_model_file
from repvgg.cli import main
from repvgg.io.weights import read_safetensors
from repvgg.segmentation.pspnet import SegmenterConfig, build_segmenter
from repvgg.segmentation.weights import load_segmenter, save_segmenter

CLASSES = ["ground", "sky", "tree"]


def _folder(root: Path, names: str | bytes | None) -> Path:
    """One 32 x 32 image and label per split, classes 0-2, and ``classes.txt`` holding ``names`` (none if None)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / split / "a.png")
        label = np.zeros((32, 32), np.uint8)
        label[:, 16:], label[16:, :] = 1, 2
        Image.fromarray(label, "L").save(root / "labels" / split / "a.png")
    if names is not None:
        (root / "classes.txt").write_bytes(names if isinstance(names, bytes) else names.encode())
    return root


@pytest.fixture(scope="module")
def trained_on(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random-weights segmenter saved as seg-train saves its deploy file, recording the folder it names."""
    root = tmp_path_factory.mktemp("seg")
    data = _folder(root / "data", "\n".join(CLASSES) + "\n")
    model = build_segmenter(SegmenterConfig("repvgg_tiny", 3, head_channels=8, aux_channels=0)).eval()
    path = save_segmenter(model, root / "seg.safetensors", classes=CLASSES,
                          data={"data": str(data), "synthetic": None, "val_size": None})
    return path, data


def edited(source: Path, target: Path, **fields: Any) -> Path:
    return edited_model_file(source, target, "segmenter", **fields)


@pytest.mark.parametrize("fields, field", [
    ({"segmenter": "[1, 2]"}, "segmenter"), ({"segmenter": "5"}, "segmenter"), ({"backbone": "repvgg_nope"},
                                                                                 "segmenter"),
    ({"head_channels": -3}, "segmenter"), ({"bins": "6"}, "segmenter"), ({"deploy": '"yes"'}, "deploy"),
    ({"data": '"/somewhere"'}, "data"), ({"data": {"data": 7}}, "data"), ({"data": {"val_size": 0}}, "data"),
    ({"data": {"data": None, "synthetic": {"image_size": "64"}}}, "data"), ({"classes": CLASSES[:1]}, "classes"),
    ({"classes": ["a", "a", "b"]}, "classes"),
])
def test_an_edited_segmenter_file_is_refused_naming_the_field(trained_on: tuple[Path, Path], tmp_path: Path,
                                                              fields: dict, field: str) -> None:
    path = edited(trained_on[0], tmp_path / "edited.safetensors", **fields)
    with pytest.raises(ValueError, match=f"{path}: metadata field '{field}'"):
        load_segmenter(path)


def test_weights_that_are_no_state_dict_or_do_not_fit_are_refused(trained_on: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    _, metadata = read_safetensors(trained_on[0])
    config = json.loads(metadata["segmenter"])
    torch.save({"segmenter": config, "model": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a mapping of names to tensors"):
        load_segmenter(tmp_path / "list.pt")
    wider = edited(trained_on[0], tmp_path / "wider.safetensors", head_channels=16)
    with pytest.raises(ValueError, match=r"do not fit the segmenter configuration .*shape mismatch"):
        load_segmenter(wider)


def test_every_command_refuses_an_edited_segmenter_cleanly(trained_on: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = edited(trained_on[0], tmp_path / "edited.safetensors", data='"/somewhere"')
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 16)).save(image)
    for args in (["seg-eval", "--weights", str(path), "--no-speed"], ["predict", str(path), str(image)],
                 ["export", str(path), str(tmp_path / "o.onnx")], ["quantize", str(path), str(tmp_path / "q.onnx")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "metadata field 'data' must be null or an object" in err and "Traceback" not in err, err


def test_a_report_is_never_written_into_the_data_folder_the_file_records(trained_on: tuple[Path, Path],
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path, data = trained_on
    before = (data / "classes.txt").read_bytes()
    assert main(["seg-eval", "--weights", str(path), "--no-speed", "--json-out", str(data / "classes.txt"),
                 "--overwrite"]) == 2
    assert "which this command reads" in capsys.readouterr().err
    assert (data / "classes.txt").read_bytes() == before


@pytest.mark.parametrize("names, message", [
    ("tree\nsky\nground\n", r"segments \['ground', 'sky', 'tree'\] but the data's classes.txt names \['tree'"),
    ("ground\nground\ntree\n", "must hold distinct, non-empty class names"),
    ("ground\n\nsky\ntree\n", "must hold distinct, non-empty class names"),  # a blank line would shift the ids
    (b"ground\nsk\xe9\ntree\n", r"cannot read class names from .*classes.txt"),
])
def test_class_names_of_the_data_are_checked_and_must_be_the_models(trained_on: tuple[Path, Path], tmp_path: Path,
                                                                    names: str | bytes, message: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path / "data", names)
    assert main(["seg-eval", "--weights", str(trained_on[0]), "--data", str(data), "--no-speed"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_numbered_classes_are_named_by_the_other_side(trained_on: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Data without a classes.txt is scored under the file's names; a file without names under the data's."""
    assert main(["seg-eval", "--weights", str(trained_on[0]), "--data", str(_folder(tmp_path / "plain", None)),
                 "--no-speed", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["per_class_iou"]) == CLASSES
    nameless = edited(trained_on[0], tmp_path / "nameless.safetensors", classes="null")
    named = _folder(tmp_path / "named", "a\nb\nc\n")
    assert main(["seg-eval", "--weights", str(nameless), "--data", str(named), "--no-speed", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["per_class_iou"]) == ["a", "b", "c"]


def test_a_checkpoint_with_an_ema_loads_its_ema_weights(tmp_path: Path) -> None:
    """A seg-train (or det-train) checkpoint of a run with an EMA is its EMA's model, as the run evaluated and deployed
    it (``best.pt``, ``deploy.safetensors``); the raw weights stay for a resume."""
    config = SegmenterConfig("repvgg_tiny", 3, head_channels=8, aux_channels=0)
    raw, ema = build_segmenter(config).state_dict(), build_segmenter(config).state_dict()
    checkpoint = {"task": "seg-train", "segmenter": config.to_dict(), "model": raw, "ema": ema, "classes": CLASSES,
                  "data": None}
    torch.save(checkpoint, tmp_path / "last.pt")
    loaded = load_segmenter(tmp_path / "last.pt")[0].state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema) and not all(torch.equal(loaded[k], raw[k]) for k in raw)
    torch.save({**checkpoint, "ema": None}, tmp_path / "plain.pt")  # a run without an EMA: its model
    plain = load_segmenter(tmp_path / "plain.pt")[0].state_dict()
    assert all(torch.equal(plain[k], raw[k]) for k in raw)

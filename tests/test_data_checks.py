"""What a detection or config command reads is checked before any work: every COCO field COCOeval trusts, each image
file's size and completeness, config keys and YAML scalars, and the bounds of what a run would prepare."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from repvgg.cli.output import error_text
from repvgg.detection import DetTrainConfig, build_detection_data, build_validation_set, read_coco
from repvgg.detection.coco import check_coco
from repvgg.limits import MAX_GENERATED_SCENES, LimitExceeded, check_generated_scenes, parse_json
from repvgg.options import load_config_file
from repvgg.training.config import TrainConfig, resolve_run_config
from repvgg.training.images import whole_image_size
from repvgg.training.progress import LONG_PREPARATION, preparing

CATEGORIES = [{"id": 4, "name": "circle"}, {"id": 9, "name": "square"}]


def _coco(width: int = 24, height: int = 16, **annotation: Any) -> dict[str, Any]:
    return {"images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
            "categories": [dict(c) for c in CATEGORIES],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 4, "bbox": [2, 2, 8, 6], **annotation}]}


def _png(path: Path, width: int, height: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _folder(root: Path, *, splits: tuple[str, ...] = ("train", "val"), size: tuple[int, int] = (24, 16)) -> Path:
    """A COCO folder of two 24 x 16 images a split, each with one box."""
    for split in splits:
        images, annotations = [], []
        for i in range(2):
            name = f"{split}_{i}.png"
            _png(root / "images" / name, 24, 16)
            images.append({"id": i + 1, "file_name": name, "width": size[0], "height": size[1]})
            annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 9, "bbox": [1, 1, 10, 8]})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return root


# --- COCO fields -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("iscrowd", None, "iscrowd must be 0 or 1"), ("iscrowd", [1], "iscrowd must be 0 or 1"),
    ("iscrowd", "0", "iscrowd must be 0 or 1"), ("iscrowd", True, "iscrowd must be 0 or 1"),
    ("iscrowd", 2, "iscrowd must be 0 or 1"), ("area", None, "area must be a finite number from 0"),
    ("area", "big", "area must be"), ("area", -3.5, "area must be"), ("area", 10**400, "area must be"),
    ("area", 1e11, "area must be a finite number from 0 to the image's"),  # COCOeval would ignore the object
    ("bbox", [10**400, 1, 2, 2], "bbox must be four finite numbers"), ("bbox", [1, 1, 2, True], "bbox must be"),
    ("id", True, "no valid 'id'"), ("category_id", 2**64, "from 0 to"),
])
def test_each_field_cocoeval_reads_is_checked_by_type_and_range(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        check_coco(_coco(**{field: value}), "ann.json")
    assert str(err.value).startswith("ann.json")


def test_what_cocoeval_reads_is_what_training_uses() -> None:
    coco = check_coco(_coco(iscrowd=1, area=0), "ann.json")  # a crowd: not trained on, scored as a crowd
    assert coco.gt["annotations"][0]["iscrowd"] == 1 and sum(len(b) for b in coco.boxes) == 0
    plain = check_coco(_coco(), "ann.json").gt["annotations"][0]  # defaults: not a crowd, the box's area
    assert plain["iscrowd"] == 0 and plain["area"] == 48.0 and isinstance(plain["area"], float)


def test_a_huge_integer_in_a_file_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    data = _coco()
    path = tmp_path / "instances_val.json"
    # 400 digits, as JSON text: json reads it as an int, which float() would refuse with OverflowError
    path.write_text(json.dumps(data).replace('"bbox": [2, 2, 8, 6]', f'"bbox": [2, {"9" * 400}, 8, 6]'))
    with pytest.raises(ValueError, match="bbox must be four finite numbers") as err:
        read_coco(path)
    assert str(path) in str(err.value) and "annotation 7" in str(err.value)
    path.write_text(json.dumps(data).replace('"height": 16', f'"height": {"1" * 400}'))
    with pytest.raises(ValueError, match="images entry 1 has height 1111"):
        read_coco(path)


def test_category_names_are_distinct() -> None:
    data = _coco()
    data["categories"][1]["name"] = "circle"
    with pytest.raises(ValueError, match="categories 4 and 9 are both named 'circle'"):
        check_coco(data, "ann.json")


def test_a_byte_order_mark_is_read_and_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "instances_val.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_coco()).encode())  # as Windows tools write it
    assert read_coco(path).classes == ["circle", "square"]
    text = json.dumps(_coco())
    for twice in (text[:-1] + ', "annotations": []}',  # at the top: the second list would win
                  text.replace('"category_id": 4', '"category_id": 4, "category_id": 9')):
        path.write_text(twice)
        with pytest.raises(ValueError, match="gives the key '(annotations|category_id)' twice") as err:
            read_coco(path)
        assert str(path) in str(err.value)


# --- image files -----------------------------------------------------------------------------------------------------

def test_an_image_is_checked_whole_from_its_header_and_its_data(tmp_path: Path) -> None:
    for fmt in ("PNG", "JPEG", "BMP"):
        whole = _png(tmp_path / f"x.{fmt.lower()}", 24, 16, fmt)
        assert whole_image_size(tmp_path / f"x.{fmt.lower()}") == (24, 16)
        cut = tmp_path / f"cut.{fmt.lower()}"
        cut.write_bytes(whole[: len(whole) * 2 // 3])
        with pytest.raises(ValueError, match=r"cannot read val image .*cut\.(png|jpeg|bmp): .*(damaged|[Tt]runcated)"):
            whole_image_size(cut, what="val image")


@pytest.mark.parametrize("split", ["train", "val"])
def test_images_are_checked_before_any_work(tmp_path: Path, split: str) -> None:
    root = _folder(tmp_path / "wrong-size", size=(24, 20))  # each file is 24 x 16
    with pytest.raises(ValueError, match=r"train_0.png is 24x16 pixels, but .* says 24x20"):
        build_detection_data(root, image_size=32)
    root = _folder(tmp_path / "cut")
    image = root / "images" / f"{split}_1.png"
    image.write_bytes(image.read_bytes()[:-30])
    with pytest.raises(ValueError, match=f"{split}_1.png.*(damaged|truncated)"):
        build_detection_data(root, image_size=32)


def test_a_data_loading_process_error_reads_as_the_error_itself() -> None:
    from torch.utils.data._utils import ExceptionWrapper  # how PyTorch hands a worker's error to the main process

    for raised in (LimitExceeded("img.png is 9 x 9 pixels\nresize it"), FileNotFoundError("no such file: a.png")):
        try:
            raise raised
        except Exception:
            wrapped = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 1")
        with pytest.raises(type(raised)) as err:
            wrapped.reraise()
        assert "Traceback" in str(err.value) and error_text(err.value) == str(raised)
    assert error_text(ValueError("Caught it: a plain message")) == "Caught it: a plain message"


def test_evaluation_reads_only_the_validation_split(tmp_path: Path) -> None:
    from repvgg.detection import create_detector, save_detector
    from repvgg.detection.evaluate import evaluate_detector_file

    root = _folder(tmp_path / "coco", splits=("val",))  # no training annotations, no training images
    name, val = build_validation_set(root, image_size=32)
    assert name == "coco" and len(val) == 2 and val[0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        build_detection_data(root, image_size=32)
    model = create_detector("repvgg_tiny", 2, image_size=32, fpn_channels=64, head_convs=1, deploy=True)
    save_detector(model, tmp_path / "det.safetensors", classes=["circle", "square"],
                  data={"data": str(tmp_path / "moved"), "synthetic": None})
    result = evaluate_detector_file(tmp_path / "det.safetensors", data=str(root), batch_size=2)
    assert result["dataset"] == "coco" and result["val_images"] == 2 and result["form"] == "converted"


# --- config files ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, message", [
    ("c.yaml", "batch-size: 8\nbatch_size: 64\n", "gives batch_size twice, as 'batch-size' and 'batch_size'"),
    ("c.json", '{"batch_size": 8, "batch-size": 64}', "gives batch_size twice"),
    ("c.json", '{"epochs": 2, "epochs": 3}', "gives the key 'epochs' twice"),
    ("c.yaml", "1: 2\n", "the key 1 is not a name"),
    ("c.yaml", "model_overrides: {null: 2}\n", "the key None is not a name"),
])
def test_config_keys_are_names_given_once(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config_file(tmp_path / name)


@pytest.mark.parametrize("text, message", [
    ("epochs: 1:30", "epochs must be an integer, got '1:30'"), ("epochs: 0x10", "got '0x10'"),
    ("amp: yes", "amp must be true or false, got 'yes'"), ("amp: off", "got 'off'"),
    ("epochs: !!int 0o17", "could not read config file"),
])
def test_yaml_reads_numbers_and_switches_in_plain_forms_only(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "c.yaml").write_text(text + "\n")
    with pytest.raises(ValueError, match=message):
        resolve_run_config(TrainConfig, config_file=str(tmp_path / "c.yaml"))


def test_a_saved_config_reads_back_as_it_was(tmp_path: Path) -> None:
    config = TrainConfig.from_dict({"lr": 1e-5, "epochs": 10, "amp": True, "output": "0x10", "device": "cpu"})
    config.save(tmp_path / "config.yaml")
    assert load_config_file(tmp_path / "config.yaml") == config.to_dict()
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nepochs: 010\nwarmup_epochs: .5\n")
    assert load_config_file(tmp_path / "c.yaml") == {"lr": 0.001, "epochs": 10, "warmup_epochs": 0.5}


def test_a_duplicate_key_in_any_json_text_is_refused() -> None:
    with pytest.raises(ValueError, match="spec gives the key 'a' twice"):
        parse_json('{"b": {"a": 1, "a": 2}}', "spec")
    assert parse_json(b'\xef\xbb\xbf{"a": [1]}', "spec") == {"a": [1]}


# --- what a run prepares ---------------------------------------------------------------------------------------------

def test_the_batch_size_is_checked_before_the_learning_rate_it_derives() -> None:
    for config_cls in (DetTrainConfig, TrainConfig):
        with pytest.raises(ValueError, match="batch_size must be between") as err:
            config_cls.from_dict({"batch_size": 10**20})
        assert "lr" not in str(err.value)


def test_generated_scenes_are_bounded_before_they_are_rendered() -> None:
    with pytest.raises(LimitExceeded, match="synthetic_train 10,000,000: each generated scene is rendered"):
        DetTrainConfig.from_dict({"synthetic_train": 10**7})
    with pytest.raises(LimitExceeded, match="synthetic_val"):
        DetTrainConfig.from_dict({"synthetic_val": MAX_GENERATED_SCENES + 1})
    with pytest.raises(ValueError, match="synthetic_train set the generated scenes, which --data coco replaces"):
        DetTrainConfig.from_dict({"synthetic_train": 10**7, "data": "coco"})  # unused: refused, not bounded
    with pytest.raises(LimitExceeded, match=r"would hold about 585.9 MiB .* give at most 85") as err:
        check_generated_scenes(100_000, "--synthetic-train", memory=2**20)
    assert "1.0 MiB" in str(err.value)
    assert check_generated_scenes(MAX_GENERATED_SCENES, "n", memory=2**40) == MAX_GENERATED_SCENES


def test_a_long_preparation_is_shown(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="repvgg"):
        assert list(preparing(range(3), 3, "checking 3 images")) == [0, 1, 2]
        assert not caplog.records  # short: nothing to show
        assert sum(preparing(iter(range(LONG_PREPARATION)), LONG_PREPARATION, "generating scenes")) > 0
    assert [r.getMessage() for r in caplog.records] == [f"generating scenes: {LONG_PREPARATION} ..."]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="repvgg"):  # a process that does not log (rank > 0) shows nothing
        list(preparing(range(LONG_PREPARATION), LONG_PREPARATION, "generating scenes"))
    assert not caplog.records


@pytest.mark.parametrize("name", ["cat\rdog", "cat\u2028dog", "cat\x00"])
def test_category_names_follow_the_class_name_rule(name: str) -> None:
    from repvgg.detection.coco import _categories

    with pytest.raises(ValueError, match="category names"):
        _categories({"categories": [{"id": 1, "name": name}, {"id": 2, "name": "bird"}]}, "instances_train.json")
    assert _categories({"categories": [{"id": 2, "name": "bird"}, {"id": 1, "name": "cat"}]}, "x")[2] == ["cat", "bird"]

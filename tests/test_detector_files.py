"""Detector files and the flags that use them: every field of an edited file checked by type and range before use,
class names counted, flags that do not apply refused, images too thin to detect in skipped like unreadable ones, and
weights read by their content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import edited_model_file
from repvgg.cli import main
from repvgg.detection import create_detector, load_detector, save_detector
from repvgg.io.weights import read_safetensors, write_safetensors

CLASSES = ["circle", "square", "triangle", "cross"]
SCENES = {"data": None, "synthetic": {"image_size": 64, "num_train": 4, "num_val": 2}}


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weights FCOS on the smallest backbone, saved as det-train saves its deploy file."""
    path = tmp_path_factory.mktemp("det") / "det.safetensors"
    save_detector(create_detector("repvgg_tiny", 4, image_size=64, head_convs=0), path, classes=CLASSES, data=SCENES)
    return path


def edited(source: Path, target: Path, **fields: Any) -> Path:
    return edited_model_file(source, target, "detector", **fields)


@pytest.mark.parametrize("fields, field", [
    ({"detector": "[1]"}, "detector"), ({"backbone": 5}, "detector"), ({"out_indices": 5}, "detector"),
    ({"out_indices": [2, 3, True]}, "detector"), ({"backbone": "repvgg_nope"}, "detector"),
    ({"data": "[1]"}, "data"), ({"data": {"data": None, "synthetic": {"shapes": 3}}}, "data"),
    ({"data": {"data": None, "synthetic": {"image_size": "64"}}}, "data"), ({"data": {"data": 7}}, "data"),
    ({"classes": "5"}, "classes"), ({"classes": [1, 2, 3, 4]}, "classes"), ({"classes": CLASSES[:3]}, "classes"),
    ({"classes": '["a", "b"'}, "classes"),
])
def test_an_edited_detector_file_is_refused_naming_the_field(detector_file: Path, tmp_path: Path, fields: dict,
                                                             field: str) -> None:
    path = edited(detector_file, tmp_path / "edited.safetensors", **fields)
    with pytest.raises(ValueError, match=f"{path}: metadata field '{field}'"):
        load_detector(path)


def test_every_command_refuses_an_edited_detector_cleanly(detector_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = edited(detector_file, tmp_path / "edited.safetensors", classes=CLASSES[:2])
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 16)).save(image)
    for args in (["det-eval", "--weights", str(path)], ["predict", str(path), str(image)],
                 ["export", str(path), str(tmp_path / "o.onnx")], ["quantize", str(path), str(tmp_path / "q.onnx")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "metadata field 'classes' holds 2 class names but the detector has 4" in err and "Traceback" not in err


def tiny_onnx(path: Path, inputs: list[tuple[str, list[int]]], outputs: list[str], **metadata: str) -> Path:
    """An ONNX graph of Identity nodes (each output a copy of the first input), tagged with ``metadata``."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", [inputs[0][0]], [name]) for name in outputs], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


def test_an_onnx_file_tagged_as_a_detector_is_checked_before_it_runs(tmp_path: Path) -> None:
    """The graph must be a detector's (a classifier tagged task=detection is refused, not run), and its metadata pass
    the same check as a detector file's."""
    from repvgg.detection.predict import detection_artifact

    config = json.dumps(create_detector("repvgg_tiny", 4, image_size=64).config.to_dict())
    good = {"task": "detection", "detector": config, "classes": json.dumps(CLASSES)}
    detector_graph = ([("image", [3, "h", "w"])], ["boxes", "scores", "labels"])
    assert detection_artifact(tiny_onnx(tmp_path / "ok.onnx", *detector_graph, **good)) is not None
    assert detection_artifact(tiny_onnx(tmp_path / "cls.onnx", [("x", [1, 3, 8, 8])], ["logits"])) is None
    refused = {
        "classifier": ([("x", [1, 3, 8, 8])], ["logits"], good, "its graph is not one"),
        "json": (*detector_graph, good | {"classes": "[\"a\""}, "metadata field 'classes' is not valid JSON"),
        "count": (*detector_graph, good | {"classes": json.dumps(list("abcdefgh"))}, "holds 8 class names"),
        "config": (*detector_graph, good | {"detector": "{\"image_size\": \"64\"}"}, "metadata field 'detector'"),
    }
    for name, (inputs, outputs, metadata, message) in refused.items():
        path = tiny_onnx(tmp_path / f"{name}.onnx", inputs, outputs, **metadata)
        with pytest.raises(ValueError, match=message) as caught:
            detection_artifact(path)
        assert str(path) in str(caught.value)


@pytest.mark.parametrize("names", [list("abcdefghij"), ["one"]])
def test_predict_classes_must_name_each_class_of_the_detector(detector_file: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              names: list[str]) -> None:
    from repvgg.detection.predict import DetectionPredictor

    listed = tmp_path / "names.txt"
    listed.write_text("\n".join(names) + "\n")
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 16)).save(image)
    assert main(["predict", str(detector_file), str(image), "--classes", str(listed)]) == 2
    assert f"--classes {listed} holds {len(names)} class names but the detector has 4" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"holds {len(names)} class names"):
        DetectionPredictor(detector_file, classes=names)
    assert DetectionPredictor(detector_file, classes=list("abcd"), measure=False).classes == list("abcd")


@pytest.mark.parametrize("size", [(2000, 10), (3, 400)])
def test_an_image_too_thin_for_the_detector_is_a_bad_image(detector_file: Path, tmp_path: Path,
                                                           size: tuple[int, int]) -> None:
    """Resized to the detector's 64 px, a 2000 x 10 (or 3 x 400) image keeps no row (column): --bad-images skip skips
    it and goes on, fail stops on it, naming it."""
    from repvgg.detection.predict import DetectionPredictor

    thin, fine = tmp_path / "thin.png", tmp_path / "fine.png"
    Image.new("RGB", size).save(thin)
    Image.new("RGB", (size[0], 32) if size[0] > size[1] else (32, size[1])).save(fine)  # one row (column) kept
    predictor = DetectionPredictor(detector_file, measure=False)
    rows = list(predictor.iter_predict([str(thin), str(fine)], bad_images="skip"))
    assert "keeps no row or column" in (rows[0].error or "") and rows[1].error is None
    with pytest.raises(ValueError, match=f"image {thin}"):
        list(predictor.iter_predict([str(thin)]))


def test_a_truncated_weights_file_is_reported_by_every_command(detector_file: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(detector_file.read_bytes()[:200_000])
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 16)).save(image)
    for args in (["predict", str(cut), str(image)], ["serve", str(cut), "--port", "0"],
                 ["det-eval", "--weights", str(cut)], ["export", str(cut), str(tmp_path / "o.onnx")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert f"could not read {cut} as safetensors (truncated or corrupt?)" in err and "Traceback" not in err, err


@pytest.mark.parametrize("name", ["x.safetensors", "model.SAFETENSORS.safetensors"])
def test_a_pytorch_file_is_read_by_its_content_whatever_its_name(tmp_path: Path, name: str) -> None:
    from repvgg.io.safe_load import safe_load
    from repvgg.io.weights import read_checkpoint

    state = {"stage0.rbr_reparam.weight": torch.randn(4, 3, 3, 3), "linear.bias": torch.arange(3.0)}
    torch.save({"model": state, "arch": "repvgg_tiny"}, tmp_path / name)
    read, meta = read_checkpoint(tmp_path / name)
    assert torch.equal(read["linear.bias"], state["linear.bias"]) and meta["arch"] == "repvgg_tiny"
    assert torch.equal(safe_load(tmp_path / name, mmap=True)["model"]["linear.bias"], state["linear.bias"])


@pytest.mark.parametrize("command, flags, message", [
    ("export", ["--fp16"], "--fp16 applies to classifiers"),
    ("export", ["--img-size", "640", "--dynamic-hw"], "--dynamic-hw, --img-size apply to classifiers"),
    ("export", ["--name", "m"], "--name applies to a model repository"),
    ("quantize", ["--img-size", "64"], "--img-size applies to classifiers"),
    ("quantize", ["--runtime", "openvino", "--speed-batch", "2"], "--speed-batch, --runtime apply to classifiers"),
    ("quantize", ["--qat-epochs", "1"], "--qat-epochs applies to classifiers"),
    ("predict", ["--topk", "3"], "--topk applies to classifiers"),
    ("predict", ["--batch-size", "4", "--workers", "0"], "--batch-size, --workers apply to classifiers"),
])
def test_a_flag_that_does_not_apply_to_a_detector_is_refused(detector_file: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str], command: str,
                                                            flags: list[str], message: str) -> None:
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 16)).save(image)
    second = str(image) if command == "predict" else str(tmp_path / "out.onnx")
    assert main([command, str(detector_file), second, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_flags_of_detectors_and_repositories_are_refused_elsewhere(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The same rule the other way: a detector's flags given for a classifier, a repository's --img-size for an ONNX
    file taken as it is, and an empty --name."""
    onnx_file = tiny_onnx(tmp_path / "m.onnx", [("x", ["n", 3, 8, 8])], ["logits"])
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 16)).save(image)
    cases = {("predict", str(onnx_file), str(image), "--score-threshold", "0.5"): "--score-threshold applies to "
             "detectors", ("quantize", "repvgg_a0", str(tmp_path / "q.onnx"), "--max-ap-drop", "2"): "--max-ap-drop "
             "applies to detectors", ("export", str(onnx_file), str(tmp_path / "repo"), "--format", "triton",
                                      "--img-size", "64"): "is an ONNX file, taken as it is",
             ("export", str(onnx_file), str(tmp_path / "repo"), "--format", "ovms", "--name", ""): "model name ''"}
    for args, message in cases.items():
        assert main(list(args)) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "repo").exists()


def test_quantize_takes_the_detectors_data_from_data(detector_file: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--data names the COCO folder in place of the one the file records (here: none, the generated scenes); the
    calibration images, held at once, are bounded by memory without suggesting an input size the detector fixes."""
    import repvgg.detection.evaluate
    import repvgg.quant.detector
    from repvgg.limits import LimitExceeded, check_batch_memory

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "moved")):
        repvgg.quant.detector.quantize_detector(detector_file, tmp_path / "q.onnx", data=tmp_path / "moved")
    for module in (repvgg.quant.detector, repvgg.detection.evaluate):  # a machine of 128 KiB
        monkeypatch.setattr(module, "check_batch_memory", lambda *a, **k: check_batch_memory(*a, **k, memory=2**17))
    with pytest.raises(LimitExceeded, match="--calib-images 4 of 3x64x64") as caught:
        repvgg.quant.detector.quantize_detector(detector_file, tmp_path / "q.onnx")
    assert str(caught.value).endswith("lower --calib-images (at most 1 at this input size)")  # no other remedy
    with pytest.raises(LimitExceeded, match="--batch-size 16 of 3x64x64"):
        repvgg.detection.evaluate.evaluate_detector_file(detector_file)
    assert not (tmp_path / "q.onnx").exists()


def test_a_refused_int8_detector_is_given_remedies_that_apply_to_detectors() -> None:
    from repvgg.quant.guard import PrecisionRejected, require_ap

    with pytest.raises(PrecisionRejected, match="1.42 points lost") as caught:
        require_ap(0.5532, 0.5390, 1.0, "the INT8 detector")
    assert "--qat-epochs" not in str(caught.value) and "det-train --backbone qarepvgg_" in str(caught.value)
    assert "--max-ap-drop" in str(caught.value) and "--calib-images" in str(caught.value)


def test_a_detector_exports_after_its_data_folder_moved(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The export is checked against its source on generated scenes when the COCO folder the file records is gone:
    the check compares two forms of one detector, which any images do."""
    from repvgg.detection.export import export_detector

    weights = tmp_path / "det.safetensors"
    save_detector(create_detector("repvgg_tiny", 4, image_size=64, head_convs=0, score_threshold=0.0), weights,
                  classes=CLASSES, data={"data": str(tmp_path / "moved-away"), "synthetic": None})
    with caplog.at_level("INFO", logger="repvgg.detection.export"):
        report = export_detector(weights, tmp_path / "det.onnx", images=2)
    assert report.images_checked == 2 and report.detections_checked > 0 and (tmp_path / "det.onnx").is_file()
    assert "checking the export on generated scenes" in caplog.text


@pytest.mark.parametrize("size, parts, pieces", [(1, 1, [2]), (1, 2, [2]), (3, 2, [3]), (5, 2, [3, 2])])
def test_a_training_batch_left_short_by_skipped_images_still_trains(size: int, parts: int, pieces: list[int]) -> None:
    """--bad-images skip can leave a batch (or a micro-batch) with one image, which BatchNorm on a 1 x 1 map refuses
    in training: micro-batches keep at least two images, a lone image is repeated, and it still counts once."""
    from types import SimpleNamespace

    from repvgg.training.accumulate import accumulate_gradients, micro_batches
    from repvgg.training.task import StepOutput

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Flatten()).train()
    batch = (torch.randn(size, 3, 1, 1), torch.arange(size))
    assert [len(piece[1]) for piece in micro_batches(batch, parts, 2)] == pieces

    def step(net: torch.nn.Module, model: torch.nn.Module, piece: Any) -> StepOutput:
        loss = net(piece[0]).square().mean()
        return StepOutput(loss, len(piece[1]), torch.ones(1) * len(piece[1]))

    task = SimpleNamespace(training_step=step, min_local_batch=2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sums = accumulate_gradients(task, net, net, batch, parts=parts, scaler=scaler, amp_dtype=None, distributed=False)
    assert sums[1] == size and sums[2] == size and net[0].weight.grad is not None


def test_a_file_of_another_task_is_named_with_the_commands_that_take_it(detector_file: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from repvgg.io.weights import read_checkpoint

    with pytest.raises(ValueError, match="is a detector file .written by `repvgg det-train`.* det-eval, predict"):
        read_checkpoint(detector_file)  # what train --weights, eval and convert read
    for args in (["convert", str(detector_file), str(tmp_path / "c.safetensors")],
                 ["eval", "--weights", str(detector_file)]):
        assert main(args) == 2, args
        assert "is a detector file" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    required = ("model", "optimizer", "config", "epoch", "step_in_epoch", "global_step", "best_score", "history", "rng")
    torch.save({**{k: {} for k in required}, "task": "train", "config": {"model": "repvgg_a0"}}, run / "last.pt")
    assert main(["det-train", "--resume", str(run)]) == 2
    assert f"{run / 'last.pt'} is a `repvgg train` checkpoint; resume it with `repvgg train --resume`" in \
        capsys.readouterr().err


def _two_categories(root: Path) -> Path:
    """A COCO folder of one 64 x 64 image per split and two categories."""
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for split in ("train", "val"):
        Image.new("RGB", (64, 64), (90, 40, 10)).save(root / "images" / f"{split}.png")
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": [{"id": 1, "file_name": f"{split}.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 30, 30]}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return root


def test_data_of_another_category_count_is_refused_even_from_a_file_without_names(
        detector_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Scored against two categories, a four-class detector's class ids 2 and 3 belong to no category (scoring
    failed with an IndexError where the file recorded no names); det-eval and quantize's AP guard refuse it."""
    data = _two_categories(tmp_path / "coco")
    tensors, metadata = read_safetensors(detector_file)
    nameless = write_safetensors(tensors, tmp_path / "nameless.safetensors", metadata | {"classes": "null"})
    for args in (["det-eval", "--weights", str(nameless), "--data", str(data)],
                 ["quantize", str(nameless), str(tmp_path / "q.onnx"), "--data", str(data)],
                 ["det-eval", "--weights", str(detector_file), "--data", str(data)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "detects 4 classes but the data has 2 categories (['a', 'b'])" in err and "Traceback" not in err, err
    assert not (tmp_path / "q.onnx").exists()

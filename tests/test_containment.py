"""Nothing is read or written outside what the user named: a run's lock is never followed out of its folder, COCO
image names stay inside the data folder, a model repository is staged inside its folder and replaces only a model
folder, and one command's outputs never land in its inputs or on each other."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from repvgg.cli import main
from repvgg.detection import build_detection_data
from repvgg.serialization import make_folder
from repvgg.serve.repository import write_model_repository
from repvgg.training.run_folder import LOCK_FILE, LOCK_SIZE, lock_run_folder


# --- a run's lock -------------------------------------------------------------------------------------------------

def _refused_lock(folder: Path) -> str:
    with pytest.raises(ValueError) as err, lock_run_folder(folder):
        pass
    return str(err.value)


@pytest.mark.parametrize("dangling", [False, True])
def test_a_lock_that_is_a_link_is_refused_and_its_target_left_alone(tmp_path: Path, dangling: bool) -> None:
    victim, folder = tmp_path / "victim.txt", tmp_path / "d"
    folder.mkdir()
    if not dangling:
        victim.write_text("DATA\n")
    (folder / LOCK_FILE).symlink_to(victim)
    message = _refused_lock(folder)
    assert "symbolic link" in message and str(victim) in message and "DATA" not in message
    assert (folder / LOCK_FILE).is_symlink()  # the link is not removed either
    assert victim.read_text() == "DATA\n" if not dangling else not victim.exists()


def test_a_pipe_named_lock_is_refused_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    os.mkfifo(folder / LOCK_FILE)
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(_refused_lock(folder)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert result and "not a regular file" in result[0]


@pytest.mark.parametrize("kind", ["folder", "hard link", "large file"])
def test_a_lock_that_is_not_a_lock_file_is_refused_and_kept(tmp_path: Path, kind: str) -> None:
    folder, other = tmp_path / "d", tmp_path / "notes.txt"
    folder.mkdir()
    lock = folder / LOCK_FILE
    if kind == "folder":
        lock.mkdir()
    elif kind == "hard link":
        other.write_text("DATA\n")
        os.link(other, lock)
    else:
        lock.write_text("x" * (LOCK_SIZE + 1))
    message = _refused_lock(folder)
    assert str(lock) in message and "not" in message
    assert lock.is_dir() if kind == "folder" else lock.read_text() in ("DATA\n", "x" * (LOCK_SIZE + 1))
    if kind == "hard link":
        assert other.read_text() == "DATA\n"


def test_a_stale_lock_is_still_taken_over_and_a_long_command_fits(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / LOCK_FILE).write_text("pid 1 on elsewhere\n")
    monkeypatch.setattr("sys.argv", ["repvgg", "train", "x" * 1000])
    with lock_run_folder(folder):
        held = (folder / LOCK_FILE).read_bytes()
        assert held.startswith(f"pid {os.getpid()} ".encode()) and len(held) <= LOCK_SIZE
    assert not (folder / LOCK_FILE).exists()


# --- a dangling link where a folder is made -----------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0, 1])
def test_a_dangling_link_where_a_folder_goes_is_named_as_one(tmp_path: Path, depth: int) -> None:
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match="out is a dangling symbolic link .*gone"):
        make_folder(link / "sub" if depth else link)
    with pytest.raises(ValueError, match="dangling symbolic link"):
        with lock_run_folder(link):
            pass
    assert not (tmp_path / "gone").exists()


# --- COCO image names stay in the data folder ---------------------------------------------------------------------

def _coco_folder(root: Path, train_name: str = "train_0.png") -> Path:
    """A 16 px COCO folder: one train and one val image with a box each; the train image is named ``train_name``."""
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for split, name in (("train", train_name), ("val", "val_0.png")):
        Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "images" / f"{split}_0.png")
        coco = {"images": [{"id": 7, "file_name": name, "width": 16, "height": 16}],
                "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 8, 8],
                                 "area": 64}],
                "categories": [{"id": 1, "name": "square"}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


@pytest.mark.parametrize("name", ["ABSOLUTE", "../outside.png", "images/../../outside.png", "sub\\..\\..\\x.png",
                                  "LINK", "DANGLING", "LINKED_FOLDER"])
def test_an_image_name_that_leaves_the_data_folder_is_refused_before_it_is_read(tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside.png"
    outside.write_text("secret, not an image")  # were it opened, the message would be "cannot identify image"
    root = tmp_path / "data"
    if name == "ABSOLUTE":
        name = str(outside)
    elif name in ("LINK", "DANGLING", "LINKED_FOLDER"):
        kind, name = name, "images/sub/x.png" if name == "LINKED_FOLDER" else "images/link.png"
    _coco_folder(root, name)
    if name == "images/link.png":
        (root / name).symlink_to(outside if kind == "LINK" else tmp_path / "missing.png")
    elif name == "images/sub/x.png":
        (root / "images" / "sub").symlink_to(tmp_path)
        (tmp_path / "x.png").write_text("secret")
    with pytest.raises(ValueError, match=r"instances_train.json: image 7 \(") as err:
        build_detection_data(root, image_size=16)
    assert "secret" not in str(err.value) and "identify" not in str(err.value)
    if "link" in name:  # a link leading out says the same whether its target exists or not: no oracle
        assert "outside the data folder" in str(err.value)


def test_names_and_links_inside_the_data_folder_are_read(tmp_path: Path) -> None:
    root = _coco_folder(tmp_path / "data", "images/alias.png")
    (root / "images" / "alias.png").symlink_to(root / "images" / "train_0.png")
    bundle = build_detection_data(root, image_size=16)
    assert bundle.train[0][0].shape == (3, 16, 16) and bundle.val[0][2][0] == 0
    with pytest.raises(FileNotFoundError, match="image 7 .*no such file"):
        (root / "images" / "alias.png").unlink()
        build_detection_data(root, image_size=16)


# --- a model repository stays inside its folder -------------------------------------------------------------------

def _classifier_onnx(path: Path, batch: int | str = "N", pool: str = "GlobalAveragePool") -> Path:
    """A tiny ONNX classifier (global pooling, 3 classes) that is not repvgg's: no metadata."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node(pool, ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_link_at_the_models_place_is_refused_and_nothing_is_made_where_it_leads(tmp_path: Path,
                                                                                 overwrite: bool) -> None:
    model, repo = _classifier_onnx(tmp_path / "m.onnx"), tmp_path / "repo"
    repo.mkdir()
    (repo / "fp32").symlink_to(tmp_path / "elsewhere" / "deep" / "x")
    (repo / "int8").symlink_to(_model_folder(tmp_path / "other"))  # a valid model folder, reached by a link
    for name in ("fp32", "int8"):
        with pytest.raises(ValueError, match=f"{name} is a symbolic link"):
            write_model_repository(model, repo, kind="triton", name=name, overwrite=overwrite)
    assert not (tmp_path / "elsewhere").exists() and sorted(p.name for p in tmp_path.iterdir()) == \
        ["m.onnx", "other", "repo"] and sorted(p.name for p in (tmp_path / "other").iterdir()) == ["1"]
    assert sorted(p.name for p in repo.iterdir()) == ["fp32", "int8"]  # no staging folder left behind


def _model_folder(folder: Path) -> Path:
    (folder / "1").mkdir(parents=True)
    _classifier_onnx(folder / "1" / "model.onnx")
    return folder


@pytest.mark.parametrize("existing", ["file", "run config", "run folder", "data folder"])
def test_overwrite_replaces_only_a_model_folder(tmp_path: Path, existing: str) -> None:
    model, repo = _classifier_onnx(tmp_path / "m.onnx"), tmp_path / "repo"
    repo.mkdir()
    name = "config.yaml" if existing == "run config" else "fp32"
    if existing in ("file", "run config"):
        (repo / name).write_text("epochs: 3\n")
    else:
        (repo / name).mkdir()
        if existing == "data folder":
            (repo / name / "1").mkdir()
            (repo / name / "1" / "img.png").write_bytes(b"png")
        if existing == "run folder":
            _model_folder(repo / name)
            (repo / name / "config.yaml").write_text("epochs: 3\n")
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    with pytest.raises(ValueError, match="not a model folder.*replaces only a model folder"):
        write_model_repository(model, repo, kind="ovms", name=name, overwrite=True)
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before


def test_overwrite_replaces_a_model_folder_staged_inside_the_repository(tmp_path: Path) -> None:
    model, repo = _classifier_onnx(tmp_path / "m.onnx"), tmp_path / "repo"
    old = _model_folder(repo / "fp32")
    (old / "2").mkdir()
    (repo / "empty").mkdir()  # nothing to lose
    assert write_model_repository(model, repo, kind="ovms", name="empty", overwrite=True).files == ["1/model.onnx"]
    report = write_model_repository(model, repo, kind="triton", name="fp32", overwrite=True)
    assert report.files == ["1/model.onnx", "config.pbtxt", "labels.txt"] and not (old / "2").exists()
    assert sorted(p.name for p in repo.iterdir()) == ["empty", "fp32"]
    write_model_repository(model, repo, kind="triton", name="fp32", overwrite=True)  # a model folder it wrote, too


def test_a_foreign_onnx_that_cannot_go_into_a_repository_is_named_by_the_users_path(tmp_path: Path) -> None:
    fixed = _classifier_onnx(tmp_path / "fixed.onnx", batch=1)
    with pytest.raises(ValueError, match=r"^\S*fixed.onnx: expected .* dynamic batch") as err:
        write_model_repository(fixed, tmp_path / "repo", kind="ovms", name="fixed")
    assert str(fixed) in str(err.value) and ".fixed." not in str(err.value)  # not the staged copy's path
    unknown = _classifier_onnx(tmp_path / "unknown.onnx", pool="NoSuchPool")  # parses, but ONNX Runtime refuses it
    with pytest.raises(ValueError, match=r"^\S*unknown.onnx: ONNX Runtime cannot run it") as err:
        write_model_repository(unknown, tmp_path / "repo", kind="ovms", name="unknown")
    assert ".unknown." not in str(err.value) and not (tmp_path / "repo" / "unknown").exists()
    with pytest.raises(ValueError, match=r"dangling symbolic link .*gone"):
        (tmp_path / "dangling").symlink_to(tmp_path / "gone")
        write_model_repository(_classifier_onnx(tmp_path / "ok.onnx"), tmp_path / "dangling", kind="ovms")
    assert not (tmp_path / "gone").exists()


# --- one command's outputs: never into what it reads, nor onto each other -----------------------------------------

@pytest.fixture(scope="module")
def trained_on_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An untrained tiny detector file that records a COCO folder as its training data, and that folder."""
    from repvgg.detection import create_detector, save_detector

    root = tmp_path_factory.mktemp("det")
    data = _coco_folder(root / "data")
    model = create_detector("repvgg_tiny", 1, image_size=32, fpn_channels=64, head_convs=1)
    weights = save_detector(model, root / "det.safetensors", classes=["square"],
                            data={"data": str(data.resolve()), "synthetic": None})
    return weights, data


@pytest.mark.parametrize("where, command", [("images/x.onnx", "export"), ("annotations/deep/x.onnx", "export"),
                                            ("images/int8.onnx", "quantize")])
def test_a_detector_export_never_goes_into_the_data_it_was_trained_on(trained_on_folder: tuple[Path, Path],
                                                                      where: str, command: str) -> None:
    from repvgg.detection.export import export_detector
    from repvgg.quant.detector import quantize_detector

    weights, data = trained_on_folder
    with pytest.raises(ValueError, match=f"inside {data}, which this command reads"):
        (export_detector if command == "export" else quantize_detector)(weights, data / where, overwrite=True)
    assert not (data / where).exists() and not (data / "annotations" / "deep").exists()


@pytest.mark.parametrize("where", ["annotations/r.json", "images/r.json"])
def test_det_eval_json_out_never_goes_into_the_data_it_scores(trained_on_folder: tuple[Path, Path], where: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    weights, data = trained_on_folder
    assert main(["det-eval", "--weights", str(weights), "--json-out", str(data / where)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"--json-out {data / where} is inside {data}" in err
    assert not (data / where).exists()


@pytest.mark.parametrize("draw", ["IN", "IN/sub"])
def test_drawings_never_go_into_an_input_folder(trained_on_folder: tuple[Path, Path], tmp_path: Path, draw: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    weights, _ = trained_on_folder
    folder = tmp_path / "jpgin"  # drawings are PNGs: no name of theirs is an input's
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (16, 16), (10, 200, 10)).save(folder / name)
    draw_to = str(folder) + draw[2:]
    assert main(["predict", str(weights), str(folder), "--draw", draw_to]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"is inside {folder}, which this command reads" in err
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("csv", ["out/val_0.png", "LINK"])
def test_a_csv_that_would_replace_a_drawing_is_refused(trained_on_folder: tuple[Path, Path], tmp_path: Path,
                                                       csv: str, capsys: pytest.CaptureFixture[str]) -> None:
    weights, data = trained_on_folder
    (tmp_path / "out").mkdir()
    if csv == "LINK":  # another name for the same file
        csv = "table.csv"
        (tmp_path / csv).symlink_to(tmp_path / "out" / "train_0.png")
    args = ["predict", str(weights), str(data / "images"), "--draw", str(tmp_path / "out"), "--overwrite"]
    assert main([*args, "--csv", str(tmp_path / csv)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "another output of this command" in err
    assert list((tmp_path / "out").iterdir()) == []


# --- class names are one line each ----------------------------------------------------------------------------------

@pytest.mark.parametrize("char", ["\r", "\u2028", "\u2029", "\x0b", "\x0c", "\x85", "\x1c", "\x1e", "\x00", "\t",
                                  "\u202e", "\ufeff"])
def test_a_class_name_with_a_line_breaking_or_hidden_character_is_refused(char: str) -> None:
    from repvgg.io.card import check_class_names

    with pytest.raises(ValueError, match=rf"U\+{ord(char):04X}"):
        check_class_names(["cat", f"big{char}dog"], "the names", 2)


def test_class_names_in_any_script_still_pass(tmp_path: Path) -> None:
    from repvgg.io.card import check_class_names, read_class_names

    names = ["می\u200cخواهم", "café", "猫", "👨\u200d👩\u200d👧", "a b"]  # joiners are part of words
    assert check_class_names(names, "the names", 5) == names
    (tmp_path / "labels.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    assert read_class_names(tmp_path / "labels.txt") == names


def test_names_that_would_split_labels_txt_stop_a_repository_and_a_training_folder(tmp_path: Path) -> None:
    import onnx

    from repvgg.training.data import scan_image_folder

    model = onnx.load(str(_classifier_onnx(tmp_path / "m.onnx")))
    onnx.helper.set_model_props(model, {"classes": json.dumps(["a", "b\u2028c", "d"])})
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match=r"U\+2028"):
        write_model_repository(tmp_path / "m.onnx", tmp_path / "repo", kind="triton", name="m")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
    for split in ("train", "val"):
        for name in ("cat", "dog\rfox"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / name / "x.png")
    with pytest.raises(ValueError, match=r"class folders of .*U\+000D"):
        scan_image_folder(tmp_path / "data")

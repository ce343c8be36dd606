"""``repvgg predict`` and the model card: every artifact of a run remembers its class names and preprocessing,
predicts by name, and agrees with the others; bad metadata and bad images are clear errors naming the file."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import repvgg
from conftest import write_image_folder
from repvgg.cli import main
from repvgg.io.card import ModelCard, Preprocessing, read_card, read_onnx_metadata, write_onnx_metadata
from repvgg.io.weights import read_safetensors, write_safetensors

CLASSES = ["class_0", "class_1", "class_2"]


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run on a generated ImageFolder tree at 32x32 (accurate: the classes differ in brightness), and its ONNX
    FP32, FP16 and INT8 files."""
    root = tmp_path_factory.mktemp("predict")
    data = write_image_folder(root / "data", classes=3, per_class=8, size=40)
    out = root / "run"
    # the quantization-friendly block, so that INT8 keeps FP32's predictions (plain RepVGG's fused kernels do not)
    assert main(["train", "--data", str(data), "--model", "qarepvgg_tiny", "--epochs", "10", "--img-size", "32",
                 "--batch-size", "8", "--lr", "0.02", "--warmup-epochs", "0", "--no-inference-speed", "--device",
                 "cpu", "--output", str(out)]) == 0
    files = {"data": data, "run": out, "fp32": root / "fp32.onnx", "fp16": root / "fp16.onnx",
             "int8": root / "int8.onnx"}
    deploy = out / "deploy.safetensors"  # the run's final model, which `predict RUN` runs too
    assert main(["export", str(deploy), str(files["fp32"])]) == 0  # no --img-size: the trained 32
    assert main(["export", str(deploy), str(files["fp16"]), "--fp16"]) == 0
    with contextlib.redirect_stdout(io.StringIO()) as report:
        assert main(["quantize", str(deploy), str(files["int8"]), "--data", str(data), "--calib-images",
                     "24", "--runtime", "onnxruntime", "--speed-rounds", "3"]) == 0
    files["quantize_report"] = json.loads(report.getvalue())
    return files


def _predict(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main(["predict", *args, "--json"]) == 0
    return _json(capsys)


def test_every_artifact_of_a_run_predicts_by_name_and_they_agree(run: dict[str, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    val = run["data"] / "val"
    assert main(["eval", "--weights", str(run["run"] / "deploy.safetensors"), "--data", str(run["data"]),
                 "--json"]) == 0
    evaluated = _json(capsys)
    documents = {name: _predict(capsys, str(run[name] if name != "deploy" else run["run"]), str(val))
                 for name in ("deploy", "fp32", "int8")}
    # as many right, by folder name, as `eval` counted (and, for INT8, as `quantize` measured it)
    measured = {"deploy": evaluated["val_top1"], "fp32": evaluated["val_top1"],
                "int8": run["quantize_report"]["top1_int8"]}
    for name, document in documents.items():
        rows = document["predictions"]
        assert len(rows) == evaluated["val_images"] == run["quantize_report"]["val_images"] == 24, name
        folders = [Path(r["source"]).parent.name for r in rows]
        correct = sum(r["classes"][0] == folder for r, folder in zip(rows, folders))
        assert correct == round(measured[name] * 24 / 100), (name, correct, measured[name])
        assert document["preprocessing"]["img_size"] == 32 and not document["notes"]
    assert evaluated["val_top1"] == 100  # the run learned the task, so the names are checked on every image
    deploy, fp32, int8 = (documents[k]["predictions"] for k in ("deploy", "fp32", "int8"))
    # FP32 exactly: the same top-1, and every class's probability equal up to float rounding
    assert [r["classes"][0] for r in deploy] == [r["classes"][0] for r in fp32]

    def by_class(rows: list[dict]) -> list[list[float]]:
        return [[dict(zip(r["classes"], r["probabilities"]))[c] for c in CLASSES] for r in rows]

    assert np.allclose(by_class(deploy), by_class(fp32), atol=1e-6)
    agree = np.mean([a["classes"][0] == b["classes"][0] for a, b in zip(deploy, int8)])
    assert agree >= 0.99 and documents["int8"]["dtype"] == "int8"


def test_metadata_round_trips_through_every_artifact(run: dict[str, Path]) -> None:
    trained = ModelCard(tuple(CLASSES), Preprocessing(img_size=32))
    for name in ("deploy.safetensors", "best.pt", "last.pt"):
        classes, preprocessing = read_card(run["run"] / name, num_classes=3)
        assert classes == CLASSES and preprocessing == trained.preprocessing, name
    for name in ("fp32", "fp16", "int8"):
        assert read_card(run[name], num_classes=3) == (CLASSES, trained.preprocessing), name
    model = repvgg.load_model(run["run"] / "best.pt")
    assert model.card == trained and model.pretrained_cfg["input_size"] == (3, 32, 32)
    converted = run["run"].parent / "converted.safetensors"
    assert main(["convert", str(run["run"] / "best.pt"), str(converted)]) == 0
    assert repvgg.load_model(converted).card == trained


def test_bad_metadata_and_a_class_count_mismatch_are_clear_errors(run: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    tensors, metadata = read_safetensors(run["run"] / "deploy.safetensors")
    cases = {"not-json": ({"classes": "[class_0"}, "metadata field 'classes' is not valid JSON"),
             "count": ({"classes": json.dumps(["a", "b"])}, "names 2 classes but the model has 3 outputs"),
             "preprocessing": ({"preprocessing": json.dumps({"img_size": 32, "crop_pct": 3})},
                               "metadata field 'preprocessing' is not a valid preprocessing: crop_pct"),
             "unknown": ({"preprocessing": json.dumps({"size": 32})}, "unknown Preprocessing fields ['size']")}
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(tensors, path, {**metadata, **bad})
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
            repvgg.load_model(path)
        assert str(path) in str(err.value)
        assert main(["predict", str(path), str(run["data"] / "val")]) == 2
        assert message.split(":")[0] in capsys.readouterr().err
    onnx_file = tmp_path / "bad.onnx"
    shutil.copyfile(run["fp32"], onnx_file)
    write_onnx_metadata(onnx_file, {"classes": json.dumps(["only", "two"])})
    assert main(["predict", str(onnx_file), str(run["data"] / "val")]) == 2
    assert "names 2 classes but the model has 3 outputs" in capsys.readouterr().err


def test_files_without_metadata_get_numbered_classes_and_a_note(run: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    tensors, _ = read_safetensors(run["run"] / "deploy.safetensors")
    bare = tmp_path / "official-deploy.pth"
    torch.save(tensors, bare)  # an official-style file: a state dict, nothing else
    assert main(["predict", str(bare), str(run["data"] / "val" / "class_2"), "--topk", "1", "--json"]) == 0
    document = _json(capsys)
    assert {r["classes"][0] for r in document["predictions"]} <= {"0", "1", "2"}
    assert any("names no classes" in note for note in document["notes"]) and "names no classes" in caplog.text
    assert document["preprocessing"]["img_size"] == 224  # the official evaluation, said in a note
    names = tmp_path / "names.txt"
    names.write_text("dark\nmedium\nbright\n")
    document = _predict(capsys, str(bare), str(run["data"] / "val" / "class_2"), "--topk", "1", "--classes",
                        str(names))
    assert {r["classes"][0] for r in document["predictions"]} <= {"dark", "medium", "bright"}
    names.write_text("dark\nbright\n")
    assert main(["predict", str(bare), str(run["data"] / "val"), "--classes", str(names)]) == 2
    assert "holds 2 class names but the model has 3 outputs" in capsys.readouterr().err


def test_bad_inputs_give_the_documented_outcome_naming_the_file(run: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good = run["data"] / "val" / "class_1" / "0.png"
    shutil.copyfile(good, images / "a_good.png")
    buffer = io.BytesIO()
    Image.open(good).convert("RGB").save(buffer, format="JPEG")
    (images / "b_corrupt.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (images / "c_text.png").write_text("not an image\n")
    deep = np.full((40, 40), 60 * 257, dtype=np.uint16)  # 16-bit grey: scaled to 8 bits (60), not clipped white
    Image.fromarray(deep).save(images / "d_16bit.png")
    (tmp_path / "empty").mkdir()
    artifact = str(run["run"])
    # an unreadable image stops the run, naming it; nothing is written
    assert main(["predict", artifact, str(images), "--csv", str(tmp_path / "out.csv")]) == 2
    assert "b_corrupt.jpg" in capsys.readouterr().err and not (tmp_path / "out.csv").exists()
    # --bad-images skip reports each one and predicts the others, the 16-bit PNG included
    document = _predict(capsys, artifact, str(images), "--bad-images", "skip", "--topk", "1")
    rows = {Path(r["source"]).name: r for r in document["predictions"]}
    assert list(rows) == ["a_good.png", "b_corrupt.jpg", "c_text.png", "d_16bit.png"]
    assert rows["b_corrupt.jpg"]["error"] and "b_corrupt.jpg" in rows["b_corrupt.jpg"]["error"]
    assert rows["c_text.png"]["error"] and "c_text.png" in rows["c_text.png"]["error"]
    assert rows["a_good.png"]["classes"] == ["class_1"] and rows["d_16bit.png"]["classes"] == ["class_1"]
    assert document["images"] == 2 and document["skipped"] == 2
    for missing, message in ((tmp_path / "empty", "holds no images"), (tmp_path / "nope.png", "no such file"),
                             (tmp_path / "*.webp", "no image matches")):
        assert main(["predict", artifact, str(missing)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(missing) in err
    # a pattern gives the files of the folder extensions; another format Pillow reads is predicted when named
    Image.new("RGB", (8, 8)).save(tmp_path / "g.gif")
    assert main(["predict", artifact, str(tmp_path / "*.gif")]) == 2
    assert "name a file of another format Pillow reads, such as GIF" in capsys.readouterr().err
    assert main(["predict", artifact, str(tmp_path / "g.gif")]) == 0
    capsys.readouterr()


def test_inputs_files_folders_globs_and_stdin_in_a_stable_order(run: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    val = run["data"] / "val"
    single = val / "class_0" / "3.png"
    document = _predict(capsys, str(run["int8"]), str(single), str(val / "class_2" / "*.png"), str(val / "class_0"))
    sources = [r["source"] for r in document["predictions"]]
    assert sources[0] == str(single) and len(sources) == len(set(sources)) == 16  # named twice, read once
    assert sources[1:9] == sorted(sources[1:9]) and all("class_2" in s for s in sources[1:9])
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{single}\n{val / 'class_1'}\n"))
    document = _predict(capsys, str(run["fp32"]), "-")
    assert [r["source"] for r in document["predictions"]][:1] == [str(single)] and document["images"] == 9


def test_csv_output_follows_the_output_rule(run: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "predictions.csv"
    folder = str(run["data"] / "val" / "class_0")
    assert main(["predict", str(run["fp32"]), folder, "--topk", "2", "--csv", str(out)]) == 0
    header, first = out.read_text().splitlines()[:2]
    assert header == "path,class1,probability1,class2,probability2,error" and first.split(",")[1] == "class_0"
    assert main(["predict", str(run["fp32"]), folder, "--csv", str(out)]) == 2  # exists: --overwrite to replace
    assert "already exists" in capsys.readouterr().err
    assert main(["predict", str(run["fp32"]), folder, "--csv", str(run["run"].parent / "fp32.onnx"),
                 "--overwrite"]) == 2  # never the artifact it reads
    assert run["fp32"].read_bytes()[:2] != b"pa"


def test_the_python_api_gives_what_the_cli_gives(run: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder = run["data"] / "val" / "class_1"
    predictor = repvgg.Predictor(run["run"], runtime="eager")
    assert predictor.classes == tuple(CLASSES) and predictor.preprocessing.img_size == 32
    from_paths = predictor.predict([str(folder)], topk=2)
    cli = _predict(capsys, str(run["run"]), str(folder), "--topk", "2", "--runtime", "eager")["predictions"]
    assert [p.as_dict() for p in from_paths] == cli
    in_small_batches = repvgg.Predictor(run["run"], runtime="eager", batch_size=3, workers=2).predict([str(folder)],
                                                                                                    topk=2)
    assert [p.as_dict() for p in in_small_batches] == cli
    pil = [Image.open(folder / f"{i}.png") for i in range(3)]
    assert [p.classes for p in predictor.predict(pil, topk=2)] == [p.classes for p in from_paths[:3]]
    prepared = torch.stack([predictor.transform(image.convert("RGB")) for image in pil])
    assert [p.indices for p in predictor.predict(prepared, topk=2)] == [p.indices for p in from_paths[:3]]


def test_export_and_quantize_default_to_the_trained_size(run: dict[str, Path]) -> None:
    assert read_onnx_metadata(run["fp32"])  # written by the fixture without --img-size
    import onnx

    for name in ("fp32", "int8"):
        dims = onnx.load(str(run[name])).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims[1:]] == [3, 32, 32], name


def test_a_model_file_runs_in_int8_when_asked(run: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    val = run["data"] / "val"
    paths = sorted(str(p) for p in val.rglob("*.png"))
    fp32 = repvgg.Predictor(run["run"], runtime="onnxruntime").predict(paths, topk=1)
    # 24 images: calibrated and judged on all of them, said in the log; this small model is allowed 2 flips in 24
    int8 = repvgg.Predictor(run["run"], runtime="onnxruntime", dtype="int8", calibration=paths, min_agreement=0.9,
                            max_top1_drop=10)
    assert int8.dtype == "int8" and "judged on the 24 image(s) INT8 would calibrate on" in caplog.text
    agree = np.mean([a.classes == b.classes for a, b in zip(fp32, int8.predict(paths, topk=1))])
    assert agree >= 0.9
    with pytest.raises(ValueError, match="a reduced precision needs images to calibrate on and be judged on"):
        repvgg.Predictor(run["run"], runtime="onnxruntime", dtype="int8")


def test_a_hub_reference_predicts_with_the_card_of_its_file(run: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    from test_hub import _hub_cache

    cache = _hub_cache(tmp_path / "hub", "someone/digits-a0", {})
    snapshot = next((cache / "models--someone--digits-a0" / "snapshots").iterdir())
    shutil.copyfile(run["run"] / "deploy.safetensors", snapshot / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # a local hub cache, offline: nothing downloads
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    document = _predict(capsys, "hf-hub:someone/digits-a0", str(run["data"] / "val" / "class_2"), "--topk", "1")
    assert [r["classes"] for r in document["predictions"]] == [["class_2"]] * 8 and not document["notes"]


def test_predictors_build_from_one_exported_graph_and_check_it(run: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph a Ray driver exports once (`model_graph`) is what each actor's predictor builds its ONNX runtime
    from, without exporting again, and predicts as a predictor that exported its own; a graph of another model is
    refused by the check every runtime passes; none is made where no ONNX runtime would be built."""
    from repvgg.io import export
    from repvgg.predict.cluster import ClusterOptions, model_graph

    paths = sorted(str(p) for p in (run["data"] / "val").rglob("*.png"))
    own = repvgg.Predictor(run["run"], runtime="onnxruntime", batch_size=8).predict(paths, topk=3)
    graph = model_graph(run["run"], ClusterOptions(runtime="onnxruntime", batch_size=8))
    assert graph is not None and graph.startswith(b"\x08")  # an ONNX ModelProto (its ir_version field first)
    (tmp_path / "model.onnx").write_bytes(graph)

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_onnx_file", no_export)
    shared = repvgg.Predictor(run["run"], runtime="onnxruntime", batch_size=8, graph=tmp_path / "model.onnx")
    assert shared.backend == "onnxruntime"
    for a, b in zip(own, shared.predict(paths, topk=3)):
        assert a.indices == b.indices and np.allclose(a.probabilities, b.probabilities, atol=1e-6)
    other = repvgg.create_model("qarepvgg_tiny", num_classes=3).eval()  # untrained: other outputs
    with warnings.catch_warnings():  # the TorchScript exporter (quicker here) is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(other, (torch.randn(2, 3, 32, 32),), str(tmp_path / "other.onnx"), dynamo=False,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    with pytest.raises(ValueError, match="no candidate reproduces the eager model"):
        repvgg.Predictor(run["run"], runtime="onnxruntime", batch_size=8, graph=tmp_path / "other.onnx")
    assert model_graph(run["run"], ClusterOptions(runtime="eager")) is None
    assert model_graph(run["fp32"], ClusterOptions(runtime="onnxruntime")) is None  # an ONNX file is its own graph


def test_ray_refuses_a_device_its_actors_would_not_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--ray`` with ``--device cuda`` is refused before anything starts (its actors predict on the cluster's CPUs),
    not run on the CPU without a word."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    status = main(["predict", str(tmp_path / "run"), str(tmp_path / "a.png"), "--ray", "local", "--device", "cuda"])
    err = capsys.readouterr().err
    assert status == 2 and "--ray predicts on the cluster's CPUs, not on --device cuda" in err, err

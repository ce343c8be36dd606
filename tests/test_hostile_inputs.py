"""Hostile or careless input is bounded before anything is allocated and answered with a message, never a raw
traceback: YAML and JSON bombs, absurd batches, cards and images, out-of-range numbers, devices this package does
not run on, files that are not what their name says, fixed-batch ONNX files, a full disk quota."""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import repvgg
from conftest import run_process
from repvgg.cli import main
from repvgg.io.weights import read_safetensors, write_safetensors
from repvgg.limits import MAX_IMAGE_PIXELS, LimitExceeded, parse_json

TINY16 = ["--model", "repvgg_tiny", "--device", "cpu", "--img-size", "16", "--epochs", "1", "--no-inference-speed"]


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch repvgg_tiny run on the digits at 16x16 (its files carry class names and preprocessing)."""
    out = tmp_path_factory.mktemp("digits") / "run"
    assert main(["train", *TINY16, "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i in range(4):
        path = folder / f"{i}.png"
        Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy()).save(path)
        paths.append(path)
    return paths


# --- 12: configuration files are data, bounded before they are walked ------------------------------------------

def test_a_yaml_alias_bomb_is_refused_at_once_without_echoing_it(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bomb = tmp_path / "bomb.yaml"
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [{','.join(['*' + previous] * 9)}]")
    bomb.write_text("\n".join(levels) + "\n")  # ~500 bytes; expanded, 9^9 strings
    started = time.perf_counter()
    assert main(["train", "--config", str(bomb), "--output", str(tmp_path / "run")]) == 2
    assert time.perf_counter() - started < 60  # a hang detector: refused before anything expands
    err = _error(capsys)
    assert "aliases (*name) are not allowed" in err and len(err) < 1000
    assert not (tmp_path / "run").exists()


def test_deeply_nested_config_and_json_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("lr: " + "[" * 200 + "]" * 200 + "\n")
    assert main(["train", "--config", str(deep), "--print-config"]) == 2
    assert "nested more than 32 levels" in _error(capsys)
    deep_json = tmp_path / "deep.json"
    deep_json.write_text('{"lr": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(["train", "--config", str(deep_json), "--print-config"]) == 2
    assert "nests lists or objects more than 32 levels deep" in _error(capsys)
    with pytest.raises(LimitExceeded):
        parse_json('"[", ' * 10 + "[" * 40 + "]" * 40, "text")


# --- 13, 14, 15: batches, cards and images bounded by what they imply --------------------------------------

@pytest.mark.parametrize("argv", [
    ["bench", "--batch-size", "100000000", "--no-fast", "--no-peer", "--baselines", "none"],
    ["predict", "RUN", "PNG", "--batch-size", "1000000000"],
    ["eval", "--weights", "RUN/deploy.safetensors", "--batch-size", "1000000000", "--img-size", "4096"],
    ["quantize", "RUN/deploy.safetensors", "OUT.onnx", "--speed-batch", "100000000"],
], ids=["bench", "predict", "eval", "quantize-speed-batch"])
def test_a_batch_larger_than_the_machine_is_refused_before_allocating(argv: list[str], digits_run: Path,
                                                                      digit_pngs: list[Path],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = str(digits_run.parent / "q")
    argv = [a.replace("RUN", str(digits_run)).replace("PNG", str(digit_pngs[0])).replace("OUT", out) for a in argv]
    assert main(argv) == 2
    err = _error(capsys)
    assert "batch" in err and "would need about" in err and "this machine has" in err
    assert not (digits_run.parent / "q.onnx").exists()


def _with_preprocessing(run: Path, tmp_path: Path, **fields: object) -> Path:
    tensors, metadata = read_safetensors(run / "deploy.safetensors")
    preprocessing = {**json.loads(metadata["preprocessing"]), **fields}
    path = tmp_path / "card.safetensors"
    write_safetensors(tensors, path, {**metadata, "preprocessing": json.dumps(preprocessing)})
    return path


@pytest.mark.parametrize("fields, message", [
    ({"img_size": 4096, "crop_pct": 0.05}, "resizes every image to a short side of 81,920 pixels"),
    ({"img_size": 1}, "img_size must be between 8 and 4096, got 1"),
], ids=["resize", "img_size"])
def test_a_card_is_bounded_by_what_it_implies(fields: dict, message: str, digits_run: Path, digit_pngs: list[Path],
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = _with_preprocessing(digits_run, tmp_path, **fields)
    assert main(["predict", str(card), str(digit_pngs[0])]) == 2
    assert message in _error(capsys)
    assert main(["eval", "--weights", str(card)]) == 2
    assert message in _error(capsys)


def test_an_image_the_resize_would_blow_up_is_skipped_like_an_unreadable_one(digits_run: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    card = _with_preprocessing(digits_run, tmp_path, img_size=1024, crop_pct=0.125)  # a short side of 8192: allowed
    strip = tmp_path / "strip.png"
    Image.new("RGB", (4000, 1)).save(strip)  # resized to 8192 high, 32.8 million pixels wide
    assert main(["predict", str(card), str(strip), "--bad-images", "skip", "--batch-size", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["predictions"][0]
    assert "4000 x 1 image resized to a short side of 8192" in row["error"] and "megapixels" in row["error"]


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` 16-bit grey pixels but holds almost no data: its header alone
    says what decoding it would cost."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decoded_pixels_are_bounded_from_the_header(digits_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    huge = _png_header_only(tmp_path / "huge.png", 13_000, 13_000)
    assert 13_000 ** 2 > MAX_IMAGE_PIXELS and huge.stat().st_size < 1000
    assert main(["predict", str(digits_run), str(huge)]) == 2
    err = _error(capsys)
    assert "13,000 x 13,000 pixels" in err and "MAX_IMAGE_PIXELS" in err
    assert main(["predict", str(digits_run), str(huge), "--bad-images", "skip", "--json"]) == 0
    assert "megapixels" in json.loads(capsys.readouterr().out)["predictions"][0]["error"]


# --- 17 to 21, 25: numbers and devices refused before anything is written ----------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--lr", "1e300"], "lr must be a finite number > 0 and <= 1000"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--seed", "99999999999999999999999"], "must be between 0 and 4294967295"),
    (["--aux-weight", "nan"], "aux_weight must be a finite number"),
    (["--aux-weight", "-5"], "aux_weight must be a finite number >= 0 and <= 100"),
    (["--batch-size", "1"], "at least 2 image(s) per process"),
    (["--batch-size", "64", "--accumulation-steps", "64"], "micro-batches of at least 2"),
    (["--auto-augment", "orignal"], "--auto-augment 'orignal' is not a policy timm knows"),
    (["--device", "tpu"], "must be auto, cpu, cuda or cuda:N"),
    (["--device", "mps"], "must be auto, cpu, cuda or cuda:N"),
    (["--device", ""], "must be auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:-1"], "must be auto, cpu, cuda or cuda:N"),
    (["--workers", "100000"], "between 0 and 256"),
    (["--img-size", "4096"], "--batch-size 64 per micro-batch of 3x4096x4096 inputs would need about"),
    (["--spec", "base_widths=[16384,16384,16384,16384,16384]", "--spec", "width_multipliers=[1,1]"],
     "parameters and would need about"),
    (["--spec", "nonexistent=1"], "--spec: unknown argument(s) ['nonexistent']"),
    (["--spec", 'use_identity="no"'], "use_identity must be true or false, got 'no'"),
    (["--val-fraction", "0.0001"], "does not split the 1797 digits into two sets"),
], ids=["lr-huge", "lr-nan", "seed", "aux-nan", "aux-negative", "batch-1", "micro-batch-1", "auto-augment",
        "tpu", "mps", "empty-device", "cuda-minus-1", "workers", "img-size-memory", "spec-memory", "spec-unknown",
        "spec-type", "val-fraction"])
def test_train_refuses_bad_numbers_before_writing(flags: list[str], message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY16, *flags, "--output", str(out)]) == 2  # the last --device given wins
    assert message in _error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["eval", "--weights", "RUN/deploy.safetensors", "--workers", "100000"], "between 0 and 256"),
    (["predict", "RUN", "PNG", "--workers", "100000"], "between 0 and 256"),
    (["export", "repvgg_a0", "OUT.onnx", "--num-classes", "1000000000"], "num_classes must be between 0 and 1000000"),
    (["eval", "--weights", "RUN"], "is a folder; name a weights file"),
], ids=["eval-workers", "predict-workers", "num-classes", "run-folder-as-weights"])
def test_other_commands_bound_what_they_start(argv: list[str], message: str, digits_run: Path,
                                              digit_pngs: list[Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("RUN", str(digits_run)).replace("PNG", str(digit_pngs[0])).replace("OUT", str(tmp_path / "o"))
            for a in argv]
    assert main(argv) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize("argv", [
    ["eval", "--weights", "RUN/deploy.safetensors", "--device", "tpu"],
    ["predict", "RUN", "PNG", "--device", "cuda:-1"],
    ["bench", "--device", "mps", "--baselines", "none"],
    ["quantize", "RUN/best.pt", "OUT.onnx", "--qat-epochs", "1", "--device", "tpu"],
], ids=["eval", "predict", "bench", "quantize"])
def test_every_command_names_the_devices_it_runs_on(argv: list[str], digits_run: Path, digit_pngs: list[Path],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("RUN", str(digits_run)).replace("PNG", str(digit_pngs[0])).replace("OUT", str(tmp_path / "o"))
            for a in argv]
    assert main(argv) == 2
    assert "must be auto, cpu, cuda or cuda:N" in _error(capsys)


def test_the_digits_say_which_folder_options_they_ignore(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["train", *TINY16, "--auto-augment", "rand-m9-mstd0.5", "--output", str(tmp_path / "r"),
                 "--stop-after-steps", "1"]) == 130
    assert "--auto-augment: the embedded digits keep their own augmentation" in caplog.text


# --- 22: a write that hits the file-size limit is named ------------------------------------------------------

@pytest.mark.timeout(300)
def test_a_safetensors_write_over_the_file_size_limit_is_a_clear_failure(tmp_path: Path) -> None:
    source = tmp_path / "train.safetensors"
    repvgg.save_weights(repvgg.create_model("repvgg_tiny", num_classes=3), source)
    out = tmp_path / "deploy.safetensors"
    limit = 256 * 1024  # below the ~4.7 MB the converted model takes; the source was written before

    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from repvgg.cli import main; sys.exit(main(sys.argv[1:]))")
    result = run_process([sys.executable, "-c", code, "convert", str(source), str(out), "--img-size", "32"],
                         timeout=240)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and f"could not write {out}" in result.stderr
    assert "file-size limit" in result.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["train.safetensors"]
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] != limit  # the limit stayed in the child


@pytest.mark.timeout(300)
def test_running_out_of_memory_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    """Under an address-space limit (``ulimit -v``) the memory bound uses the limit, and an allocation that fails
    all the same (the bound is an estimate; here the check batch's, made to fail as the allocator does) ends with a
    message saying what to lower, and --json's error document."""
    source = tmp_path / "train.safetensors"
    repvgg.save_weights(repvgg.create_model("repvgg_tiny", num_classes=3), source)
    limit = 8 * 2**30  # what importing torch and OpenBLAS's buffers need, and more
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            "from repvgg.limits import machine_memory; assert machine_memory() <= " + str(limit) + "; "
            "import torch; torch.randn = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("
            "'DefaultCPUAllocator: can\\'t allocate memory: you tried to allocate 2147483648 bytes.'))" + "; "
            "from repvgg.cli import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "deploy.safetensors"
    result = run_process([sys.executable, "-c", code, "convert", str(source), str(out), "--img-size", "32",
                          "--json"], timeout=240)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "ran out of memory (2.0 GiB at once)" in result.stderr
    assert "Lower --batch-size or --img-size" in result.stderr and json.loads(result.stdout)["exit_status"] == 1
    assert not out.exists()


def test_a_huge_prepared_batch_is_predicted_in_slices(digits_run: Path) -> None:
    """A (N, 3, H, W) tensor is run batch_size images at a time, never listed image by image: ten million views of
    one image stream out without allocating them."""
    predictor = repvgg.Predictor(digits_run, batch_size=4, runtime="eager")
    size = predictor.preprocessing.img_size
    huge = torch.zeros(1, 3, size, size).expand(10**7, 3, size, size)
    stream = predictor.iter_predict(huge, topk=1)
    first = [next(stream) for _ in range(6)]
    assert [p.source for p in first] == [f"<input {i}>" for i in range(6)] and len({p.indices for p in first}) == 1
    with pytest.raises(ValueError, match="prepared tensor must be"):
        next(predictor.iter_predict(torch.zeros(2, 3, size + 1, size + 1)))


# --- 23, 24, 26, 27: what a file is, decided by its content -----------------------------------------------

def test_a_fixed_batch_onnx_file_predicts_any_number_of_images(digits_run: Path, digit_pngs: list[Path],
                                                               tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from repvgg.io.card import write_onnx_metadata

    model = repvgg.load_model(digits_run / "deploy.safetensors").eval()
    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(fixed), dynamo=False, input_names=["input"])
    write_onnx_metadata(fixed, model.card.metadata())  # torch.onnx.export's default: batch 1, fixed
    assert main(["predict", str(fixed), *map(str, digit_pngs), "--json", "--topk", "1"]) == 0
    onnx_rows = json.loads(capsys.readouterr().out)["predictions"]
    assert main(["predict", str(digits_run), *map(str, digit_pngs), "--json", "--topk", "1"]) == 0
    torch_rows = json.loads(capsys.readouterr().out)["predictions"]
    assert len(onnx_rows) == 4 and [r["classes"] for r in onnx_rows] == [r["classes"] for r in torch_rows]


@pytest.mark.parametrize("content, as_model, as_weights", [
    (b"", "is an empty file", "is an empty file"),
    (b"\x00\x01" + os.urandom(4096), "is not a file this package reads", "is not a file this package reads"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "is an image", "is an image"),
    (b"\x08\x07" + os.urandom(200), "does not parse as an ONNX model", "is an ONNX model"),
], ids=["empty", "random", "png", "garbage-onnx"])
def test_a_file_that_is_not_a_model_is_named_for_what_it_is(content: bytes, as_model: str, as_weights: str,
                                                            digit_pngs: list[Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("model.onnx", "MODEL.ONNX", "last.pt", "weights.safetensors"):  # the name plays no part
        path = tmp_path / name
        path.write_bytes(content)
        assert main(["predict", str(path), str(digit_pngs[0])]) == 2, name
        assert as_model in _error(capsys), name
        resume = [["train", "--resume", str(path)]] if name == "last.pt" else []
        for argv in (["eval", "--weights", str(path)], ["convert", str(path), str(tmp_path / "o.safetensors")],
                     ["export", str(path), str(tmp_path / "o.onnx")], *resume):
            assert main(argv) == 2, argv
            assert as_weights in _error(capsys), (name, argv)


def test_an_export_named_in_capitals_is_an_onnx_file(digits_run: Path, digit_pngs: list[Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    upper = tmp_path / "MODEL.ONNX"
    assert main(["export", str(digits_run / "deploy.safetensors"), str(upper)]) == 0
    capsys.readouterr()
    assert main(["predict", str(upper), str(digit_pngs[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runtime"] == "onnxruntime"
    renamed = tmp_path / "model.pt"  # an ONNX file under another name is still an ONNX file
    renamed.write_bytes(upper.read_bytes())
    assert main(["predict", str(renamed), str(digit_pngs[0]), "--json"]) == 0
    assert main(["export", str(digits_run / "deploy.safetensors"), str(tmp_path / "model.safetensors")]) == 2
    assert "must end in .onnx" in _error(capsys)


def test_deeply_nested_metadata_is_refused_by_every_reader(digits_run: Path, digit_pngs: list[Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    tensors, metadata = read_safetensors(digits_run / "deploy.safetensors")
    deep = "[" * 100_000 + "]" * 100_000
    cases = {"classes": deep, "preprocessing": deep, "spec": deep}
    for field, value in cases.items():
        path = tmp_path / f"{field}.safetensors"
        write_safetensors(tensors, path, {**metadata, field: value})
        for argv in (["predict", str(path), str(digit_pngs[0])], ["eval", "--weights", str(path)],
                     ["export", str(path), str(tmp_path / "o.onnx")],
                     ["quantize", str(path), str(tmp_path / "q.onnx")],
                     ["convert", str(path), str(tmp_path / "c.safetensors")]):
            assert main(argv) == 2, (field, argv)
            err = _error(capsys)
            assert f"metadata field '{field}'" in err and "levels deep" in err, (field, argv, err)


# --- 28, 29: the Python API checks its inputs ------------------------------------------------------------

def test_optimize_for_inference_checks_its_example_and_validation(digits_run: Path) -> None:
    from repvgg.quant.guard import Guard, validation_guard

    model = repvgg.load_model(digits_run / "deploy.safetensors").eval()
    example = torch.randn(4, 3, 16, 16)
    with pytest.raises(ValueError, match="example_input holds no images"):
        repvgg.optimize_for_inference(model, torch.randn(0, 3, 16, 16))
    for labels, message in [(torch.tensor([-1, 0, 1, 2]), "class indices"),
                            (torch.tensor([0, 1, 2, 50]), "from 0 to 9"),
                            (torch.tensor([0, 1, 2, 1000]), "from 0 to 9"),
                            (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer class indices"),
                            (torch.tensor([0, 1]), "4 images but 2 labels")]:
        with pytest.raises(ValueError, match=message):
            validation_guard(model, {"same": model}, [(example, labels)], Guard(), device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\(images, labels\) batches"):  # and through the fast path
        repvgg.optimize_for_inference(model, example, dtype="int8", calibration=[torch.randn(8, 3, 16, 16)],
                                      validation=[example], candidates=["onnxruntime"])


def test_a_predictor_takes_paths_and_images_together(digits_run: Path, digit_pngs: list[Path]) -> None:
    predictor = repvgg.Predictor(digits_run, measure=False)
    image = Image.open(digit_pngs[1]).convert("RGB")
    mixed = predictor.predict([str(digit_pngs[0]), image, digit_pngs[2]], topk=1)
    alone = predictor.predict([str(p) for p in digit_pngs[:3]], topk=1)
    assert [p.source for p in mixed] == [str(digit_pngs[0]), "<input 1>", str(digit_pngs[2])]
    assert [p.classes for p in mixed] == [p.classes for p in alone]
    with pytest.raises(TypeError, match="give image paths, PIL images or tensors"):
        predictor.predict([str(digit_pngs[0]), 3.5])


# --- what a second red team found: file headers, in-memory images, interrupts -----------------------------

def test_an_onnx_file_declaring_huge_or_empty_inputs_is_refused_before_running(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str],
                                                                           digit_pngs: list[Path]) -> None:
    import onnx
    from onnx import TensorProto, helper

    for side, message in ((50_000, "the input's height must be between 8 and 4096"),
                          (0, "the input's height must be between 8 and 4096")):
        graph = helper.make_graph(
            [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["output"])], "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])])
        path = tmp_path / f"side{side}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        assert main(["predict", str(path), str(digit_pngs[0])]) == 2
        assert message in _error(capsys)


def test_in_memory_images_are_prepared_like_files(digits_run: Path, tmp_path: Path) -> None:
    deep = (torch.arange(16 * 16, dtype=torch.int32).reshape(16, 16) * 250).numpy().astype("uint16")
    Image.fromarray(deep).save(tmp_path / "deep.png")  # a full-range 16-bit grey image
    predictor = repvgg.Predictor(digits_run, measure=False)
    from_file, in_memory = predictor.predict([str(tmp_path / "deep.png"), Image.open(tmp_path / "deep.png")], topk=3)
    assert from_file.classes == in_memory.classes
    assert from_file.probabilities == pytest.approx(in_memory.probabilities, abs=1e-6)
    with pytest.raises(ValueError, match="floating-point image"):
        predictor.predict([Image.fromarray(deep.astype("float32"))])
    with pytest.raises(ValueError, match="has no pixels"):
        predictor.predict([Image.new("RGB", (0, 0))])
    with pytest.raises(ValueError, match=r"a uint8 image tensor is \(1 or 3, H, W\)"):
        predictor.predict([torch.zeros(16, 16, 3, dtype=torch.uint8)])  # HWC
    with pytest.raises(ValueError, match="a uint8 image tensor is 20,000 x 20,000 pixels"):
        predictor.predict([torch.zeros(1, 1, 1, dtype=torch.uint8).expand(3, 20_000, 20_000)])  # no memory


def test_a_pipe_among_the_inputs_is_unreadable_not_waited_on(digits_run: Path, digit_pngs: list[Path],
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    (folder / "a.png").write_bytes(digit_pngs[0].read_bytes())
    assert main(["predict", str(digits_run), str(folder), "--bad-images", "skip", "--json"]) == 0
    rows = {Path(r["source"]).name: r["error"] for r in json.loads(capsys.readouterr().out)["predictions"]}
    assert rows["a.png"] is None and "not a regular file" in rows["pipe.png"]


@pytest.mark.parametrize("disposition", ["default", "ignored"])
def test_an_interrupt_the_exporter_swallows_still_stops_the_export(digits_run: Path, tmp_path: Path, disposition: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The SIGINT disposition is set here, not inherited: a background job of a non-interactive shell (``nohup make
    test &``) starts with SIGINT ignored, and an ignored SIGINT must stay ignored."""
    import signal

    from repvgg.io.export import export_onnx_file

    calls = []

    def interrupted_inside(*args, **kwargs):  # an exporter that catches the interrupt and fails another way
        calls.append(kwargs.get("dynamo"))
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        raise RuntimeError("torch._dynamo has no attribute 'exc'")

    monkeypatch.setattr(torch.onnx, "export", interrupted_inside)
    model = repvgg.load_model(digits_run / "deploy.safetensors").eval()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler if disposition == "default" else signal.SIG_IGN)
    try:
        if disposition == "default":
            with pytest.raises(KeyboardInterrupt):
                export_onnx_file(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")
            assert calls == [False]  # no fallback after the interrupt
        else:  # nothing stops the export: the fallback runs (and fails here, as the stand-in exporter always does)
            with pytest.raises(RuntimeError, match="torch._dynamo"):
                export_onnx_file(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")
            assert calls == [False, True]
        assert signal.getsignal(signal.SIGINT) is (signal.default_int_handler if disposition == "default"
                                                    else signal.SIG_IGN)  # the caller's disposition is restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not (tmp_path / "m.onnx").exists()


def test_reduced_precision_evidence_comes_from_every_part_of_the_inputs() -> None:
    from repvgg.predict.predictor import _spread

    spread = _spread(list(range(300)), 128)
    assert len(spread) == 128 and spread[0] == 0 and spread[-1] >= 297 and spread == sorted(set(spread))
    assert _spread([1, 2, 3], 128) == [1, 2, 3]


# --- the second red team's low findings: what stands where a file belongs, a key given twice, --csv - ---------

def test_a_folder_or_a_pipe_given_as_a_file_to_read_is_named_for_what_it_is(tmp_path: Path) -> None:
    from repvgg.io.card import read_class_names
    from repvgg.options import load_config_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for reader in (load_config_file, read_class_names):
        with pytest.raises(ValueError, match="is a folder; name a file"):
            reader(tmp_path)
        with pytest.raises(ValueError, match="not a regular file"):
            reader(fifo)  # refused from its type: never opened, so the read cannot block
        with pytest.raises(FileNotFoundError, match="not found"):
            reader(tmp_path / "missing.txt")


def test_a_config_key_given_twice_is_refused(tmp_path: Path) -> None:
    from repvgg.options import load_config_file

    config = tmp_path / "run.yaml"
    config.write_text("epochs: 3\nlr: 0.1\nepochs: 30\n")
    with pytest.raises(ValueError, match="the key 'epochs' is given twice"):
        load_config_file(config)
    config.write_text("epochs: 3\nspec:\n  depths: [1, 1]\n  widths: [1, 1]\n")  # the same key at two levels is fine
    assert load_config_file(config)["spec"]["depths"] == [1, 1]


def test_csv_dash_prints_the_csv_instead_of_writing_a_file_named_dash(digits_run: Path, digit_pngs: list[Path],
                                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(digits_run), *map(str, digit_pngs), "--csv", "-", "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "path,class1,probability1,class2,probability2,error" and len(lines) == 1 + len(digit_pngs)
    assert not (tmp_path / "-").exists()
    assert main(["predict", str(digits_run), str(digit_pngs[0]), "--csv", "-", "--json"]) == 2
    assert "both write to standard output" in capsys.readouterr().err


def test_an_eps_file_is_never_read_so_ghostscript_never_runs(digits_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Pillow reads EPS by running Ghostscript on it: an EPS file (named as an image, or uploaded) is an unreadable
    image for every reader, and Ghostscript is never called, whether or not it is installed; other formats Pillow
    reads (GIF) still are."""
    import io

    from PIL import EpsImagePlugin

    from repvgg.serve.state import _size
    from repvgg.training.images import load_rgb

    called: list[object] = []

    def ghostscript(*args: object, **kwargs: object) -> None:
        called.append(args)
        raise OSError("Ghostscript would run here")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    Image.new("RGB", (8, 8)).save(tmp_path / "shot.eps")
    Image.new("RGB", (8, 8)).save(tmp_path / "shot.gif")
    eps = (tmp_path / "shot.eps").read_bytes()
    with pytest.raises(ValueError, match="cannot read the upload"):
        load_rgb(eps, what="the upload")
    with pytest.raises(ValueError, match="shot.eps"):
        load_rgb(tmp_path / "shot.eps")
    assert _size(eps) is None and load_rgb(tmp_path / "shot.gif").size == (8, 8)
    status = main(["predict", str(digits_run), str(tmp_path / "shot.eps"), str(tmp_path / "shot.gif"),
                   "--bad-images", "skip", "--json"])
    document = json.loads(capsys.readouterr().out)
    assert status == 0 and [bool(p["error"]) for p in document["predictions"]] == [True, False]
    assert not called
    with Image.open(io.BytesIO(eps)) as image, pytest.raises(OSError, match="Ghostscript would run"):
        image.load()  # a control: Pillow alone reads the same file with Ghostscript
    assert called

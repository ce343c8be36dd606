"""What predict and quantize write and print: INT8 held to the accuracy guard (and calibrated only on images that
could be read), one row per file however it is spelled, spreadsheet-safe CSV written through links, class-name files
with a byte-order mark, and tables that stay one row per image whatever the names hold."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

import repvgg
from repvgg.cli import main
from repvgg.io.weights import read_safetensors, write_safetensors
from repvgg.quant.guard import REMEDIES

NO_GUARD = ["--min-agreement", "0", "--max-top1-drop", "100"]


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-epoch repvgg_tiny on the digits at 16x16 and a folder of its validation images as PNG files."""
    root = tmp_path_factory.mktemp("outputs")
    assert main(["train", "--model", "repvgg_tiny", "--device", "cpu", "--img-size", "16", "--epochs", "1",
                 "--no-inference-speed", "--output", str(root / "run")]) == 0
    images = root / "images"
    images.mkdir()
    from repvgg.training.digits import digits_split

    _, _, x_val, _ = digits_split()
    for i in range(12):
        Image.fromarray((x_val[i] * 255).to(torch.uint8).numpy(), "L").resize((16, 16)).save(images / f"{i:02d}.png")
    return {"root": root, "run": root / "run", "images": images}


def _predict(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main(["predict", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- 9: INT8 calibration skips what it cannot read; inputs are counted once --------------------------------

def test_int8_calibration_leaves_out_unreadable_images(digits: dict[str, Path], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    inputs = [str(broken), str(digits["images"])]
    report = _predict(capsys, str(digits["run"]), *inputs, "--dtype", "int8", "--bad-images", "skip", "--runtime",
                      "onnxruntime", *NO_GUARD)
    assert report["dtype"] == "int8" and report["images"] == 12 and report["skipped"] == 1
    assert "calibration leaves out an unreadable image" in caplog.text
    assert main(["predict", str(digits["run"]), *inputs, "--dtype", "int8", "--runtime", "onnxruntime",
                 *NO_GUARD]) == 2  # fail: named
    assert "broken.png" in _error(capsys)


def test_links_that_lead_nowhere_are_skipped_and_files_are_read_once(digits: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "a.png").write_bytes((digits["images"] / "00.png").read_bytes())
    report = _predict(capsys, str(digits["run"]), str(folder), "--bad-images", "skip", "--csv",
                      str(tmp_path / "out.csv"))
    errors = {Path(r["source"]).name: r["error"] for r in report["predictions"]}
    assert errors["a.png"] is None and "dangling.png" in errors["dangling.png"] and errors["loop.png"]
    monkeypatch.chdir(folder)
    report = _predict(capsys, str(digits["run"]), "a.png", "./a.png", str(folder / "a.png"), str(folder),
                      "--bad-images", "skip")
    assert [r["source"] for r in report["predictions"] if r["error"] is None] == ["a.png"]


# --- 10: an ONNX file is not silently moved to the CPU ------------------------------------------------------

def test_an_onnx_file_on_cuda_is_refused(digits: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", str(digits["run"] / "deploy.safetensors"), str(onnx_file)]) == 0
    capsys.readouterr()
    assert main(["predict", str(onnx_file), str(digits["images"]), "--device", "cuda"]) == 2
    assert "runs on the CPU here" in _error(capsys)


# --- 11: quantize holds INT8 to the accuracy guard ----------------------------------------------------------

def _hostile_to_int8(deploy: Path, out: Path) -> Path:
    """The same function with one channel's activations 1000 times larger (ReLU is positively homogeneous: the next
    layer divides them back): per-tensor INT8 activations then lose every other channel of that layer."""
    tensors, metadata = read_safetensors(deploy)
    convs = [k.removesuffix(".weight") for k in tensors if k.endswith("rbr_reparam.weight")]
    first, second = next((a, b) for a, b in zip(convs, convs[1:])
                         if tensors[b + ".weight"].shape[1] == tensors[a + ".weight"].shape[0])
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors[first + ".weight"][0] *= 1000
    tensors[first + ".bias"][0] *= 1000
    tensors[second + ".weight"][:, 0] /= 1000
    write_safetensors(tensors, out, metadata)
    return out


def test_quantize_writes_nothing_below_the_guard_and_names_the_remedies(digits: dict[str, Path], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    hostile = _hostile_to_int8(digits["run"] / "deploy.safetensors", tmp_path / "hostile.safetensors")
    x = torch.randn(8, 3, 16, 16)
    original = repvgg.load_model(digits["run"] / "deploy.safetensors")
    torch.testing.assert_close(repvgg.load_model(hostile)(x), original(x), rtol=1e-4, atol=1e-4)
    out = tmp_path / "int8.onnx"
    assert main(["quantize", str(hostile), str(out), "--calib-images", "64"]) == 1
    err = _error(capsys)
    assert "fails the accuracy guard" in err and "onnxruntime:" in err and REMEDIES in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hostile.safetensors"]
    assert main(["quantize", str(hostile), str(out), "--calib-images", "64", "--runtime", "onnxruntime", "--json",
                 "--speed-rounds", "3", *NO_GUARD]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["agreement"] < 0.995 and report["guard"]["min_agreement"] == 0
    assert set(report["accuracy"]) == set(report["speeds"])  # scored on every runtime it timed


# --- 30 to 33: CSV, links, class-name files and printed tables -------------------------------------------

def test_csv_cells_are_spreadsheet_safe(digits: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["=HYPERLINK(\"http://x\")", "+1", "-1", "@SUM(A1)", "=1+1", "five", "six", "seven", "eight", "nine"]
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(names) + "\n")
    (tmp_path / "=cmd.png").write_bytes((digits["images"] / "00.png").read_bytes())
    monkeypatch.chdir(tmp_path)
    _predict(capsys, str(digits["run"]), "=cmd.png", "--classes", str(classes), "--topk", "10", "--csv", "out.csv")
    rows = list(csv.reader((tmp_path / "out.csv").read_text().splitlines()))
    cells = [cell for row in rows[1:] for cell in row if cell]
    assert rows[1][0] == "'=cmd.png"  # a path as the user typed it, neutralised too
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells)
    assert {f"'{n}" for n in names[:5]} <= set(cells)


def test_csv_onto_a_link_writes_the_linked_file(digits: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "results" / "today.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "latest.csv"
    link.symlink_to(target)
    assert main(["predict", str(digits["run"]), str(digits["images"]), "--csv", str(link)]) == 2
    assert "(a link to" in _error(capsys)
    _predict(capsys, str(digits["run"]), str(digits["images"]), "--csv", str(link), "--overwrite")
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link stays
    assert target.read_text().startswith("path,class1,probability1")  # and its target has the predictions


def test_a_class_names_file_with_a_byte_order_mark(digits: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_bytes("\ufeffzero\none\ntwo\nthree\nfour\nfive\nsix\nseven\neight\nnine\n".encode("utf-8"))
    report = _predict(capsys, str(digits["run"]), str(digits["images"]), "--classes", str(classes), "--topk", "10")
    assert "zero" in report["predictions"][0]["classes"] and "\ufeffzero" not in report["predictions"][0]["classes"]


def test_the_table_keeps_one_row_per_image(digits: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ("new\nline.png", "carriage\rreturn.png", "tab\there.png"):
        (folder / name).write_bytes((digits["images"] / "00.png").read_bytes())
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(["zero", "one\r", *[str(i) for i in range(2, 10)]]) + "\n")  # \r\n: Windows lines
    capsys.readouterr()
    assert main(["predict", str(digits["run"]), str(folder), "--classes", str(classes), "--topk", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.count("\t") == 1 for line in lines)  # the one tab between path and classes
    assert any("new\\nline.png" in line for line in lines) and all("zero" in line for line in lines)
    classes.write_text("\n".join(["ze\tro", *[str(i) for i in range(1, 10)]]) + "\n")  # a tab is no part of a name
    assert main(["predict", str(digits["run"]), str(folder), "--classes", str(classes)]) == 2
    assert "'ze\\tro' holds U+0009" in _error(capsys)


def test_markdown_tables_escape_what_would_break_a_row() -> None:
    from repvgg.report import markdown_table

    table = markdown_table(["class", "IoU"], [["a|b", 1], ["new\nline\tand\x1b[31m", 2]])
    assert len(table.splitlines()) == 4 and "a\\|b" in table and "new\\nline\\tand\\x1b[31m" in table



def test_outputs_never_replace_a_device_or_a_pipe_and_keep_a_files_mode(digits: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pipe = tmp_path / "pipe.csv"
    os.mkfifo(pipe)
    link = tmp_path / "out.csv"
    link.symlink_to("/dev/null")
    for target in (pipe, link):
        assert main(["predict", str(digits["run"]), str(digits["images"]), "--csv", str(target), "--overwrite"]) == 2
        assert "is not a regular file (a device, a pipe or a socket)" in _error(capsys)
    assert stat.S_ISFIFO(pipe.stat().st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    private = tmp_path / "private.csv"
    private.write_text("old\n")
    private.chmod(0o600)
    _predict(capsys, str(digits["run"]), str(digits["images"]), "--csv", str(private), "--overwrite")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and private.read_text().startswith("path,")
    staged = tmp_path / "private.onnx"  # the writers that check a file in a staging folder before moving it in
    staged.write_text("old\n")
    staged.chmod(0o600)
    assert main(["export", str(digits["run"] / "deploy.safetensors"), str(staged), "--overwrite"]) == 0
    assert stat.S_IMODE(staged.stat().st_mode) == 0o600 and staged.stat().st_size > 1000


def test_a_file_name_that_is_not_utf8_is_written_escaped(digits: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    odd = os.fsdecode(b"a\xff\xfeb.png")
    (folder / odd).write_bytes((digits["images"] / "00.png").read_bytes())
    _predict(capsys, str(digits["run"]), str(folder), "--csv", str(tmp_path / "out.csv"))
    assert "a\\xff\\xfeb.png" in (tmp_path / "out.csv").read_text(encoding="utf-8")
    assert main(["predict", str(digits["run"]), str(folder)]) == 0
    assert "a\\xff\\xfeb.png" in capsys.readouterr().out

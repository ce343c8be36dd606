"""Never lose or mislabel work: resume in the folder named, outputs that never replace inputs, honest metrics
after a resume, refusals before anything is written, write failures named, numbers bounded."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml
import torch
from conftest import run_process, write_image_folder
from safetensors.torch import save_file

import repvgg
from repvgg.cli import main
from repvgg.io.checkpoint import load_checkpoint
from repvgg.perf.bench import BenchConfig
from repvgg.segmentation.config import SegTrainConfig
from repvgg.training.config import TrainConfig

TIMING = {"epoch_time_s", "train_images_per_s", "data_wait_s_per_step"}
DIGITS = ["train", "--model", "repvgg_tiny", "--device", "cpu", "--batch-size", "128", "--img-size", "16",
          "--no-inference-speed"]


def _tree(root: Path, *, skip: Path | None = None) -> dict[str, str]:
    """Every file under ``root`` (but those under ``skip``) -> a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and (skip is None or skip not in p.parents)}


def _rows(folder: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / "last.pt")["model"]


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch digits run (11 steps per epoch) stopped after 3 steps (a last.pt in the middle of epoch 1)."""
    out = tmp_path_factory.mktemp("partial") / "run"
    assert main([*DIGITS, "--epochs", "2", "--output", str(out), "--stop-after-steps", "3"]) == 130
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*DIGITS, "--epochs", "2", "--output", str(out)]) == 0
    return out


# --- 1 and 3: a run folder is self-locating, and a resume continues it exactly, metrics included ---------

def test_a_moved_run_resumed_from_elsewhere_matches_an_uninterrupted_run(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    start, elsewhere, moved_to = tmp_path / "start", tmp_path / "elsewhere", tmp_path / "moved"
    for folder in (start, elsewhere, moved_to):
        folder.mkdir()
    write_image_folder(start / "data", classes=3, per_class=16, size=40)
    repvgg.save_weights(repvgg.create_model("repvgg_tiny", num_classes=3), start / "init.safetensors")
    # relative --data, --weights and --output, as a user types them: 3 steps per epoch, 2 epochs
    common = ["train", "--model", "repvgg_tiny", "--device", "cpu", "--batch-size", "16", "--epochs", "2",
              "--img-size", "32", "--no-inference-speed"]
    inputs = ["--data", "data", "--weights", "init.safetensors"]
    monkeypatch.chdir(start)
    assert main([*common, *inputs, "--output", "full"]) == 0
    assert main([*common, *inputs, "--output", "part", "--stop-after-steps", "2"]) == 130  # mid-epoch 1

    # the folder moves, the initial weights are deleted, and the run is resumed from another directory
    run = moved_to / "run"
    shutil.move(start / "part", run)
    (start / "init.safetensors").unlink()
    monkeypatch.chdir(elsewhere)
    before = _tree(tmp_path, skip=run)
    assert main(["train", "--resume", str(Path("..") / "moved" / "run"), "--stop-after-steps", "2"]) == 130
    assert _tree(tmp_path, skip=run) == before  # nothing written outside the named folder
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)  # mid-epoch 2 now

    # the data moves too: named again with --data, it is checked to be the same data
    shutil.move(start / "data", moved_to / "data")
    before = _tree(tmp_path, skip=run)
    assert main(["train", "--resume", str(run)]) == 2  # its recorded place is gone: said, nothing written
    assert main(["train", "--resume", str(run), "--data", str(moved_to / "data")]) == 0
    assert _tree(tmp_path, skip=run) == before
    recorded = yaml.safe_load((run / "config.yaml").read_text())["resume_changes"]  # the new place, on record
    assert [(c["field"], c["was"], c["now"]) for c in recorded if c["field"] == "data"] == [
        ("data", str((start / "data").resolve()), str((moved_to / "data").resolve()))]
    assert list(elsewhere.iterdir()) == []  # nothing written in the working directory

    full = start / "full"
    a, b = _weights(full), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(run) == _rows(full)  # train_loss and train_top1 of the interrupted epochs included
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_top1"] == json.loads((full / "summary.json").read_text())["val_top1"]


def test_resume_on_other_data_is_refused(partial_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree(partial_run)
    data = write_image_folder(tmp_path / "data", classes=4, per_class=2, size=16)
    assert main(["train", "--resume", str(partial_run), "--data", str(data)]) == 2
    assert "is not the data" in capsys.readouterr().err
    assert _tree(partial_run) == before


def test_a_refused_resume_names_a_remedy_the_command_has(tmp_path: Path) -> None:
    """Only ``repvgg train`` starts a new run from a whole model's weights (--weights); seg-train and det-train are
    not told to use a flag they do not have."""
    from repvgg.training.run_folder import locate_run, resumable_file

    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "best.pt"):
        (run / name).write_bytes(b"")
    for command in ("train", "seg-train", "det-train"):
        for refused in (lambda: locate_run(str(tmp_path / "other"), str(run), lambda: run, command),
                        lambda: resumable_file(run / "best.pt", command)):
            with pytest.raises(ValueError) as err:
                refused()
            told = str(err.value)
            assert ("--weights" in told) == (command == "train"), told
            assert command == "train" or f"`repvgg {command}` starts from backbone weights only" in told


def test_resume_refuses_another_checkpoint_than_last_pt_and_another_output(partial_run: Path, finished_run: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree(finished_run)
    assert main(["train", "--resume", str(finished_run / "best.pt"), "--epochs", "3"]) == 2
    assert "resume from last.pt" in capsys.readouterr().err
    assert main(["train", "--resume", str(partial_run), "--output", str(finished_run)]) == 2
    assert "continues in the run's own folder" in capsys.readouterr().err
    assert _tree(finished_run) == before


# --- 2: no command writes over what it reads ---------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of inputs: classification weights, a segmenter, an image folder and a run folder with best.pt."""
    from repvgg.segmentation.pspnet import SegmenterConfig, build_segmenter
    from repvgg.segmentation.weights import save_segmenter

    root = tmp_path_factory.mktemp("inputs")
    repvgg.save_weights(repvgg.create_model("repvgg_tiny", num_classes=10), root / "w.safetensors")
    segmenter = build_segmenter(SegmenterConfig("repvgg_tiny", 3, head_channels=8, aux_channels=0))
    save_segmenter(segmenter, root / "seg.safetensors", classes=["a", "b", "c"])
    write_image_folder(root / "data", classes=2, per_class=2, size=16)
    (root / "run").mkdir()
    shutil.copyfile(root / "w.safetensors", root / "run" / "best.pt")
    (root / "run" / "config.yaml").write_text("epochs: 1\n")
    (root / "bench.json").write_text("{}\n")
    return root


#: Every subcommand that writes files, with an output pointing at one of its inputs (I/ = the inputs folder).
POINTING_AT_INPUTS = {
    "train --weights into --output": ["train", "--weights", "I/run/best.pt", "--output", "I/run", "--overwrite"],
    "train --config into --output": ["train", "--config", "I/run/config.yaml", "--output", "I/run", "--overwrite"],
    "train --output inside --data": ["train", "--data", "I/data", "--output", "I/data/run"],
    "seg-train --backbone-weights into --output": ["seg-train", "--backbone-weights", "I/run/best.pt", "--output",
                                                   "I/run", "--overwrite"],
    "ablate --output inside --data": ["ablate", "--data", "I/data", "--output", "I/data/ablation"],
    "eval --json-out": ["eval", "--weights", "I/w.safetensors", "--json-out", "I/w.safetensors", "--overwrite"],
    "eval --json-out inside --data": ["eval", "--weights", "I/w.safetensors", "--data", "I/data", "--json-out",
                                      "I/data/val/class_0/0.png", "--overwrite"],
    "seg-eval --json-out": ["seg-eval", "--weights", "I/seg.safetensors", "--json-out", "I/seg.safetensors",
                            "--overwrite"],
    "convert": ["convert", "I/w.safetensors", "I/w.safetensors", "--overwrite"],
    "export": ["export", "I/run/best.pt", "I/run/best.pt", "--overwrite"],
    "quantize into --data": ["quantize", "I/w.safetensors", "I/data/int8.onnx", "--data", "I/data", "--overwrite"],
    "quantize --qat-epochs over its weights": ["quantize", "I/run/best.pt", "I/run.onnx", "--qat-epochs", "1",
                                               "--overwrite"],
    "bench --plot over --json-out": ["bench", "--json-out", "I/bench.json", "--plot", "I/bench.json", "--overwrite"],
}


@pytest.mark.parametrize("argv", POINTING_AT_INPUTS.values(), ids=POINTING_AT_INPUTS.keys())
def test_no_command_writes_over_its_inputs(argv: list[str], inputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if argv[0] == "quantize" and "--qat-epochs" in argv:  # its QAT run folder is I/run-qat: put the weights there
        (inputs / "run-qat").mkdir(exist_ok=True)
        shutil.copyfile(inputs / "w.safetensors", inputs / "run-qat" / "best.pt")
        argv = [a.replace("I/run/best.pt", "I/run-qat/best.pt") for a in argv]
    before = _tree(inputs)
    argv = [a.replace("I/", f"{inputs}/") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "this command reads" in err or "input file" in err or "input of this command" in err, err
    assert _tree(inputs) == before  # not a byte changed, nothing added


# --- 4: a resume is a continuation ---------------------------------------------------------------------

def test_a_resume_that_would_not_continue_the_run_is_refused_before_writing(
        partial_run: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    partial, finished = _tree(partial_run), _tree(finished_run)
    assert main(["train", "--resume", str(partial_run), "--batch-size", "32"]) == 2
    assert "batch_size (128, not 32)" in capsys.readouterr().err
    assert main(["train", "--resume", str(partial_run), "--seed", "1"]) == 2
    assert main(["train", "--resume", str(finished_run), "--output", str(finished_run), "--epochs", "1"]) == 2
    assert "already finished its 2 epoch(s)" in capsys.readouterr().err
    assert main(["train", "--resume", str(finished_run)]) == 2
    assert "nothing to continue" in capsys.readouterr().err
    assert _tree(partial_run) == partial and _tree(finished_run) == finished


def test_a_finished_run_is_extended_with_a_larger_epochs(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    assert [row["epoch"] for row in _rows(run)] == [1, 2, 3]
    assert _rows(run)[:2] == _rows(finished_run)  # the first two epochs are kept as they were


# --- 5: a failed write stops the run, names the file and the cause, and keeps the last good state ---------

@pytest.mark.timeout(900)  # above run_process's own limit, which ends the process
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_last_one(partial_run: Path,
                                                                                  tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(partial_run, run)
    last = (run / "last.pt").read_bytes()
    # a file-size limit of 1 MiB (ulimit -f counts KiB): config.yaml fits, a checkpoint (about 10 MB) does not
    command = f"ulimit -f 1024 && exec {shlex.quote(sys.executable)} -m repvgg train --resume {shlex.quote(str(run))}"
    proc = run_process(["bash", "-c", command], timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "best.pt" in proc.stderr and "file-size limit" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "last.pt").read_bytes() == last  # the last good checkpoint survives
    assert not (run / "metrics.jsonl").exists()  # the epoch whose checkpoint failed is not recorded
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# --- 6 and 7: numbers are checked and honoured, or refused with exit 2 and a message -------------------------

@pytest.mark.parametrize("argv, message", [
    (["export", "repvgg_tiny", "OUT", "--opset", "7"], "opset must be between 18 and"),
    (["export", "repvgg_tiny", "OUT", "--opset", "99"], "opset must be between 18 and"),
    (["export", "repvgg_tiny", "OUT", "--img-size", "100000"], "--img-size"),
    (["eval", "--weights", "W", "--img-size", "0"], "--img-size"),
    (["bench", "--batch-size", "0"], "--batch-size"),
    (["info", "--img-size", "0"], "--img-size"),
    (["train", "--img-size", "100000", "--print-config"], "--img-size: the value must be between 8 and 4096"),
    (["seg-train", "--crop-size", "0", "--print-config"], "--crop-size: the value must be between 8 and 4096"),
])
def test_numeric_flags_are_validated(argv: list[str], message: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "out.onnx") if a == "OUT" else str(tmp_path / "w.safetensors") if a == "W" else a
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_library_calls_check_the_numbers_too(tmp_path: Path) -> None:
    model = repvgg.create_model("repvgg_tiny", num_classes=10)
    with pytest.raises(ValueError, match="img_size must be between"):
        repvgg.export_onnx(model, tmp_path / "m.onnx", img_size=100_000)  # refused before any allocation
    with pytest.raises(ValueError, match="opset must be between"):
        repvgg.export_onnx(model, tmp_path / "m.onnx", img_size=32, opset=7)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BenchConfig(batch_size=0).resolved()
    with pytest.raises(ValueError, match="img_size must be between 8 and 4096"):
        TrainConfig(img_size=100_000)
    with pytest.raises(ValueError, match="crop_size must be between 8 and 4096"):
        SegTrainConfig(crop_size=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("asked", [20, 24])
def test_an_export_has_the_opset_asked_for(tmp_path: Path, asked: int) -> None:
    """Opset 24 is newer than PyTorch 2.14's TorchScript-based exporter knows: the torch.export-based one writes it."""
    import onnx

    opset = min(asked, onnx.defs.onnx_opset_version())
    report = repvgg.export_onnx(repvgg.create_model("repvgg_tiny", num_classes=10), tmp_path / "m.onnx", img_size=32,
                                opset=opset)
    versions = [o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import if o.domain in ("", "ai.onnx")]
    assert report.opset == opset and versions == [opset]


def test_empty_class_folders_are_named_in_training_and_evaluation(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "data", classes=2, per_class=2, size=16)
    (data / "train" / "x").mkdir()
    (data / "val" / "x").mkdir()
    assert main([*DIGITS, "--data", str(data), "--output", str(tmp_path / "run")]) == 2
    assert "train/x" in capsys.readouterr().err
    weights = tmp_path / "w.safetensors"
    repvgg.save_weights(repvgg.create_model("repvgg_tiny", num_classes=3), weights)
    assert main(["eval", "--weights", str(weights), "--data", str(data), "--device", "cpu"]) == 2
    assert "train/x" in capsys.readouterr().err and not (tmp_path / "run").exists()


def _repvgg_file(path: Path, **metadata: str) -> Path:
    model = repvgg.create_model("repvgg_tiny", num_classes=10)
    spec = json.dumps(model.spec.to_dict())
    base = {"format": "repvgg", "arch": "repvgg_tiny", "deploy": "false", "spec": spec, "num_classes": "10",
            "in_chans": "3"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={**base, **metadata})
    return path


@pytest.mark.parametrize("metadata, field", [
    ({"spec": "{not json"}, "'spec'"),
    ({"num_classes": "abc"}, "'num_classes'"),
    ({"in_chans": "-3"}, "'in_chans'"),
    ({"deploy": "maybe"}, "'deploy'"),
])
def test_bad_metadata_names_the_file_and_the_field(metadata: dict[str, str], field: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = _repvgg_file(tmp_path / "bad.safetensors", **metadata)
    assert main(["eval", "--weights", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and field in err and "Traceback" not in err


def test_an_absurd_spec_is_refused_from_the_metadata_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import repvgg.io.loading as loading

    def no_building(*args, **kwargs):
        raise AssertionError("a model was built before the metadata was checked")

    spec = repvgg.get_spec("repvgg_tiny").to_dict()
    depths = list(spec["depths"])
    deep = _repvgg_file(tmp_path / "deep.safetensors",
                        spec=json.dumps({**spec, "depths": depths[:3] + [40000] + depths[4:]}))
    inconsistent = _repvgg_file(tmp_path / "odd.safetensors",
                                spec=json.dumps({**spec, "depths": depths[:3] + [200] + depths[4:]}))
    monkeypatch.setattr(loading, "build_model", no_building)
    with pytest.raises(ValueError, match=r"'spec'.*depths must be at most 256"):
        repvgg.load_model(deep)
    # within the bounds, but not what the file holds: counted from the tensor names, nothing built
    with pytest.raises(ValueError, match="declares 200 layers in stage 3"):
        repvgg.load_model(inconsistent)


def test_refused_pickles_never_suggest_weights_only_false(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = tmp_path / "EVIL.pt"
    torch.save({"linear.weight": torch.zeros(1), "x": Path("not a tensor")}, evil)
    for verbose in ([], ["-v"]):
        assert main([*verbose, "eval", "--weights", str(evil), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "refused" in err and "pathlib" in err
        assert "weights_only` set to `False`" not in err and "weights_only=False" not in err  # the unsafe advice


# --- 8: the smaller points -------------------------------------------------------------------------------

def test_a_run_that_failed_before_its_first_checkpoint_says_how_to_start_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "data", classes=2, per_class=2, size=16)
    (data / "train" / "class_0" / "0.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    assert main([*DIGITS, "--batch-size", "2", "--data", str(data), "--output", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert not (out / "last.pt").exists()
    assert main([*DIGITS, "--batch-size", "2", "--data", str(data), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint" in err and "--overwrite" in err and "--resume" not in err
    assert main(["train", "--resume", str(out)]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--model", "repvgg_nope"], ["eval", "--weights", "x", "--img-size", "0"],
                                  ["info", "--models", "nope"]])
def test_a_failure_with_json_prints_one_json_document(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--json"]) == 2
    document = json.loads(capsys.readouterr().out)
    assert document["exit_status"] == 2 and document["error"]


def test_files_are_created_with_the_users_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        out = tmp_path / "run"
        assert main([*DIGITS, "--output", str(out), "--stop-after-steps", "1"]) == 130
        converted = tmp_path / "deploy.safetensors"
        weights = tmp_path / "w.safetensors"
        repvgg.save_weights(repvgg.create_model("repvgg_tiny", num_classes=10), weights)
        assert main(["convert", str(weights), str(converted), "--img-size", "32"]) == 0
    finally:
        os.umask(previous)
    for path in (out / "last.pt", out / "config.yaml", weights, converted):
        assert path.stat().st_mode & 0o777 == 0o640, path

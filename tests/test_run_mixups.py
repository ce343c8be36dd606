"""Runs and results are never mixed up or mislabelled: one process per run folder, resume changes honoured and
recorded or refused, checkpoints that belong to their folder, skipped images really skipped, classes matched by
name, architecture names checked, export cards that say what the file takes, the deployed epoch named."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

import repvgg
from conftest import started_process, wait_for, write_image_folder
from repvgg.cli import main
from repvgg.io.checkpoint import load_checkpoint
from repvgg.io.weights import read_safetensors, write_safetensors
from repvgg.training.run_folder import LOCK_FILE, lock_run_folder

T = ["train", "--epochs", "1", "--img-size", "16", "--model", "repvgg_tiny", "--no-inference-speed", "--device",
     "cpu", "--batch-size", "128"]


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch digits run at 16x16 (11 steps an epoch) stopped after 3 steps."""
    out = tmp_path_factory.mktemp("partial") / "run"
    assert main([*T, "--epochs", "2", "--output", str(out), "--stop-after-steps", "3"]) == 130
    return out


# --- 1: one process per run folder ----------------------------------------------------------------------

def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v"
    with lock_run_folder(out):
        assert (out / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
        assert main([*T, "--output", str(out), "--seed", "2"]) == 2
        assert "is in use by another run (pid" in _error(capsys)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
    assert not out.exists()  # the lock's own folder goes with it when nothing else was written


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v"
    holder = ("import sys, time; from pathlib import Path; from repvgg.training.run_folder import lock_run_folder\n"
              "with lock_run_folder(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)\n")
    with started_process([sys.executable, "-c", holder, str(out)], tmp_path / "holder") as proc:
        assert wait_for(lambda: "locked" in (tmp_path / "holder" / "stdout.txt").read_text(), proc, timeout=120)
        assert main([*T, "--output", str(out)]) == 2
        assert f"in use by another run (pid {proc.pid} on" in _error(capsys)
        os.kill(proc.pid, signal.SIGKILL)  # killed: its lock file stays, the lock itself goes with the process
        proc.wait()
    assert (out / LOCK_FILE).is_file()
    with caplog.at_level(logging.INFO):
        assert main([*T, "--output", str(out)]) == 0
    assert f"taking over the lock of pid {proc.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists() and (out / "summary.json").is_file()


# --- 2 and 3: resume changes, and checkpoints that belong to their folder ----------------------------------

def test_a_resume_applies_and_records_a_changed_learning_rate(partial: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(partial, run)
    was = load_checkpoint(run / "last.pt")
    with caplog.at_level(logging.INFO):
        assert main(["train", "--resume", str(run), "--lr", "0.01", "--clip-grad", "5", "--weight-decay", "0.05",
                     "--momentum", "0.5"]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["lr"] == 0.01 and config["clip_grad"] == 5
    groups = load_checkpoint(run / "last.pt")["optimizer"]["param_groups"]  # what the optimizer ran with
    assert [(g["weight_decay"], g["momentum"]) for g in groups] == [(0.05, 0.5), (0.0, 0.5)]
    changes = {c["field"]: c for c in config["resume_changes"]}
    assert changes["lr"] == {"field": "lr", "was": was["config"]["lr"], "now": 0.01, "epoch": 0, "step": 3}
    assert changes["clip_grad"]["was"] is None and changes["clip_grad"]["step"] == 3
    assert "lr changes from" in caplog.text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] <= 0.01  # the schedule runs on the new rate


def test_a_resume_named_in_a_config_file_continues_the_runs_own_settings(partial: Path, tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``resume:`` in a --config file is --resume: defaults < the resumed run < the file < flags (the run's own
    settings were skipped, so its 2 epochs and --no-inference-speed were reset to the defaults' 10 and True)."""
    run = tmp_path / "run"
    shutil.copytree(partial, run)
    (tmp_path / "c.yaml").write_text(f"resume: {run}\nstop_after_steps: 1\n")
    with caplog.at_level(logging.INFO):
        assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 130
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["epochs"], config["inference_speed"]) == (2, False) and not config.get("resume_changes")
    assert "changes from" not in caplog.text and load_checkpoint(run / "last.pt")["global_step"] == 4
    (tmp_path / "c.yaml").write_text("resume: 5\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "resume must be a run folder or its last.pt, got 5" in _error(capsys)


@pytest.mark.parametrize("flags, field", [
    (["--recipe", "paper-light"], "recipe"), (["--label-smoothing", "0.2"], "label_smoothing"),
    (["--mixup", "0.2"], "mixup"), (["--spec", "use_se=true"], "model_overrides"), (["--img-size", "24"], "img_size"),
], ids=["recipe", "label-smoothing", "mixup", "spec", "img-size"])
def test_a_resume_refuses_a_change_it_cannot_honour(flags: list[str], field: str, partial: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    before = _files(partial)
    assert main(["train", "--resume", str(partial), *flags]) == 2
    err = _error(capsys)
    assert f"was trained with other {field} (" in err and "where only" in err and "lr" in err
    assert _files(partial) == before


def test_a_checkpoint_from_another_run_is_refused(partial: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    assert main([*T, "--epochs", "2", "--model", "repvgg_tiny_b", "--output", str(other),
                 "--stop-after-steps", "2"]) == 130
    run = tmp_path / "run"
    shutil.copytree(partial, run)
    shutil.copyfile(other / "last.pt", run / "last.pt")  # dropped in from elsewhere
    before = _files(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = _error(capsys)
    assert "is not the training state of the run in" in err and "run_id" in err
    assert _files(run) == before


def test_a_best_pt_from_another_run_is_refused_and_deploy_from_best_needs_the_runs_own(
        partial: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = tmp_path / "one"
    assert main([*T, "--output", str(one)]) == 0
    other = tmp_path / "other"
    assert main([*T, "--output", str(other), "--seed", "3"]) == 0
    run = tmp_path / "run"
    shutil.copytree(one, run)
    shutil.copyfile(other / "best.pt", run / "best.pt")  # a better epoch from elsewhere
    before = _files(run)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--deploy-from", "best"]) == 2
    assert "best.pt is not the training state of the run in" in _error(capsys)
    (run / "best.pt").unlink()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--deploy-from", "best"]) == 2
    assert "--deploy-from best converts the run's best.pt, which" in _error(capsys)
    assert _files(run) == {k: v for k, v in before.items() if k != "best.pt"}  # refused before training


def test_eval_splits_the_digits_as_the_run_did(partial: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """eval on the digits takes the split of the run beside the file (its config.yaml's --val-fraction): another
    split would score images it trained on; --val-fraction says otherwise, and goes with the digits only."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(partial / "last.pt", run / "last.pt")
    config = yaml.safe_load((partial / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "val_fraction": 0.3}))
    # a batch size beyond the images is one batch of them all (it was refused as needing 18 GiB)
    for extra, fraction, images in ((["--batch-size", "100000"], 0.3, 540), (["--val-fraction", "0.2"], 0.2, 360)):
        assert main(["eval", "--weights", str(run / "last.pt"), "--device", "cpu", "--json", *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["val_fraction"], result["val_images"]) == (fraction, images)
    assert main(["eval", "--weights", str(run / "last.pt"), "--data", str(tmp_path), "--val-fraction", "0.3"]) == 2
    assert "--val-fraction splits the embedded digits" in _error(capsys)
    elsewhere = tmp_path / "elsewhere"  # a link to the run's file splits as the run; another config.yaml is not read
    elsewhere.mkdir()
    (elsewhere / "last.pt").symlink_to(run / "last.pt")
    (elsewhere / "config.yaml").write_text("- a list, not a run's config\n")
    assert main(["eval", "--weights", str(elsewhere / "last.pt"), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_fraction"] == 0.3
    shutil.copy(run / "last.pt", elsewhere / "copy.pt")
    for foreign in ("- a list\n", "val_fraction: 0.5\n"):
        (elsewhere / "config.yaml").write_text(foreign)
        assert main(["eval", "--weights", str(elsewhere / "copy.pt"), "--device", "cpu", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["val_fraction"] == 0.2


def test_eval_of_an_ema_runs_checkpoint_scores_what_the_run_did(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The checkpoints of a run with an EMA hold the raw weights too (to resume); eval, convert and predict take the
    EMA ones, which the run evaluated and deployed."""
    out = tmp_path / "ema"
    assert main([*T, "--ema-decay", "0.5", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    for name in ("last.pt", "deploy.safetensors"):
        assert main(["eval", "--weights", str(out / name), "--device", "cpu", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["val_top1"] == summary["val_top1"], name


def test_qat_fine_tunes_at_the_size_the_weights_were_trained_at(tmp_path: Path) -> None:
    from repvgg.quant.qat import QATTask
    from repvgg.training.config import TrainConfig
    from repvgg.training.distributed import DistContext

    one = tmp_path / "one"
    assert main([*T, "--output", str(one)]) == 0
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), in_group=False)
    config, _ = QATTask().setup(TrainConfig(qat=True, weights=str(one / "best.pt")), ctx, None)
    assert config.img_size == 16  # what the weights' card records, not the digits' default 32


# --- 4: skip means skip --------------------------------------------------------------------------------

def test_skipped_images_are_left_out_and_counted(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", classes=2, per_class=6, size=20)
    (data / "val" / "class_1" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (data / "train" / "class_0" / "3.png").write_bytes(b"")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", "repvgg_tiny", "--img-size", "16", "--epochs", "1",
                 "--batch-size", "4", "--bad-images", "skip", "--device", "cpu", "--no-inference-speed",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_images"] == 11 and summary["skipped_images"] == {"val": 1, "train": 1}
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["val_skipped_images"] == 1 and row["train_skipped_images"] == 1


# --- 5, 6, 7, 8: results named by what they are --------------------------------------------------------

@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    data = write_image_folder(root / "data", classes=3, per_class=6, size=20)
    assert main(["train", "--data", str(data), "--model", "repvgg_tiny", "--img-size", "16", "--epochs", "3",
                 "--batch-size", "6", "--device", "cpu", "--no-inference-speed", "--output", str(root / "run")]) == 0
    return root


def test_eval_matches_classes_by_name_and_refuses_other_names(folder_run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    weights = str(folder_run / "run" / "deploy.safetensors")
    assert main(["eval", "--weights", weights, "--data", str(folder_run / "data"), "--json"]) == 0
    reference = json.loads(capsys.readouterr().out)["val_top1"]
    reordered = tmp_path / "reordered"  # the same images, the class folders named so that they sort otherwise
    for split in ("train", "val"):
        for old, new in (("class_0", "z_class_0"), ("class_1", "class_1"), ("class_2", "a_class_2")):
            shutil.copytree(folder_run / "data" / split / old, reordered / split / new)
    tensors, metadata = read_safetensors(weights)
    renamed = tmp_path / "renamed.safetensors"
    write_safetensors(tensors, renamed, {**metadata, "classes": json.dumps(["z_class_0", "class_1", "a_class_2"])})
    assert main(["eval", "--weights", str(renamed), "--data", str(reordered), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_top1"] == reference  # matched by name, not by position
    assert main(["eval", "--weights", weights, "--data", str(reordered)]) == 2
    err = _error(capsys)
    assert "are not the model's" in err and "a_class_2" in err and "class_0" in err


def test_a_file_whose_arch_is_not_its_spec_is_refused(folder_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    tensors, metadata = read_safetensors(folder_run / "run" / "deploy.safetensors")
    lying = tmp_path / "lying.safetensors"
    write_safetensors(tensors, lying, {**metadata, "arch": "repvgg_d2se"})
    assert main(["eval", "--weights", str(lying), "--data", str(folder_run / "data")]) == 2
    assert "says repvgg_d2se, but field 'spec' describes another network" in _error(capsys)
    model = repvgg.create_model("repvgg_tiny", num_classes=3, use_se=True)  # a variant made by overrides
    repvgg.save_weights(model, tmp_path / "se.safetensors")
    assert repvgg.load_model(tmp_path / "se.safetensors").name == "repvgg_tiny"


def test_export_at_another_size_records_that_size(folder_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from repvgg.io.card import read_card

    out = tmp_path / "m24.onnx"
    assert main(["export", str(folder_run / "run" / "deploy.safetensors"), str(out), "--img-size", "24"]) == 0
    assert read_card(out)[1].img_size == 24
    capsys.readouterr()
    image = next((folder_run / "data" / "val").rglob("*.png"))
    assert main(["predict", str(out), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preprocessing"]["img_size"] == 24


def test_a_card_field_of_the_wrong_type_is_an_error(folder_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    payload = load_checkpoint(folder_run / "run" / "best.pt")
    payload["preprocessing"] = {"img_size": 64}  # a dict, where the card holds a JSON string
    path = tmp_path / "dict.pt"
    torch.save(payload, path)
    assert main(["eval", "--weights", str(path), "--data", str(folder_run / "data")]) == 2
    assert "metadata field 'preprocessing' must be a JSON object in a string, got a dict" in _error(capsys)


# --- 35: the deployed weights are named -----------------------------------------------------------------

def test_deploy_from_best_converts_the_best_epoch_and_says_so(folder_run: Path, tmp_path: Path) -> None:
    last = json.loads((folder_run / "run" / "summary.json").read_text())
    assert last["deploy_from"] == "last" and last["deploy_epoch"] == 3
    out = tmp_path / "best"
    assert main(["train", "--data", str(folder_run / "data"), "--model", "repvgg_tiny", "--img-size", "16",
                 "--epochs", "3", "--batch-size", "6", "--device", "cpu", "--no-inference-speed",
                 "--deploy-from", "best", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best_epoch = max(range(3), key=lambda i: (rows[i]["val_top1"], -i)) + 1
    assert summary["deploy_from"] == "best" and summary["deploy_epoch"] == best_epoch
    assert summary["val_top1"] == rows[best_epoch - 1]["val_top1"]  # the deployed model is scored as it was then
    deployed = repvgg.load_model(out / "deploy.safetensors").eval()
    best = repvgg.reparameterize_model(repvgg.load_model(out / "best.pt")).eval()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(deployed(x), best(x))

"""The command line: thin wrappers over library calls, clear errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from repvgg.cli import main
from repvgg.nn.complexity import model_complexity


def test_info_prints_computed_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--models", "repvgg_a0,repvgg_b1g2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| repvgg")}
    assert set(rows) == {"repvgg_a0", "repvgg_b1g2"}
    c = model_complexity("repvgg_a0")
    cells = [cell.strip() for cell in rows["repvgg_a0"].split("|")[1:-1]]
    assert cells[4:] == [f"{c.params_train / 1e6:.2f}", f"{c.params_deploy / 1e6:.2f}",
                         f"{c.macs_train / 1e9:.2f}", f"{c.macs_deploy / 1e9:.2f}"]
    assert cells[5] == "8.31" and cells[7] == "1.36"


def test_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--models", "repvgg_a9"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'repvgg_a9'" in err and "repvgg_a0" in err


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "repvgg", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "info" in result.stdout


def test_convert_official_file_to_deploy_safetensors(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import torch

    from conftest import randomize_bn, relative_error
    from repvgg import create_model, load_model

    source = randomize_bn(create_model("repvgg_a0", num_classes=10)).eval()
    torch.save(source.state_dict(), tmp_path / "RepVGG-A0-train.pth")  # official files carry no metadata
    out = tmp_path / "a0-deploy.safetensors"
    assert main(["convert", str(tmp_path / "RepVGG-A0-train.pth"), str(out), "--img-size", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "repvgg_a0" and report["relative_error"] <= 1e-5
    assert report["params_deploy"] < report["params_train"]
    plain = load_model(out)
    x = torch.randn(2, 3, 64, 64)
    assert plain.deploy and relative_error(plain(x), source(x)) <= 1e-5
    # converting a fused file again is refused, with the reason
    assert main(["convert", str(out), str(tmp_path / "again.safetensors")]) == 2
    assert "already fused" in capsys.readouterr().err

"""Weights from the Hugging Face hub, through a local hub cache the test builds (no network)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from conftest import randomize_bn, run_process
from safetensors.torch import save_file

import repvgg
from repvgg.io.weights import official_to_timm

REPO_ROOT = Path(__file__).resolve().parents[1]


def _hub_cache(root: Path, repo_id: str, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    """A Hugging Face hub cache laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(snapshot / name))
    return root


def _run(code: str, cache: Path) -> dict:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = run_process([sys.executable, "-c", code], timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pretrained_weights_load_from_the_hub_cache(tmp_path: Path) -> None:
    model = randomize_bn(repvgg.create_model("repvgg_a0", num_classes=1000)).eval()
    timm_state = official_to_timm(model.state_dict())  # timm's files use timm's key names
    cache = _hub_cache(tmp_path / "hub", "timm/repvgg_a0.rvgg_in1k", {"model.safetensors": timm_state})
    torch.save(model.state_dict(), tmp_path / "a0.pth")
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    code = f"""
import json, torch, repvgg
x = torch.load({str(tmp_path / "x.pt")!r})
reference = repvgg.load_model({str(tmp_path / "a0.pth")!r}).eval()
a = repvgg.create_model("repvgg_a0", pretrained=True).eval()
b = repvgg.create_model("repvgg_a0", weights="hf-hub:timm/repvgg_a0.rvgg_in1k").eval()
c = repvgg.load_model("hf-hub:timm/repvgg_a0.rvgg_in1k").eval()
d = repvgg.create_model("repvgg_a0", pretrained=True, num_classes=10)   # fine-tuning: fresh head
hub = torch.hub.load({str(REPO_ROOT)!r}, "repvgg_a0", source="local", pretrained=True).eval()
with torch.no_grad():
    same = [torch.equal(m(x), reference(x)) for m in (a, b, c, hub)]
body = all(torch.equal(d.state_dict()[k], a.state_dict()[k]) for k in a.state_dict() if not k.startswith("linear."))
print(json.dumps({{"same": same, "fine_tune_head": d.linear.out_features, "body_kept": body}}))
"""
    result = _run(code, cache)
    assert result == {"same": [True, True, True, True], "fine_tune_head": 10, "body_kept": True}


def test_without_the_file_the_error_names_the_file_and_the_folder(tmp_path: Path) -> None:
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    code = """
import json, repvgg
try:
    repvgg.create_model("repvgg_b1", pretrained=True)
except FileNotFoundError as err:
    print(json.dumps({"error": str(err)}))
"""
    message = _run(code, cache)["error"]
    assert "model.safetensors" in message and "timm/repvgg_b1.rvgg_in1k" in message and str(cache) in message
    try:
        repvgg.create_model("repvgg_tiny", pretrained=True)
    except ValueError as err:
        assert "no pretrained weights" in str(err) and "repvgg_a0" in str(err)
    else:
        raise AssertionError("a model without published weights must be refused")


def test_a_cached_hub_file_is_an_input_no_output_replaces(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--json-out`` (or ``predict --csv``) on the cached file an ``hf-hub:`` reference reads is refused even with
    ``--overwrite``, as any input is: the reference is judged by the file it names."""
    import huggingface_hub.constants as constants

    from repvgg.cli import main

    cache = _hub_cache(tmp_path / "hub", "me/cls", {"model.safetensors": repvgg.create_model(
        "repvgg_tiny", num_classes=3).state_dict()})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read when a file is looked up
    (cached,) = cache.glob("models--me--cls/snapshots/*/model.safetensors")
    before = cached.read_bytes()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for command in (["eval", "--weights", "hf-hub:me/cls", "--json-out", str(cached)],
                    ["predict", "hf-hub:me/cls", str(tmp_path / "a.png"), "--csv", str(cached)]):
        assert main([*command, "--overwrite"]) == 2
        assert "is the input file" in capsys.readouterr().err and cached.read_bytes() == before


def test_predict_takes_an_onnx_file_on_the_hub(tmp_path: Path, monkeypatch, capsys) -> None:
    """``predict hf-hub:ORG/REPO/FILE`` is judged by the file it names: an ONNX model runs as a local one does (it was
    refused as 'an ONNX model, use it with repvgg predict')."""
    import huggingface_hub.constants as constants
    from PIL import Image

    from repvgg.cli import main

    model = repvgg.reparameterize_model(repvgg.create_model("repvgg_tiny", num_classes=3).eval())
    weights = repvgg.save_weights(model, tmp_path / "m.safetensors")
    assert main(["export", str(weights), str(tmp_path / "m.onnx"), "--img-size", "32"]) == 0
    cache = _hub_cache(tmp_path / "hub", "me/cls", {})
    (snapshot,) = cache.glob("models--me--cls/snapshots/*")
    (snapshot / "m.onnx").write_bytes((tmp_path / "m.onnx").read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    capsys.readouterr()
    assert main(["predict", "hf-hub:me/cls/m.onnx", str(tmp_path / "a.png"), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    local = main(["predict", str(tmp_path / "m.onnx"), str(tmp_path / "a.png"), "--json"])
    assert local == 0 and json.loads(capsys.readouterr().out)["predictions"] == document["predictions"]

"""RepVGGplus: post-SE blocks, training-only auxiliary classifiers, exact conversion, the official key layout, and
training with the auxiliary losses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import repvgg
from conftest import randomize_bn
from repvgg.cli import main
from repvgg.nn.registry import MODEL_SPECS

PLUS = sorted(name for name, spec in MODEL_SPECS.items() if spec.aux_heads)


def _float64_error(model: torch.nn.Module, size: int) -> float:
    model = randomize_bn(model).eval().double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
        plain = repvgg.reparameterize_model(model, inplace=True)
        fused = plain(x)
    assert isinstance(fused, torch.Tensor) and not hasattr(plain, "stage1_aux")
    return float((fused - reference).norm() / reference.norm())


@pytest.mark.parametrize("name", PLUS)
def test_every_repvggplus_converts_exactly(name: str) -> None:
    assert set(PLUS) >= {"repvggplus_l2pse", "repvggplus_tiny"}
    # every block and head of the layout at 1/8 of its widths: fusion is per block and exact at any width, and
    # L2pse at full width is 1.2 GB in float64
    widths = tuple(w // 8 for w in MODEL_SPECS[name].base_widths)
    model = repvgg.create_model(name, num_classes=10, base_widths=widths)
    assert model.spec.post_se and [type(b.post_se).__name__ for b in model.stage1] == ["SEBlock"] * len(model.stage1)
    assert _float64_error(model, 32) <= 1e-5


def test_the_auxiliary_heads_are_training_only() -> None:
    model = randomize_bn(repvgg.create_model("repvggplus_tiny", num_classes=7)).train()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 7)  # a tensor, as timm's models answer, until the auxiliary outputs are asked for
    model.set_aux_outputs()
    out = model(x)
    assert set(out) == {"main", "stage1_aux", "stage2_aux", "stage3_first_aux"}
    assert all(v.shape == (2, 7) for v in out.values())
    model.eval()
    with torch.no_grad():
        main_logits = model(x)
    assert isinstance(main_logits, torch.Tensor) and main_logits.shape == (2, 7)
    plain = repvgg.reparameterize_model(model)
    assert plain.deploy and isinstance(plain.train()(x), torch.Tensor)  # converted: a tensor in every mode
    deploy = repvgg.create_model("repvggplus_tiny", num_classes=7, deploy=True)
    assert not any("aux" in k for k in deploy.state_dict())
    deploy.load_state_dict(plain.state_dict())
    # the timm interface
    model.eval()
    features = model.forward_features(x)
    assert torch.equal(model.forward_head(features), model(x))
    model.reset_classifier(4)
    assert model.train()(x)["stage2_aux"].shape == (2, 4)
    backbone = repvgg.create_model("repvggplus_tiny", features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in backbone.eval()(x)] == [backbone.spec.widths[1], backbone.spec.widths[3]]


def _official_layout(state_dict: dict[str, torch.Tensor], stage3_blocks: int) -> dict[str, torch.Tensor]:
    """This package's keys written as the official repvggplus.py names them (``stageN.blocks.i``, stage 3 split)."""
    half = stage3_blocks // 2

    def rename(key: str) -> str:
        match = re.match(r"^stage(\d)\.(\d+)\.(.*)$", key)
        if not match:
            return key
        stage, index, rest = int(match[1]), int(match[2]), match[3]
        if stage == 3:
            return f"stage3_first.blocks.{index}.{rest}" if index < half else \
                f"stage3_second.blocks.{index - half}.{rest}"
        return f"stage{stage}.blocks.{index}.{rest}"

    return {rename(k): v for k, v in state_dict.items()}


def test_official_files_load_with_their_architecture_inferred(tmp_path: Path) -> None:
    model = randomize_bn(repvgg.create_model("repvggplus_tiny", num_classes=10)).eval()
    official = _official_layout(model.state_dict(), len(model.stage3))
    assert {"stage3_first.blocks.0.post_se.down.weight", "stage1_aux.3.weight", "stage3_second.blocks.0.rbr_dense"
            ".conv.weight"} <= set(official)
    torch.save(official, tmp_path / "RepVGGplus-tiny-train.pth")
    loaded = repvgg.load_model(tmp_path / "RepVGGplus-tiny-train.pth").eval()
    assert loaded.name == "repvggplus_tiny" and loaded.aux_positions == ["stage1", "stage2", "stage3_first"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        loaded.set_aux_outputs()
        model.set_aux_outputs()
        assert all(torch.equal(a, b) for a, b in zip(loaded.train()(x).values(), model.train()(x).values()))
    plain = repvgg.reparameterize_model(model)
    torch.save(_official_layout(plain.state_dict(), len(plain.stage3)), tmp_path / "RepVGGplus-tiny-deploy.pth")
    fused = repvgg.load_model(tmp_path / "RepVGGplus-tiny-deploy.pth")
    with torch.no_grad():
        assert fused.deploy and torch.equal(fused(x), plain(x))
    assert main(["convert", str(tmp_path / "RepVGGplus-tiny-train.pth"), str(tmp_path / "plus.safetensors"),
                 "--img-size", "64"]) == 0


def test_training_records_the_main_and_auxiliary_losses(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--model", "repvggplus_tiny", "--epochs", "1", "--no-inference-speed", "--device", "cpu",
                 "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        parts = [row[f"train_{name}_loss"] for name in ("stage1_aux", "stage2_aux", "stage3_first_aux")]
        assert row["train_loss"] == pytest.approx(row["train_main_loss"] + 0.1 * sum(parts), rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prediction_agreement"] == 1.0 and summary["val_top1"] == summary["val_top1_deploy"]
    trained = repvgg.load_model(out / "last.pt")  # converted after training: the same function in float64
    assert trained.aux_positions and _float64_error(trained, 32) <= 1e-5


def test_the_flagships_weights_say_where_they_live() -> None:
    with pytest.raises(ValueError, match="RepVGGplus-L2pse-train256-acc84.06.pth.*github.com/DingXiaoH/RepVGG"):
        repvgg.create_model("repvggplus_l2pse", pretrained=True)


def _gradients(parts: int, *, bn_statistics: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The gradients one step of ``repvgg train`` computes on a fixed batch of 8, over ``parts`` micro-batches."""
    from repvgg.training.accumulate import accumulate_gradients
    from repvgg.training.classification import ClassificationTask
    from repvgg.training.config import TrainConfig

    torch.manual_seed(0)  # the same weights for every call
    model = randomize_bn(repvgg.create_model("repvggplus_tiny", num_classes=10)).train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d) and bn_statistics == "running":
            module.eval()  # normalised by the running statistics: each image independent of the others
    task = ClassificationTask()
    task.config = TrainConfig(custom_l2=True)
    task.aux_heads = ["stage1_aux", "stage2_aux", "stage3_first_aux"]
    model.set_aux_outputs()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sums = accumulate_gradients(task, model, model, batch, parts=parts, scaler=scaler, amp_dtype=None,
                                distributed=False)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sums


def test_accumulation_gives_the_gradient_of_the_whole_batch() -> None:
    whole, whole_sums = _gradients(1, bn_statistics="running")
    for parts in (2, 4):
        split, sums = _gradients(parts, bn_statistics="running")
        assert split.keys() == whole.keys() and any("aux" in k for k in whole)
        for name, grad in whole.items():
            assert torch.allclose(split[name], grad, rtol=1e-4, atol=1e-7), name
        assert torch.allclose(sums, whole_sums, rtol=1e-6)  # losses, images, correct and auxiliary losses
    # BatchNorm in training mode normalises each micro-batch by its own statistics: not the same gradients
    whole, _ = _gradients(1, bn_statistics="batch")
    split, _ = _gradients(4, bn_statistics="batch")
    difference = max(float((split[n] - g).norm() / g.norm()) for n, g in whole.items() if g.norm() > 0)
    assert difference > 1e-3


def test_accumulation_steps_must_divide_the_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--model", "repvgg_tiny", "--epochs", "1", "--batch-size", "64", "--accumulation-steps", "3",
                 "--output", str(tmp_path / "run")]) == 2
    assert "--accumulation-steps 3 must divide the 64 images" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_separate_test_size_evaluates_at_it(tmp_path: Path) -> None:
    from conftest import write_image_folder
    from repvgg.io.card import read_card
    from repvgg.training.data import build_datasets

    folder = build_datasets(str(write_image_folder(tmp_path / "data")), img_size=32, test_size=40)
    assert folder.train[0][0].shape[-1] == 32 and folder.val[0][0].shape[-1] == 40
    assert folder.preprocessing.img_size == 40 and folder.preprocessing.resize == 45  # 40 / 0.875
    digits = build_datasets(None, img_size=32, test_size=48)
    assert digits.train[0][0].shape[-1] == 32 and digits.val[0][0].shape[-1] == 48
    out = tmp_path / "run"
    assert main(["train", "--model", "repvgg_tiny", "--epochs", "1", "--img-size", "32", "--test-size", "48",
                 "--no-inference-speed", "--device", "cpu", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["img_size"], summary["test_size"]) == (32, 48) and summary["prediction_agreement"] == 1.0
    assert read_card(out / "deploy.safetensors", 10)[1].img_size == 48  # deployed at the size it was evaluated at


def test_bench_reports_both_forms_of_a_repvggplus() -> None:
    from repvgg.perf.bench import BenchConfig, run_benchmark

    result = run_benchmark(BenchConfig(models=("plus_tiny",), baselines=(), peer=False, batch_size=2, warmup=0,
                                       rounds=1, latency=False, memory=False, fast=False, reference_conv=False,
                                       img_size=64))
    train, plain = result.row("repvggplus_tiny", "train"), result.row("repvggplus_tiny", "plain")
    assert train.params > plain.params and plain.deviation <= 1e-5 and plain.throughput > 0


def test_a_recipe_is_a_preset_that_flags_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--recipe", "repvggplus", "--epochs", "3", "--print-config", "--json"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert (config["model"], config["epochs"], config["weight_decay"], config["img_size"], config["test_size"],
            config["mixup"], config["aux_weight"]) == ("repvggplus_l2pse", 3, 4e-5, 256, 320, 0.2, 0.1)
    assert main(["train", "--recipe", "paper-heavy", "--print-config", "--json"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert (config["epochs"], config["auto_augment"], config["label_smoothing"]) == (200, "original", 0.1)
    assert main(["train", "--recipe", "paper-medium", "--print-config"]) == 2


def test_a_repvggplus_file_loads_into_a_backbone_and_without_its_auxiliary_heads(tmp_path: Path) -> None:
    """The training-only heads are left out where the model has none (a backbone, a headless model: they were
    'unexpected keys'), and a RepVGGplus saved after they were dropped (timm's build, reparameterize()) records it
    (load_model rebuilt them and found them missing)."""
    path = repvgg.save_weights(repvgg.create_model("repvggplus_tiny", num_classes=3), tmp_path / "p.safetensors")
    assert repvgg.create_model("repvggplus_tiny", features_only=True, weights=path).features_only
    assert repvgg.create_model("repvggplus_tiny", num_classes=0, weights=path).num_classes == 0
    model = randomize_bn(repvgg.create_model("repvggplus_tiny", num_classes=3))
    model.reparameterize()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reloaded = repvgg.load_model(repvgg.save_weights(model, tmp_path / "q.safetensors")).eval()
        assert torch.equal(reloaded(x), model.eval()(x))

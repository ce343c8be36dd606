"""`repvgg ablate` on a tiny budget: four configurations, identical converted models, complete JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from repvgg.training.ablation import (BRANCH_CONFIGS, PAPER_TOP1, AblationResult, converted_cost, ranking,
                                      ranking_agrees)
from repvgg.cli import main
from repvgg import create_model

SMOKE = ["--model", "repvgg_tiny", "--epochs", "1", "--seeds", "1", "--batch-size", "64", "--val-fraction", "0.8",
         "--img-size", "16", "--device", "cpu"]


def test_branch_configurations_switch_the_branches() -> None:
    for name, switches in BRANCH_CONFIGS.items():
        model = create_model("repvgg_tiny", num_classes=10, **switches)
        block = model.stage1[1]  # stride 1, equal channels: every branch is possible here
        assert (block.rbr_1x1 is not None) == switches["use_1x1"], name
        assert (block.rbr_identity is not None) == switches["use_identity"], name
        assert (block.post_bn is not None) == switches.get("post_bn", False), name
    costs = {converted_cost("repvgg_tiny", s, 32, 10) for s in BRANCH_CONFIGS.values()}
    assert len(costs) == 1


def _rows(**top1: float) -> list[dict]:
    return [{"config": c, "val_top1_mean": v} for c, v in top1.items()]


def test_ranking_helpers() -> None:
    rows = [{"config": c, "val_top1_mean": v} for c, v in PAPER_TOP1.items()]
    assert ranking(rows) == ["plain", "1x1", "identity", "full"]
    assert ranking_agrees(rows) is True
    rows[2]["val_top1_mean"] = 99.0
    assert ranking_agrees(rows) is False
    assert ranking_agrees(rows[:2]) is None
    # Ranked by value, not by row order; configurations outside Table 6 do not take part.
    listed_best_first = _rows(post_bn=99.0, full=80.0, identity=70.0, **{"1x1": 60.0}, plain=50.0)
    assert ranking(listed_best_first) == ["plain", "1x1", "identity", "full"]
    assert ranking_agrees(listed_best_first) is True
    # The measured outcome of the README: identity-only ahead of the full block.
    top_two_swapped = _rows(plain=50.0, **{"1x1": 60.0}, identity=80.0, full=70.0)
    assert ranking(top_two_swapped) == ["plain", "1x1", "full", "identity"]
    assert ranking_agrees(top_two_swapped) is False
    assert ranking_agrees(_rows(plain=50.0, identity=80.0, full=70.0, post_bn=90.0)) is None


@pytest.mark.parametrize("top1, expected", [
    (dict(plain=50.0, identity=70.0, full=80.0, **{"1x1": 60.0}), True),
    (dict(plain=65.0, identity=70.0, full=80.0, **{"1x1": 60.0}), False),
    (dict(plain=50.0, identity=70.0, full=80.0), None),
])
def test_result_json_reports_whether_the_ranking_agrees(top1: dict, expected: bool | None) -> None:
    result = AblationResult(model="repvgg_tiny", dataset="synthetic", epochs=1, seeds=[0], rows=_rows(**top1))
    assert result.as_dict()["ranking_agrees_with_paper"] is expected


def test_ablate_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ablate"
    code = main(["ablate", *SMOKE, "--table", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    table_rows = [line for line in printed.splitlines() if line.startswith("| ") and "config" not in line]
    assert [r.split("|")[1].strip() for r in table_rows] == ["plain", "1x1", "identity", "full"]
    assert "paper top-1" in printed and "agrees:" in printed
    data = json.loads((out / "ablation.json").read_text())
    assert [r["config"] for r in data["configs"]] == ["plain", "1x1", "identity", "full"]
    assert data["same_inference_cost"] is True and len(set(data["converted_params"].values())) == 1
    assert len(data["runs"]) == 4 and all(len(r["train_loss_curve"]) == 1 for r in data["runs"])
    for row in data["configs"]:
        for key in ("val_top1_mean", "val_top1_std", "final_train_loss_mean", "val_top1_deploy_mean",
                    "converted_params", "converted_macs", "paper_top1"):
            assert key in row
        assert row["val_top1_mean"] == row["val_top1_deploy_mean"]
    measured = [r["config"] for r in sorted(data["configs"], key=lambda r: r["val_top1_mean"])]
    agrees = measured == ["plain", "1x1", "identity", "full"]
    assert data["ranking_agrees_with_paper"] is agrees
    assert f"measured {' < '.join(measured)}; paper plain < 1x1 < identity < full; " \
           f"agrees: {'yes' if agrees else 'no'}" in printed
    for name in ("ablation.md", "ablation_loss.png", "ablation_accuracy.png"):
        assert (out / name).is_file()
    # a second invocation reuses the finished runs instead of training again
    before = (out / "full-seed0" / "summary.json").stat().st_mtime_ns
    assert main(["ablate", *SMOKE, "--output", str(out)]) == 0
    assert (out / "full-seed0" / "summary.json").stat().st_mtime_ns == before
    capsys.readouterr()
    # ... only if they were trained with the settings asked for: else refused, or trained again with --overwrite
    assert main(["ablate", *SMOKE, "--lr", "0.05", "--configs", "full", "--output", str(out)]) == 2
    assert "full-seed0 holds a finished run trained with other lr (0.025, not 0.05)" in capsys.readouterr().err
    assert (out / "full-seed0" / "summary.json").stat().st_mtime_ns == before
    assert main(["ablate", *SMOKE, "--lr", "0.05", "--configs", "full", "--output", str(out), "--overwrite"]) == 0
    assert (out / "full-seed0" / "summary.json").stat().st_mtime_ns != before
    assert yaml.safe_load((out / "full-seed0" / "config.yaml").read_text())["lr"] == 0.05


def test_unknown_configuration_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ablate", "--configs", "plain,bogus", "--output", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_a_configuration_named_twice_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each row of the table counts the runs of its configuration: a repeated one would count them twice."""
    assert main(["ablate", "--configs", "plain,identity,plain", "--output", str(tmp_path / "abl")]) == 2
    assert "--configs names plain twice" in capsys.readouterr().err and not (tmp_path / "abl").exists()
    (tmp_path / "ablation.json").write_text("{}")
    assert main(["ablate", "--configs", "plain", "--output", str(tmp_path / "ablation.json")]) == 2
    assert "is a file; the ablation's runs and tables go into a folder" in capsys.readouterr().err


def test_learning_rate_rules() -> None:
    from repvgg.training.config import AblationConfig, TrainConfig

    # repvgg train: the paper's 0.1 x batch / 256 on folders, half of it on the digits' short default;
    # the ablation keeps the paper's rule on the digits (its ordering shows at it); an explicit lr wins
    assert TrainConfig(data="imagenet", batch_size=256).resolved_lr == pytest.approx(0.1)
    assert TrainConfig().resolved_lr == pytest.approx(0.05 * 64 / 256)
    assert TrainConfig(qat=True).resolved_lr == pytest.approx(0.005 * 64 / 256)
    assert AblationConfig().resolved_lr == pytest.approx(0.1 * 64 / 256)
    assert AblationConfig(lr=0.3).resolved_lr == TrainConfig(lr=0.3).resolved_lr == 0.3

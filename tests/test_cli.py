"""The command line: thin wrappers over library calls, clear errors, exit codes."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
from conftest import run_process

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
    assert main(["info", "--models", "repvgg_tiny", "--img-size", "32", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]  # the counts, not the table's rounded strings ("0.01")
    tiny = model_complexity("repvgg_tiny", img_size=32)
    assert (record["params_train"], record["macs_deploy"], record["depths"]) == (
        tiny.params_train, tiny.macs_deploy, [1, 2, 2, 4, 1])
    assert main(["info", "--models", "REPVGG_TINY, repvgg_tiny,", "--img-size", "32", "--json"]) == 0
    assert [r["model"] for r in json.loads(capsys.readouterr().out)] == ["repvgg_tiny"]  # as registered, once


def test_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--models", "repvgg_a9"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'repvgg_a9'" in err and "repvgg_a0" in err


def test_python_dash_m_entry_point() -> None:
    result = run_process([sys.executable, "-m", "repvgg", "--help"], timeout=240)
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


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    from repvgg.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(sub.choices)


def _option_help(parser: argparse.ArgumentParser, dest: str) -> str:
    """The help text of one option exactly as ``--help`` prints it (wrapping undone)."""
    action = next(a for a in parser._actions if a.dest == dest)
    formatter = parser._get_formatter()
    return " ".join(formatter._expand_help(action).split()) if action.help else ""


def test_every_subcommand_help_shows_the_defaults_it_really_uses() -> None:
    import dataclasses

    from repvgg.cli.flags import shown_default
    from repvgg.io.config import ExportConfig
    from repvgg.perf.config import BenchConfig
    from repvgg.quant.config import QuantizeConfig
    from repvgg.segmentation.config import SegTrainConfig
    from repvgg.training.config import AblationConfig, TrainConfig

    configs = {"train": TrainConfig, "seg-train": SegTrainConfig, "ablate": AblationConfig, "bench": BenchConfig,
               "export": ExportConfig, "quantize": QuantizeConfig}
    parsers = _subcommand_parsers()
    assert set(configs) < set(parsers) and len(parsers) >= 9
    for command, parser in parsers.items():
        fields = {f.name: f for f in dataclasses.fields(configs[command])} if command in configs else {}
        checked = 0
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreConstAction)):
                continue  # store_true/store_false flags say what they do; their default is "not given"
            text = _option_help(parser, action.dest)
            if action.dest in fields:  # generated from the config: shows the dataclass default
                f = fields[action.dest]
                assert action.default is None, (command, action.dest)  # "not given": the config decides
                assert f"(default: {shown_default(f)})" in text, (command, action.dest, text)
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                if isinstance(default, tuple) and action.nargs is None:  # a comma-separated list: parsed back
                    assert action.type(shown_default(f)) == default, (command, action.dest)
                elif not f.metadata.get("default_help"):
                    assert shown_default(f) in ("on", "off", "none") or str(default) == shown_default(f)
            elif action.default not in (None, False, [], argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, (command, action.dest, text)
            checked += 1
        assert checked >= 1, command
    # the values a run would really use: what an empty command line resolves to
    from repvgg.cli.flags import config_flag_values
    from repvgg.cli.train import resolve_config

    positional = {"export": ["repvgg_tiny", "out.onnx"], "quantize": ["w.safetensors", "out.onnx"]}
    for command, cls in configs.items():
        args = parsers[command].parse_args(positional.get(command, []))
        resolved = resolve_config(args) if hasattr(args, "config") else cls.from_dict(config_flag_values(args, cls))
        assert args.config_cls is cls and resolved == cls(), command
    ablate = resolve_config(parsers["ablate"].parse_args([]))
    assert (ablate.model, ablate.epochs) == ("repvgg_tiny_b", 6)
    assert "(default: repvgg_tiny_b)" in _option_help(parsers["ablate"], "model")
    assert "(default: 6)" in _option_help(parsers["ablate"], "epochs")


def test_print_config_shows_the_resolved_config_and_runs_nothing(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    config_file = tmp_path / "c.yaml"
    config_file.write_text("epochs: 7\nlr: 0.3\n")
    out = tmp_path / "never"
    assert main(["train", "--config", str(config_file), "--epochs", "9", "--output", str(out), "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["epochs"] == 9 and shown["lr"] == 0.3 and shown["model"] == "repvgg_a0"  # flag > file > default
    assert not out.exists()
    assert main(["seg-train", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["batch_size"] == 16
    assert main(["ablate", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"] == "repvgg_tiny_b"


def test_help_and_version_start_without_torch() -> None:
    """``--help`` of every subcommand and ``--version`` import no torch (what makes them start fast)."""
    import repvgg

    code = ("import sys\nfrom repvgg.cli import main\nfor argv in (%r):\n"
            "    try:\n        main(argv)\n    except SystemExit as exit:\n        assert exit.code == 0, argv\n"
            "print(sorted(m for m in ('torch', 'numpy', 'timm', 'onnx') if m in sys.modules))\n")
    commands = [["--help"], ["--version"]] + [[c, "--help"] for c in _subcommand_parsers()]
    result = run_process([sys.executable, "-c", code % (commands,)], timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert f"repvgg {repvgg.__version__}" in result.stdout
    from importlib.metadata import version

    assert repvgg.__version__ == version("repvgg")


def test_json_means_one_json_document_on_stdout_for_every_subcommand(tmp_path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import json

    parsers = _subcommand_parsers()
    assert all(any(a.dest == "json" for a in p._actions) for p in parsers.values())
    import repvgg

    plain = repvgg.reparameterize_model(repvgg.create_model("repvgg_tiny", num_classes=10))
    repvgg.save_weights(plain, tmp_path / "tiny.safetensors")
    train_file = tmp_path / "train.safetensors"
    repvgg.save_weights(repvgg.create_model("repvgg_tiny", num_classes=10), train_file)
    runs = {
        "info": ["info", "--models", "repvgg_tiny"],
        "train": ["train", "--print-config"],
        "seg-train": ["seg-train", "--print-config"],
        "ablate": ["ablate", "--print-config"],
        "eval": ["eval", "--weights", str(tmp_path / "tiny.safetensors"), "--device", "cpu"],
        "convert": ["convert", str(train_file), str(tmp_path / "c.safetensors"), "--img-size", "32"],
        "export": ["export", str(tmp_path / "tiny.safetensors"), str(tmp_path / "t.onnx"), "--img-size", "32"],
        "bench": ["bench", "--models", "repvgg_tiny", "--baselines", "none", "--no-peer", "--no-fast",
                  "--no-latency", "--no-memory", "--img-size", "32", "--rounds", "1", "--warmup", "0"],
    }
    for name, argv in runs.items():
        assert main([*argv, "--json"]) == 0, name
        document = json.loads(capsys.readouterr().out)  # the whole of stdout parses
        assert document, name
    assert {"quantize", "seg-eval"} <= set(parsers)  # their --json runs in test_quantize / seg tests

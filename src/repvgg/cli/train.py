"""``repvgg train``: the main job (train, convert, verify) on the digits default or an ImageFolder tree."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from repvgg.cli.flags import config_command, config_flag_values
from repvgg.cli.output import emit
from repvgg.limits import parse_json
from repvgg.errors import EXIT_INTERRUPTED
from repvgg.options import RunConfig
from repvgg.training.config import TrainConfig, resolve_run_config


def add_common_arguments(p: argparse.ArgumentParser, *, spec: bool = True) -> None:
    """``--config`` and ``--print-config`` (and ``--spec`` for jobs that build a RepVGG)."""
    p.add_argument("--config", help="YAML or JSON file of options (keys as the flags, - or _)")
    p.add_argument("--print-config", action="store_true",
                   help="print the configuration the run would use (YAML) and exit")
    if spec:
        p.add_argument("--spec", action="append", default=[], metavar="KEY=VALUE",
                       help="override a RepVGGSpec field, VALUE as JSON, e.g. --spec 'depths=[1,2,2,2,1]'")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = config_command(
        sub, "train", TrainConfig, run,
        help="train a multi-branch RepVGG, convert it, and verify the plain model",
        description="Train, convert with reparameterize_model, evaluate both models on the same data, "
                    "and write summary.json, metrics.jsonl, last.pt, best.pt, deploy.safetensors, "
                    "config.yaml and curves.png into the run folder. Precedence: defaults < the resumed "
                    "run's config < --config file < command-line flags.")
    add_common_arguments(p)


def _parse_spec(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--spec expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = parse_json(value, f"--spec {key} (a JSON value, e.g. [1,2,2,2,1], true, 2)")
    return overrides


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Merge defaults, a resumed run's config, a config file and the flags into the command's config class."""
    config_cls = args.config_cls
    config = resolve_run_config(config_cls, resume=getattr(args, "resume", None), config_file=args.config,
                                flags=config_flag_values(args, config_cls), command=getattr(args, "command", None))
    if getattr(args, "spec", None):
        config = config.updated(model_overrides={**config.model_overrides, **_parse_spec(args.spec)})
    if getattr(config, "model_overrides", None):  # checked now, so that --print-config shows only what builds
        from repvgg.nn.registry import spec_with

        try:
            spec_with(config.model, config.model_overrides)
        except TypeError as err:
            raise ValueError(f"--spec: {err}") from None
    return config


def print_config(config: Any, args: argparse.Namespace) -> int:
    """``--print-config``: the resolved configuration as YAML (as JSON with ``--json``) on stdout."""
    emit(args, config.to_dict(), config.to_yaml())
    return 0


def run_training(args: argparse.Namespace, job: Callable[[Any], dict[str, Any]],
                 report: Callable[[dict[str, Any]], str | None]) -> int:
    """What every training command does: resolve the config (or print it), run ``job`` on it, and show its summary
    through ``report`` (an interrupted run: the resumable state, exit 130; ``None``: nothing to show, as on the other
    processes of a distributed run)."""
    config = resolve_config(args)
    if args.print_config:
        return print_config(config, args)
    summary = job(config)
    if summary.get("interrupted"):
        emit(args, summary)
        return EXIT_INTERRUPTED
    text = report(summary)
    if text is not None:
        emit(args, summary, text)
    return 0


def run(args: argparse.Namespace) -> int:
    from repvgg.training.classification import train
    from repvgg.quant.qat import train_qat

    def job(config: Any) -> dict[str, Any]:
        assert isinstance(config, TrainConfig)  # the class add_parser gave config_command
        return (train_qat if config.qat else train)(config)

    return run_training(args, job, _report)


def _report(summary: dict[str, Any]) -> str:
    keys = ("model", "dataset", "epochs", "val_top1", "val_top1_deploy", "max_abs_diff", "prediction_agreement",
            "deploy_from", "deploy_epoch", "top1_int8", "int8_onnx", "output")
    return json.dumps({k: summary[k] for k in keys if k in summary}, indent=2)

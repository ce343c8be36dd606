"""``repvgg train``: the main job (train, convert, verify) on the digits default or an ImageFolder tree."""

from __future__ import annotations

import argparse
import json
from typing import Any

_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--model", dict(help="registered model name (default repvgg_a0; see `repvgg info`)")),
    ("--data", dict(help="ImageFolder root with train/ and val/ (default: the embedded digits data)")),
    ("--img-size", dict(type=int, help="input resolution (default 32 for digits, 224 for folders)")),
    ("--epochs", dict(type=int, help="training epochs (default 30)")),
    ("--batch-size", dict(type=int, help="global batch size over all processes (default 64)")),
    ("--lr", dict(type=float, help="base learning rate (default 0.1 x batch/256)")),
    ("--momentum", dict(type=float, help="SGD momentum (default 0.9)")),
    ("--weight-decay", dict(type=float, help="weight decay on kernels (default 1e-4)")),
    ("--warmup-epochs", dict(type=float, help="linear warm-up epochs (default 5 for >= 100 epochs, else 1)")),
    ("--label-smoothing", dict(type=float, help="label smoothing (default 0.1)")),
    ("--custom-l2", dict(action=argparse.BooleanOptionalAction,
                         help="decay the fused equivalent kernels (official custom L2)")),
    ("--ema-decay", dict(type=float, help="weight EMA decay, e.g. 0.9998 (default 0 = off)")),
    ("--mixup", dict(type=float, help="mixup alpha (timm; default 0 = off)")),
    ("--cutmix", dict(type=float, help="cutmix alpha (timm; default 0 = off)")),
    ("--auto-augment", dict(help="timm policy for folders: 'rand-m9-mstd0.5' (RandAugment) "
                                 "or 'original' (AutoAugment)")),
    ("--amp", dict(action=argparse.BooleanOptionalAction, help="mixed precision (CUDA only)")),
    ("--channels-last", dict(action=argparse.BooleanOptionalAction,
                             help="channels_last memory format (CUDA only; on CPU training stays contiguous)")),
    ("--grad-checkpointing", dict(action=argparse.BooleanOptionalAction,
                                  help="recompute activations to save memory")),
    ("--sync-bn", dict(action=argparse.BooleanOptionalAction, help="SyncBatchNorm across processes")),
    ("--weights", dict(help="initialise from a weights file (official/timm/own); "
                            "a head with another class count is re-initialised")),
    ("--workers", dict(type=int, help="data-loading worker processes (default 0)")),
    ("--seed", dict(type=int, help="random seed (default 0)")),
    ("--device", dict(help="auto, cpu, cuda or cuda:N (default auto)")),
    ("--output", dict(help="run folder (default runs/<model>-<data>-<time>)")),
    ("--resume", dict(help="continue exactly from a run folder or its last.pt")),
    ("--bad-images", dict(choices=["fail", "skip"],
                          help="unreadable images: fail naming the file (default) or skip and count")),
    ("--val-fraction", dict(type=float, help="digits validation fraction (default 0.2, fixed seed)")),
    ("--stop-after-steps", dict(type=int, help="save a resumable last.pt and exit after N steps of this invocation")),
    ("--log-interval", dict(type=int, help="steps between log lines when stderr is not a terminal (default 50)")),
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a multi-branch RepVGG, convert it, and verify the plain model",
        description="Train, convert with reparameterize_model, evaluate both models on the same data, "
                    "and write summary.json, metrics.jsonl, last.pt, best.pt, deploy.safetensors, "
                    "config.yaml and curves.png into the run folder. Precedence: defaults < the resumed "
                    "run's config < --config file < command-line flags.",
    )
    p.add_argument("--config", help="YAML or JSON file of options (keys as the flags, - or _)")
    p.add_argument("--spec", action="append", default=[], metavar="KEY=VALUE",
                   help="override a RepVGGSpec field, VALUE as JSON, e.g. --spec 'depths=[1,2,2,2,1]'")
    for flag, kwargs in _FLAGS:
        p.add_argument(flag, default=None, **kwargs)
    p.set_defaults(func=run)


def _parse_spec(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--spec expects KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"--spec {key}: value must be JSON (e.g. [1,2,2,2,1], true, 2), got {value!r}") from err
    return overrides


def flag_values(args: argparse.Namespace, flags: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The parsed values of ``flags`` by config field name (``None`` where a flag was not given)."""
    names = [flag.lstrip("-").replace("-", "_") for flag, _ in flags]
    return {name: getattr(args, name) for name in names}


def resolve_config(args: argparse.Namespace):
    """Merge defaults, a resumed run's config, a config file and the flags into a :class:`TrainConfig`."""
    from repvgg.training.config import TrainConfig, resolve_run_config

    config = resolve_run_config(TrainConfig, resume=args.resume, config_file=args.config,
                                flags=flag_values(args, _FLAGS))
    if args.spec:
        config = config.updated(model_overrides={**config.model_overrides, **_parse_spec(args.spec)})
    return config


def run(args: argparse.Namespace) -> int:
    from repvgg.training.classification import train

    summary = train(resolve_config(args))
    if summary.get("interrupted"):
        return 130
    print(json.dumps({k: summary[k] for k in ("model", "dataset", "epochs", "val_top1", "val_top1_deploy",
                                              "max_abs_diff", "prediction_agreement", "output")}, indent=2))
    return 0

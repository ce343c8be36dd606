"""``repvgg ablate``: the paper's branch ablation (Table 6, optionally Table 7 variants) on the same data."""

from __future__ import annotations

import argparse

from repvgg.cli.flags import bounded_int, config_command
from repvgg.cli.output import emit
from repvgg.cli.train import add_common_arguments, print_config, resolve_config
from repvgg.training.config import AblationConfig

#: Training options that belong to one run, not to an ablation of many.
_NOT_FLAGS = ("resume", "stop_after_steps", "seed")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = config_command(
        sub, "ablate", AblationConfig, run,
        help="train the same network with and without the 1x1/identity branches; compare",
        description="Runs the configurations of the paper's Table 6 (plain, 1x1, identity, full) with "
                    "several seeds through the `repvgg train` pipeline, checks the converted models are "
                    "identical in size, and writes ablation.json, ablation.md and two PNGs.",
        exclude=_NOT_FLAGS)
    p.add_argument("--configs", default="plain,1x1,identity,full",
                   help="comma-separated configurations: plain, 1x1, identity, full, identity_no_bn, post_bn")
    p.add_argument("--table7", action="store_true",
                   help="also run the Table 7 variants identity_no_bn and post_bn")
    p.add_argument("--seeds", type=bounded_int(1), default=2, help="seeds per configuration")
    p.add_argument("--table", action="store_true",
                   help="print the paper's Table 6 numbers next to the measured ones and whether the ranking agrees")
    add_common_arguments(p)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from repvgg.training.ablation import (PAPER_TOP1, ablation_table, ranking, ranking_agrees, run_ablation,
                                          write_ablation)

    config = resolve_config(args)
    if args.print_config:
        return print_config(config, args)
    assert isinstance(config, AblationConfig)  # the class add_parser gave config_command
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.table7:
        configs += [c for c in ("identity_no_bn", "post_bn") if c not in configs]
    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = Path(config.output) if config.output else Path("runs") / f"ablate-{config.model}-{stamp}"
    result = run_ablation(config, configs=configs, seeds=list(range(args.seeds)), output=output)
    files = write_ablation(result, output)
    text = (f"{ablation_table(result, with_paper=args.table)}\n\nconverted models identical in size: "
            f"{result.same_inference_cost} ({sorted(set(result.converted_params.values()))} params)\n")
    if args.table:
        order = ranking(result.rows)
        paper_order = sorted(PAPER_TOP1, key=PAPER_TOP1.__getitem__)
        agrees = ranking_agrees(result.rows)
        text += (f"ranking, worst to best: measured {' < '.join(order)}; paper {' < '.join(paper_order)}; "
                 f"agrees: {'n/a' if agrees is None else 'yes' if agrees else 'no'}\n")
    text += f"results: {files['json']}, {files['markdown']}, {files['loss_plot']}, {files['accuracy_plot']}"
    emit(args, {**result.as_dict(), "files": {k: str(v) for k, v in files.items()}}, text)
    return 0 if result.same_inference_cost else 1

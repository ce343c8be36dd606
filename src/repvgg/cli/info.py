"""``repvgg info``: parameters and multiply-adds of every registered model, before and after fusion."""

from __future__ import annotations

import argparse

from repvgg.cli.flags import image_size
from repvgg.cli.output import emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="table of every registered model: parameters and multiply-adds")
    p.add_argument("--img-size", type=image_size, default=224, help="input resolution for multiply-adds")
    p.add_argument("--models", default=None,
                   help="comma-separated model names or patterns such as 'repvgg_b*' (default: all registered)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from repvgg.nn.complexity import model_complexity
    from repvgg.nn.registry import canonical_name, get_spec, list_models
    from repvgg.report import markdown_table

    items = [item.strip() for item in (args.models or "*").split(",") if item.strip()]
    names = [name for item in items for name in (list_models(item) if any(c in item for c in "*?[") else [item])]
    if not names:
        raise ValueError(f"no registered model matches {args.models!r}; `repvgg info` lists them all")
    # unknown names fail with close matches before any work; each model once, named as registered
    specs = {canonical_name(name): get_spec(name) for name in names}
    rows, records = [], []
    for name, spec in specs.items():
        c = model_complexity(name, img_size=args.img_size)
        record = {"model": c.name, "depths": list(spec.depths), "width_multipliers": list(spec.width_multipliers),
                  "groups": spec.groups, "params_train": c.params_train, "params_deploy": c.params_deploy,
                  "macs_train": c.macs_train, "macs_deploy": c.macs_deploy, "img_size": args.img_size}
        records.append(record)  # --json: the counts themselves, not the table's rounded millions
        rows.append([c.name, "-".join(str(d) for d in spec.depths), "/".join(f"{m:g}" for m in spec.width_multipliers),
                     spec.groups, f"{c.params_train / 1e6:.2f}", f"{c.params_deploy / 1e6:.2f}",
                     f"{c.macs_train / 1e9:.2f}", f"{c.macs_deploy / 1e9:.2f}"])
    header = ["model", "depths", "a/b", "groups", "params train (M)", "params deploy (M)",
              f"GMACs train @{args.img_size}", f"GMACs deploy @{args.img_size}"]
    emit(args, records, markdown_table(header, rows))
    return 0

"""The paper's branch ablation (Table 6, plus the convertible Table 7 variants) on any data.

Each configuration trains the *same* network with different training-time branches, using the
``repvgg train`` pipeline with the same data, budget and seeds; only the block's branch switches differ.
Every configuration converts to the same plain network, which is checked (parameters and
multiply-adds of the converted models must be identical), so the inference cost is the same.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from repvgg.limits import brief, check_unique, parse_json
from repvgg.nn.complexity import count_macs, count_parameters
from repvgg.training.config import TrainConfig
from repvgg.nn.convert import reparameterize_model
from repvgg.nn.registry import build_model
from repvgg.report import markdown_table
from repvgg.serialization import write_json, write_text

__all__ = ["BRANCH_CONFIGS", "PAPER_TOP1", "AblationResult", "run_ablation", "converted_cost", "ranking"]

logger = logging.getLogger(__name__)

#: Block switches per configuration (RepVGGSpec fields). The first four are the paper's Table 6;
#: the last two are Table 7 variants that still convert to one conv.
BRANCH_CONFIGS: dict[str, dict[str, bool]] = {
    "plain": dict(use_identity=False, use_1x1=False),
    "1x1": dict(use_identity=False, use_1x1=True),
    "identity": dict(use_identity=True, use_1x1=False),
    "full": dict(use_identity=True, use_1x1=True),
    "identity_no_bn": dict(use_identity=True, use_1x1=True, identity_bn=False),
    "post_bn": dict(use_identity=True, use_1x1=True, post_bn=True),
}
TABLE6 = ("plain", "1x1", "identity", "full")

#: RepVGG-B0, ImageNet top-1, 120 epochs (paper Table 6).
PAPER_TOP1 = {"plain": 72.39, "1x1": 73.15, "identity": 74.79, "full": 75.14}

DESCRIPTIONS = {
    "plain": "3x3 only (no extra branch)",
    "1x1": "3x3 + 1x1",
    "identity": "3x3 + identity",
    "full": "3x3 + 1x1 + identity (RepVGG)",
    "identity_no_bn": "identity branch without BN",
    "post_bn": "no BN in branches, one BN after the sum",
}


@dataclass
class AblationResult:
    """Per-configuration statistics over seeds, and the per-run records they come from."""

    model: str
    dataset: str
    epochs: int
    seeds: list[int]
    rows: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    converted_params: dict[str, int] = field(default_factory=dict)
    converted_macs: dict[str, int] = field(default_factory=dict)

    @property
    def same_inference_cost(self) -> bool:
        return len(set(self.converted_params.values())) == 1 and len(set(self.converted_macs.values())) == 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "dataset": self.dataset, "epochs": self.epochs, "seeds": self.seeds,
            "configs": self.rows, "runs": self.runs, "converted_params": self.converted_params,
            "converted_macs": self.converted_macs, "same_inference_cost": self.same_inference_cost,
            "paper_top1": PAPER_TOP1, "ranking_agrees_with_paper": ranking_agrees(self.rows),
        }


def converted_cost(model: str, overrides: dict[str, Any], img_size: int, num_classes: int) -> tuple[int, int]:
    """Parameters and multiply-adds of the converted network for one configuration (meta device)."""
    with torch.device("meta"):
        net = build_model(model, num_classes=num_classes, **overrides)
    plain = reparameterize_model(net, inplace=True)
    return count_parameters(plain), count_macs(plain, (1, net.in_chans, img_size, img_size))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ranking(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Table 6 configurations from worst to best mean validation top-1."""
    measured = {r["config"]: r["val_top1_mean"] for r in rows if r["config"] in TABLE6}
    return sorted(measured, key=measured.__getitem__)


def ranking_agrees(rows: Sequence[dict[str, Any]]) -> bool | None:
    order = ranking(rows)
    if len(order) < len(TABLE6):
        return None
    return order == sorted(PAPER_TOP1, key=PAPER_TOP1.__getitem__)


def _trained_as_asked(run_dir: Path, config: TrainConfig) -> bool:
    """Whether the finished run in ``run_dir`` was trained with ``config`` (its ``config.yaml``): ``False`` if not and
    ``config.overwrite`` lets it be trained again.

    Raises:
        ValueError: it was trained otherwise, naming the settings, and ``config.overwrite`` is not set.
    """
    from repvgg.options import load_config_file
    from repvgg.training.classification import ClassificationTask
    from repvgg.training.run_folder import changed_fields

    saved = load_config_file(run_dir / "config.yaml")
    _, changed = changed_fields(saved, config, paths=ClassificationTask.input_fields)
    if not changed:
        return True
    if config.overwrite:
        logger.info("%s was trained with other %s: --overwrite, training it again", run_dir, ", ".join(changed))
        return False
    raise ValueError(f"{run_dir} holds a finished run trained with other " + ", ".join(
        f"{k} ({brief(saved.get(k), 40)}, not {brief(getattr(config, k), 40)})" for k in changed)
        + "; train it again with these settings (--overwrite), or choose another --output")


def run_ablation(
    base: TrainConfig,
    *,
    configs: Sequence[str] = TABLE6,
    seeds: Sequence[int] = (0, 1, 2),
    output: str | Path,
) -> AblationResult:
    """Train every configuration with every seed through ``repvgg train``; collect statistics.

    Runs go to ``output/<config>-seed<seed>/`` (each a complete ``repvgg train`` run folder); a
    finished run is reused when its ``summary.json`` exists and it was trained with the settings asked for now,
    so an interrupted ablation continues where it stopped. One trained otherwise is trained again with
    ``base.overwrite`` (``--overwrite``), else refused.

    Raises:
        ValueError: an unknown configuration, no seeds, or a finished run trained with other settings.
    """
    from repvgg.training.classification import train

    unknown = [c for c in configs if c not in BRANCH_CONFIGS]
    if unknown:
        raise ValueError(f"unknown ablation configuration(s) {unknown}; choose from {list(BRANCH_CONFIGS)}")
    if not configs:
        raise ValueError(f"at least one ablation configuration is needed; choose from {list(BRANCH_CONFIGS)}")
    if not seeds:
        raise ValueError("at least one seed is needed")
    check_unique(list(configs), "--configs")  # a repeated one would count every run of it twice
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; the ablation's runs and tables go into a folder: name one")
    result: AblationResult | None = None
    for name in configs:
        overrides = {**base.model_overrides, **BRANCH_CONFIGS[name]}
        for seed in seeds:
            run_dir = output / f"{name}-seed{seed}"
            summary_path = run_dir / "summary.json"
            if summary_path.is_file() and _trained_as_asked(run_dir, base.updated(
                    seed=seed, output=str(run_dir), model_overrides=overrides)):
                summary = parse_json(summary_path.read_text(), str(summary_path))
                logger.info("%s seed %d: reusing finished run in %s", name, seed, run_dir)
            else:
                logger.info("%s seed %d: training (%s)", name, seed, DESCRIPTIONS[name])
                # The ablation's own run folder: continue an interrupted run, or start over one that never
                # reached a checkpoint.
                resume = str(run_dir / "last.pt") if (run_dir / "last.pt").is_file() and not summary_path.is_file() \
                    else None
                config = base.updated(seed=seed, output=str(run_dir), model_overrides=overrides, resume=resume,
                                      overwrite=resume is None)
                summary = train(config)
                if summary.get("interrupted"):
                    raise KeyboardInterrupt(f"ablation interrupted during {run_dir}; run the same command to continue")
            history = [parse_json(line, str(run_dir / "metrics.jsonl"))
                       for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            if result is None:
                result = AblationResult(model=summary["model"], dataset=summary["dataset"], epochs=base.epochs,
                                        seeds=list(seeds))
            result.runs.append({
                "config": name, "seed": seed, "val_top1": summary["val_top1"],
                "val_top1_deploy": summary["val_top1_deploy"], "final_train_loss": history[-1]["train_loss"],
                "train_loss_curve": [row["train_loss"] for row in history],
                "max_abs_diff": summary["max_abs_diff"], "params_deploy": summary["params_deploy"],
                "output": str(run_dir),
            })
            img_size, classes = summary["img_size"], summary["num_classes"]
        assert result is not None  # seeds is not empty, so the first run set it
        params, macs = converted_cost(base.model, overrides, img_size, classes)
        result.converted_params[name] = params
        result.converted_macs[name] = macs
    assert result is not None
    for name in configs:
        runs = [r for r in result.runs if r["config"] == name]
        top1, top1_std = _mean_std([r["val_top1"] for r in runs])
        deploy, deploy_std = _mean_std([r["val_top1_deploy"] for r in runs])
        loss, loss_std = _mean_std([r["final_train_loss"] for r in runs])
        result.rows.append({
            "config": name, "description": DESCRIPTIONS[name], "seeds": len(runs),
            "val_top1_mean": top1, "val_top1_std": top1_std,
            "val_top1_deploy_mean": deploy, "val_top1_deploy_std": deploy_std,
            "final_train_loss_mean": loss, "final_train_loss_std": loss_std,
            "converted_params": result.converted_params[name], "converted_macs": result.converted_macs[name],
            "paper_top1": PAPER_TOP1.get(name),
        })
    return result


def ablation_table(result: AblationResult, *, with_paper: bool = False) -> str:
    """The markdown table of a result (optionally with the paper's Table 6 column)."""
    header = ["config", "training-time branches", "val top-1 (%)", "converted top-1 (%)", "final train loss",
              "converted params", "converted MMACs"]
    if with_paper:
        header.append("paper top-1 (B0, ImageNet)")
    rows = []
    for r in result.rows:
        row = [r["config"], r["description"], f"{r['val_top1_mean']:.2f} ± {r['val_top1_std']:.2f}",
               f"{r['val_top1_deploy_mean']:.2f} ± {r['val_top1_deploy_std']:.2f}",
               f"{r['final_train_loss_mean']:.4f} ± {r['final_train_loss_std']:.4f}",
               f"{r['converted_params']:,}", f"{r['converted_macs'] / 1e6:.2f}"]
        if with_paper:
            row.append(f"{r['paper_top1']:.2f}" if r["paper_top1"] is not None else "-")
        rows.append(row)
    return markdown_table(header, rows)


def plot_ablation(result: AblationResult, output: str | Path) -> tuple[Path, Path]:
    """``ablation_loss.png`` (mean training-loss curve per configuration) and ``ablation_accuracy.png``."""
    from repvgg.plots import pyplot, save_figure

    plt = pyplot()
    output = Path(output)
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in result.rows:
        curves = [r["train_loss_curve"] for r in result.runs if r["config"] == row["config"]]
        mean = [statistics.fmean(vals) for vals in zip(*curves)]
        ax.plot(range(1, len(mean) + 1), mean, label=row["description"])
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"training loss (mean of {len(result.seeds)} seeds)")
    ax.set_title(f"{result.model} on {result.dataset}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    loss_path = save_figure(fig, output / "ablation_loss.png")

    # Points with error bars and every seed, not bars: a bar's length would claim a zero the axis does not start at.
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["config"] for r in result.rows]
    means = [r["val_top1_mean"] for r in result.rows]
    stds = [r["val_top1_std"] for r in result.rows]
    for i, name in enumerate(names):
        seeds = [r["val_top1"] for r in result.runs if r["config"] == name]
        ax.scatter([i] * len(seeds), seeds, s=14, color="tab:gray", alpha=0.6, zorder=2,
                   label="one seed" if i == 0 else None)
    ax.errorbar(range(len(names)), means, yerr=stds, fmt="o", capsize=5, color="tab:blue", zorder=3,
                label="mean ± std")
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel("validation top-1 (%)")
    ax.legend(fontsize=8)
    ax.set_title(f"{result.model}, {result.epochs} epochs, {len(result.seeds)} seeds")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    acc_path = save_figure(fig, output / "ablation_accuracy.png")
    return loss_path, acc_path


def write_ablation(result: AblationResult, output: str | Path) -> dict[str, Path]:
    """``ablation.json``, ``ablation.md`` and the two PNGs in ``output``."""
    output = Path(output)
    json_path = write_json(output / "ablation.json", result.as_dict())
    md_path = write_text(output / "ablation.md", ablation_table(result, with_paper=True) + "\n")
    loss_png, acc_png = plot_ablation(result, output)
    return {"json": json_path, "markdown": md_path, "loss_plot": loss_png, "accuracy_plot": acc_png}

"""Baselines by name (torchvision and timm), their conv-BN folding, their counts against torchvision's metadata, and
the arithmetic of the paper-claims table. Nothing here depends on the machine's speed."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import randomize_bn, relative_error
from repvgg.nn.baselines import baseline, check_baseline_name
from repvgg.nn.fusion import fuse_conv_bn, is_batchnorm
from repvgg.perf.bench import BenchConfig, run_benchmark
from repvgg.perf.claims import (CLAIMS, Claim, ModelMeasurement, claim_ratio, density_ratio, evaluate_claims, judge,
                                models_of, published_top1)


def test_baselines_are_named_as_torchvision_and_timm_name_them() -> None:
    assert check_baseline_name("efficientnet_b0") == "efficientnet_b0"
    assert check_baseline_name("timm:resnet18") == "timm:resnet18"
    with pytest.raises(ValueError, match="efficientnet_b0") as err:  # the close matches are listed
        check_baseline_name("efficientnet_b00")
    assert "timm:NAME" in str(err.value)
    with pytest.raises(ValueError, match="timm:resnet18"):
        check_baseline_name("timm:resnet188")
    with pytest.raises(ValueError, match="regnet_x_3_2gf"):
        BenchConfig(baselines=("regnet_x_3_2g",)).resolved()  # refused before any work


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnet_x_400mf", "mobilenet_v3_small", "timm:efficientnet_b0",
                                  "timm:regnetx_002"])
def test_new_baselines_fold_every_conv_bn_pair_without_changing_the_output(name: str) -> None:
    torch.manual_seed(0)
    unfused = randomize_bn(baseline(name, fuse=False)).eval()
    fused = fuse_conv_bn(unfused)  # what baseline(name) does, on the model with random BN statistics
    assert sum(is_batchnorm(m) for m in unfused.modules()) > 10
    assert sum(is_batchnorm(m) for m in fused.modules()) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(fused(x), unfused(x)) <= 1e-4


def test_bench_counts_match_torchvisions_metadata() -> None:
    """`repvgg bench --baselines efficientnet_b0,regnet_x_3_2gf,vgg16`, briefly: the folded baselines' parameters
    and multiply-adds within 2% of torchvision's own (builders that need no weights file)."""
    from torchvision.models import get_model_weights

    config = BenchConfig(models=(), baselines=("efficientnet_b0", "regnet_x_3_2gf", "vgg16"),
                         peer=False, batch_size=1, warmup=0, rounds=1, latency=False, memory=False, fast=False,
                         reference_conv=False)
    result = run_benchmark(config)
    for name in config.baselines:
        row = result.row(name, "fused")
        meta = get_model_weights(name).DEFAULT.meta
        assert row.macs / 1e9 == pytest.approx(meta["_ops"], rel=0.02), name
        assert row.params == pytest.approx(meta["num_params"], rel=0.02), name  # BN folded: a little fewer
        assert row.throughput > 0


def test_a_claim_is_judged_from_its_measured_ratio() -> None:
    faster = Claim("A is 2x as fast as B", "throughput", "a", "b", 2.0, "faster")
    assert judge(faster, 2.5) == "holds" and judge(faster, 1.8) == "holds"  # 90% of the margin is enough
    assert judge(faster, 1.5) == "direction only" and judge(faster, 0.99) == "does not hold"
    assert judge(faster, None) == "not measured" and judge(faster, math.nan) == "not measured"
    slightly = Claim("A runs slightly faster", "throughput", "a", "b", 1.0, "faster")
    assert judge(slightly, 1.01) == "holds" and judge(slightly, 1.0) == "does not hold"
    fewer = Claim("A has fewer parameters", "params", "a", "b", 1.0, "fewer")
    assert judge(fewer, 0.99) == "holds" and judge(fewer, 1.0) == "does not hold"
    about = Claim("A has 58% of B's parameters", "params", "a", "b", 0.58, "about")
    assert judge(about, 0.60) == "holds" and judge(about, 0.62) == "does not hold"


def test_claim_ratios_come_from_the_measurements() -> None:
    models = {"a": ModelMeasurement("a", 224, params=50, macs=300, throughput=30.0),
              "b": ModelMeasurement("b", 224, params=100, macs=100, throughput=10.0)}
    assert claim_ratio(Claim("", "throughput", "a", "b", 2, "faster"), models, None, {}) == 3.0
    assert claim_ratio(Claim("", "macs", "a", "b", 3, "about"), models, None, {}) == 3.0
    assert claim_ratio(Claim("", "params", "a", "b", 1, "fewer"), models, None, {}) == 0.5
    assert claim_ratio(Claim("", "throughput", "a", "missing", 2, "faster"), models, None, {}) is None
    seg = Claim("", "segmentation throughput", "x", "y", 1.62, "faster")
    assert claim_ratio(seg, models, None, {"x": 3.0, "y": 2.0}) == 1.5
    rows = [{"operator": "dense 3x3", "runtime": "r", "gflops": 80.0},
            {"operator": "1x1", "runtime": "r", "gflops": 40.0},
            {"operator": "depthwise 3x3", "runtime": "r", "gflops": 10.0},
            {"operator": "dense 3x3", "runtime": "other", "gflops": 1.0}]
    assert density_ratio(rows, "r") == pytest.approx(80 / 20)  # over the geometric mean of the others
    assert density_ratio(rows, "other") is None  # nothing to compare with
    results = evaluate_claims([Claim("", "throughput", "a", "b", 2, "faster")], models, None, {})
    assert results[0].measured == 3.0 and results[0].status == "holds"


def test_every_claim_names_models_this_package_can_build() -> None:
    from repvgg.nn.registry import MODEL_SPECS

    names = models_of(CLAIMS)
    assert {"repvgg_a0", "resnet18", "efficientnet_b3", "regnet_x_3_2gf", "vgg16"} <= set(names)
    for name in names:
        assert name in MODEL_SPECS or check_baseline_name(name) == name
    assert published_top1("repvgg_a0") == (72.41, "the paper (120 epochs)")
    top1, source = published_top1("resnet50")
    assert top1 == pytest.approx(76.13) and "IMAGENET1K_V1" in source

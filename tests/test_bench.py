"""The benchmark harness: interleaving, warm-up, medians, memory tracking, fused baselines, the report.

Nothing here asserts a speed: timings on a shared machine are noise. The harness logic is tested with
fake clocks and tiny models.
"""

from __future__ import annotations

import copy

import json

import pytest
import torch
from torch import nn

from conftest import randomize_bn, relative_error
from repvgg import create_model, reparameterize_model
from repvgg.nn.fusion import count_conv_bn_pairs, fuse_conv_bn
from repvgg.perf.bench import BenchConfig, BenchResult, BenchRow, check_targets, run_benchmark
from repvgg.plots import plot_throughput as plot_results
from repvgg.report import bench_table as results_table
from repvgg.cli import main
from repvgg.cli.flags import parse_list
from repvgg.measure.memory import LiveTensorTracker, peak_forward_memory
from repvgg.measure.timing import TimingResult, time_interleaved


def _recorder(log: list[str], name: str):
    return lambda: log.append(name)


def test_rounds_interleave_after_warmup_in_order() -> None:
    calls: list[str] = []
    fns = {n: _recorder(calls, n) for n in "ABC"}
    results = time_interleaved(fns, warmup=2, rounds=3, timer=lambda fn: (fn(), 1.0)[1])
    assert calls == list("ABC") * 2 + list("ABC") * 3  # warm-up rounds, then timed rounds, interleaved
    assert {n: len(r.samples) for n, r in results.items()} == {"A": 3, "B": 3, "C": 3}
    assert all(r.warmup == 2 for r in results.values())


def test_explicit_order_and_progress_callback() -> None:
    calls: list[str] = []
    seen: list[tuple[int, int]] = []
    fns = {n: _recorder(calls, n) for n in "ABC"}
    time_interleaved(fns, warmup=0, rounds=2, order=["C", "A", "B"], timer=lambda fn: (fn(), 0.0)[1],
                     on_round=lambda i, n: seen.append((i, n)))
    assert calls == list("CAB") * 2
    assert seen == [(0, 2), (1, 2)]


def test_median_and_throughput_come_from_the_timer_samples() -> None:
    # The fake clock hands out these durations in call order: A gets 1, 9, 3 and B 2, 2, 100.
    durations = iter([1.0, 2.0, 9.0, 2.0, 3.0, 100.0])
    results = time_interleaved({"A": lambda: None, "B": lambda: None}, warmup=1, rounds=3,
                               timer=lambda fn: (fn(), next(durations))[1])
    assert results["A"].samples == [1.0, 9.0, 3.0] and results["A"].median == 3.0
    assert results["B"].median == 2.0  # one descheduled round does not move the median
    assert results["B"].throughput(8) == pytest.approx(4.0)
    assert TimingResult("x", [1.0, 1.0, 1.0, 1.0]).spread() == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"warmup": -1, "rounds": 1}, "warmup"),
    ({"warmup": 0, "rounds": 0}, "rounds"),
    ({"warmup": 0, "rounds": 1, "order": ["A"]}, "order"),
    ({"warmup": 0, "rounds": 1, "pause_s": -1.0}, "pause_s"),
])
def test_harness_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        time_interleaved({"A": lambda: None, "B": lambda: None}, **kwargs)


def test_tracker_counts_new_storages_and_frees() -> None:
    tracker = LiveTensorTracker()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500)  # 2000 bytes
        view = a[10:20]  # a view allocates nothing
        a.add_(1)  # neither does an in-place op
        del a, view
        c = torch.empty(250)  # 1000 bytes, after a's 4000 were freed
    assert tracker.allocations == 3
    assert tracker.peak == 6000
    assert tracker.current == 3000
    del b, c


def test_tracker_ignores_preexisting_tensors() -> None:
    weight = torch.randn(100)
    tracker = LiveTensorTracker()
    tracker.ignore(weight)
    with tracker:
        weight.mul_(2)
        out = weight * 2  # 400 new bytes
    assert tracker.peak == 400
    del out


def test_multi_branch_model_peaks_higher_than_its_fused_copy() -> None:
    train = randomize_bn(create_model("repvgg_tiny", num_classes=10)).eval()
    plain = reparameterize_model(train)
    x = torch.randn(2, 3, 32, 32)
    peak_train, peak_plain = peak_forward_memory(train, x), peak_forward_memory(plain, x)
    assert peak_plain > 0
    assert peak_train > 1.2 * peak_plain


def test_fuse_conv_bn_on_a_resnet_is_exact_and_leaves_no_bn() -> None:
    import torchvision

    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    assert count_conv_bn_pairs(model) == 20
    fused = fuse_conv_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert count_conv_bn_pairs(fused) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) < 1e-5
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    # a SyncBatchNorm copy (a --sync-bn run) fuses the same pairs to the same function
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    fused_sync = fuse_conv_bn(sync)
    assert count_conv_bn_pairs(sync) == 20 and count_conv_bn_pairs(fused_sync) == 0
    with torch.no_grad():
        assert relative_error(fused_sync(x), model(x)) < 1e-5


def test_fuse_conv_bn_keeps_bn_whose_conv_output_is_shared() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize_bn(Shared()).eval()
    fused = fuse_conv_bn(model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) < 1e-6


def _row(model: str, form: str, throughput: float, flop_rate: float | None = None) -> BenchRow:
    return BenchRow(model, form, "eager", "float32", 1, 1, 8, throughput=throughput, flop_rate=flop_rate)


A0_TARGETS = {"plain_vs_train": 1.4, "fast_vs_timm": 1.3, "fast_vs_baseline_fast": 1.3, "flop_rate": 0.7}


def test_check_targets_computes_the_promised_ratios() -> None:
    config = BenchConfig(models=("repvgg_a0",), baselines=("resnet18",)).resolved()
    result = BenchResult(config, {}, rows=[
        _row("repvgg_a0", "train", 100.0), _row("repvgg_a0", "plain", 150.0),
        _row("repvgg_a0", "fast", 180.0, flop_rate=0.65), _row("repvgg_a0", "timm", 150.0),
        _row("resnet18", "fused", 90.0), _row("resnet18", "fast", 120.0),
    ])
    measured = check_targets(result, {"repvgg_a0": A0_TARGETS})
    checks = {c.name.split(": ")[-1] if ": " in c.name else c.name: c for c in measured}
    plain_vs_train = checks["converted / training-time throughput"]
    assert plain_vs_train.value == pytest.approx(1.5) and plain_vs_train.met is True
    assert checks["fast path / timm re-parameterized (eager)"].value == pytest.approx(1.2)
    assert checks["fast path / timm re-parameterized (eager)"].met is False
    assert checks["repvgg_a0 / resnet18, both through the fast path"].value == pytest.approx(1.5)
    assert checks["fast path GFLOP/s / single 3x3 conv GFLOP/s"].met is False
    assert all(c.threshold is None for c in check_targets(result))  # without targets: information only
    assert "missed" in results_table(BenchResult(config, {}, rows=result.rows, targets=list(checks.values())))


def test_config_validates_names_and_fills_device_defaults() -> None:
    cfg = BenchConfig(models=("RepVGG-A0",)).resolved()
    assert cfg.models == ("repvgg_a0",) and cfg.batch_size == 8 and cfg.rounds >= 1 and cfg.pause_s > 0
    with pytest.raises(ValueError, match="unknown model"):
        BenchConfig(models=("repvgg_a9",)).resolved()
    with pytest.raises(ValueError, match="baseline"):
        BenchConfig(baselines=("resnet9",)).resolved()
    with pytest.raises(ValueError, match="dtypes"):
        BenchConfig(dtypes=("float8",)).resolved()
    assert parse_list(" a, b ,") == ("a", "b") and parse_list("none") == ()


def _tiny_config(**overrides) -> BenchConfig:
    base = {"models": ("repvgg_tiny",), "baselines": (), "peer": False, "batch_size": 2, "img_size": 32,
            "warmup": 1, "rounds": 2, "candidates": ("eager", "channels_last"), "pause_s": 0.0, "num_classes": 10}
    return BenchConfig(**(base | overrides))


def test_run_benchmark_end_to_end_on_a_tiny_model(tmp_path) -> None:
    result = run_benchmark(_tiny_config())
    forms = {(r.model, r.form) for r in result.rows}
    assert {("repvgg_tiny", "train"), ("repvgg_tiny", "plain"), ("repvgg_tiny", "fast")} <= forms
    train, plain = result.row("repvgg_tiny", "train"), result.row("repvgg_tiny", "plain")
    assert train.params > plain.params and train.macs > plain.macs
    assert train.peak_memory_bytes > plain.peak_memory_bytes
    conv = next(r for r in result.rows if r.form == "conv3x3")
    assert conv.flop_rate == pytest.approx(1.0)
    for r in result.rows:
        assert r.throughput > 0 and r.gflops == pytest.approx(2 * r.macs * r.throughput / 1e9)
    assert result.fast_paths["repvgg_tiny/float32"]["backend"] in ("eager", "channels_last")
    data = json.loads(json.dumps(result.as_dict()))
    assert len(data["rows"]) == len(result.rows) and data["environment"]["torch"] == torch.__version__
    png = plot_results(result, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fast_only_times_the_chosen_runtime_of_each_model() -> None:
    result = run_benchmark(_tiny_config(baselines=("resnet18",), fast_only=True, latency=False, memory=False))
    assert {(r.model, r.form) for r in result.rows} == {("repvgg_tiny", "fast"), ("resnet18", "fast"),
                                                        (next(r.model for r in result.rows if r.form == "conv3x3"),
                                                         "conv3x3")}
    for name in ("repvgg_tiny", "resnet18"):  # each chosen with one runtime's copy of the model held at a time
        assert "timed alone" in result.fast_paths[f"{name}/float32"]["reason"]
    with pytest.raises(ValueError, match="cannot go with --no-fast"):
        _tiny_config(fast=False, fast_only=True)


def test_cli_bench_prints_table_and_writes_json_and_plot(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "--models", "repvgg_tiny", "--baselines", "none", "--no-peer", "--img-size", "32",
                 "--batch-size", "2", "--warmup", "0", "--rounds", "1", "--candidates", "eager",
                 "--no-latency", "--json-out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| repvgg_tiny" in stdout and "converted / training-time" in stdout
    assert json.loads(out.read_text())["config"]["models"] == ["repvgg_tiny"]
    assert out.with_suffix(".png").exists()


def test_cli_bench_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--models", "repvgg_a9"]) == 2
    assert "unknown model 'repvgg_a9'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, told", [
    (["--models", "repvgg_a0,RepVGG-A0"], "--models names repvgg_a0 twice ('repvgg_a0' and 'RepVGG-A0')"),
    (["--baselines", "resnet18,resnet18"], "--baselines names resnet18 twice ('resnet18')"),
    (["--dtypes", "float32,float32"], "--dtypes names float32 twice")])
def test_cli_bench_refuses_a_model_or_dtype_named_twice(flags: list[str], told: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *flags]) == 2  # it would be timed and listed twice
    assert told in capsys.readouterr().err



def test_int8_rows_for_every_runtime_with_their_deviation(monkeypatch: pytest.MonkeyPatch) -> None:
    from repvgg.perf import bench
    from repvgg.measure.environment import CPUFeatures

    monkeypatch.setattr(bench, "native_bf16", lambda device: False)
    monkeypatch.setattr(bench, "cpu_features", lambda: CPUFeatures(avx2=True))
    result = run_benchmark(_tiny_config(dtypes=("float32", "bfloat16", "int8"), candidates=None, latency=False,
                                        memory=False, reference_conv=False))  # the reference: end to end above
    int8 = [r for r in result.rows if r.dtype == "int8"]
    assert {r.backend for r in int8} >= {"onnxruntime"} and all(r.form in ("fast", "runtime") for r in int8)
    assert all(r.throughput > 0 and r.deviation is not None and 0 <= r.agreement <= 1 for r in int8)
    assert result.accepted(int8[0]) is None  # random weights: no accuracy guard here
    assert "AVX2" in result.skipped["bfloat16"] or "not supported" in result.skipped["bfloat16"]
    assert "calibrated on generated images" in results_table(result)


def test_the_fastest_accepted_row_needs_its_guard() -> None:
    config = BenchConfig(models=("repvgg_a0",), baselines=(), dtypes=("float32", "int8")).resolved()
    rows = [_row("repvgg_a0", "timm", 50.0), _row("repvgg_a0", "fast", 60.0)]
    fast8 = _row("repvgg_a0", "fast", 120.0)
    fast8.dtype, fast8.backend = "int8", "onnxruntime"
    result = BenchResult(config, {}, rows=[*rows, fast8])
    check = next(c for c in check_targets(result, {"repvgg_a0": {"fastest_vs_timm": 1.5}}) if "fastest" in c.name)
    assert check.value == pytest.approx(1.2) and check.met is False  # INT8 unchecked: float32 is the fastest accepted
    result.guards["repvgg_a0/int8/onnxruntime"] = {"passed": True, "detail": "agreeing on 100% of 360 images"}
    check = next(c for c in check_targets(result, {"repvgg_a0": {"fastest_vs_timm": 1.5}}) if "fastest" in c.name)
    assert check.value == pytest.approx(2.4) and check.met is True and "100%" in check.note
    result.guards["repvgg_a0/int8/onnxruntime"]["passed"] = False
    check = next(c for c in check_targets(result) if "fastest" in c.name)
    assert check.value == pytest.approx(1.2)

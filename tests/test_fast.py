"""The fast inference path: same function as the eager model, whatever runtime it picks, on any nn.Module."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from torch import nn

from conftest import randomize_bn, relative_error
from repvgg import create_model
from repvgg.perf.fast import (
    CANDIDATES,
    Candidate,
    default_candidates,
    optimize_for_inference,
    output_deviation,
)


@pytest.fixture(scope="module")
def tiny_train() -> nn.Module:
    return randomize_bn(create_model("repvgg_tiny", num_classes=10), seed=1)


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_default_candidates_are_equivalent_and_model_is_untouched(tiny_train: nn.Module) -> None:
    tiny_train.train()
    x = torch.randn(4, 3, 32, 32)
    runner = optimize_for_inference(tiny_train, x, rounds=2, warmup=1, pause_s=0.0)
    assert tiny_train.training and not tiny_train.deploy  # still the caller's training-time model
    ok = [r for r in runner.reports if r.status == "ok"]
    assert {r.name for r in ok} >= {"eager", "channels_last", "torchscript", "onnxruntime"}
    assert all(r.deviation <= 1e-4 and r.median_s > 0 for r in ok)
    assert runner.backend in {r.name for r in ok}
    assert runner.backend == min(ok, key=lambda r: r.median_s).name
    for batch in (1, 4, 7):  # other batch sizes than the example's
        x = torch.randn(batch, 3, 32, 32)
        assert relative_error(runner(x), _eager(tiny_train, x)) <= 1e-4
    tiny_train.eval()


@pytest.mark.parametrize("name", ["eager", "channels_last", "torchscript", "onnxruntime"])
def test_each_cpu_candidate_reproduces_the_eager_model(tiny_train: nn.Module, name: str) -> None:
    x = torch.randn(3, 3, 32, 32)
    runner = optimize_for_inference(tiny_train, x, candidates=[name])
    assert runner.backend == name
    y = torch.randn(2, 3, 32, 32)
    assert relative_error(runner(y), _eager(tiny_train, y)) <= 1e-4


def test_works_for_a_torchvision_resnet() -> None:
    import torchvision

    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    runner = optimize_for_inference(model, x, candidates=["eager", "onnxruntime"], rounds=2, pause_s=0.0)
    assert relative_error(runner(x), _eager(model, x)) <= 1e-4


def _fake(build):
    return Candidate(build, ("cpu",), ())


def test_the_measured_fastest_candidate_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Conv2d(3, 4, 3)

    def slow(ctx):
        m = ctx.model()
        return lambda x: (time.sleep(0.02), m(x))[1]

    monkeypatch.setitem(CANDIDATES, "slow", _fake(slow))
    monkeypatch.setitem(CANDIDATES, "fast", _fake(lambda ctx: ctx.model()))
    runner = optimize_for_inference(model, torch.randn(1, 3, 8, 8), candidates=["slow", "fast"],
                                    warmup=0, rounds=3, pause_s=0.0)
    assert runner.backend == "fast"
    assert "fastest median" in runner.reason


def _busy(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_with_cores_shared_the_candidate_that_costs_least_cpu_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server shares its cores: a runtime that keeps them busy (here, computing for 3 ms of CPU) loses to one that
    takes longer but leaves them free (sleeping 10 ms); a process that does nothing else takes the faster one. (Both
    answer the example's output computed once: the model's own threads would otherwise spin while the idle one
    sleeps.)"""
    from repvgg.io import onnx_run

    model, example = nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        output = model(example)
    monkeypatch.setitem(CANDIDATES, "busy", _fake(lambda ctx: lambda x: (_busy(0.003), output)[1]))
    monkeypatch.setitem(CANDIDATES, "idle", _fake(lambda ctx: lambda x: (time.sleep(0.01), output)[1]))
    chosen = {}
    for shared in (False, True):
        monkeypatch.setattr(onnx_run, "_sharing", {"cores": shared})
        chosen[shared] = optimize_for_inference(model, example, candidates=["busy", "idle"], warmup=0, rounds=3,
                                                pause_s=0.0)
    assert chosen[False].backend == "busy" and "fastest median" in chosen[False].reason
    assert chosen[True].backend == "idle" and "least CPU time" in chosen[True].reason, chosen[True].reason


def test_shared_cores_stop_the_runtimes_spinning_and_pinning(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from repvgg.io import onnx_run

    path = tmp_path / "conv.onnx"
    torch.onnx.export(nn.Conv2d(3, 4, 3).eval(), torch.randn(1, 3, 8, 8), path, dynamo=False)
    for shared in (False, True):
        monkeypatch.setattr(onnx_run, "_sharing", {"cores": shared})
        options = onnx_run.onnxruntime_session(path).get_session_options()
        if shared:
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        else:  # ONNX Runtime's default: its workers spin
            with pytest.raises(RuntimeError, match="allow_spinning"):
                options.get_session_config_entry("session.intra_op.allow_spinning")
        if shared and importlib.util.find_spec("openvino") is not None:  # unshared, OpenVINO pins as it likes
            assert onnx_run.openvino_model(path).get_property("ENABLE_CPU_PINNING") is False


def test_one_at_a_time_holds_one_runtime_besides_the_fastest_so_far(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Conv2d(3, 4, 3)
    alive: list[int] = []
    peak: list[int] = []

    class Copy:
        """A runtime's copy of the model that counts how many copies are alive."""

        def __init__(self, ctx, delay: float) -> None:
            self.model, self.delay = ctx.model(), delay
            alive.append(1)
            peak.append(len(alive))

        def __call__(self, x):
            time.sleep(self.delay)
            return self.model(x)

        def __del__(self) -> None:
            alive.pop()

    for name, delay in (("slow", 0.02), ("fast", 0.0), ("slower", 0.04)):
        monkeypatch.setitem(CANDIDATES, name, _fake(lambda ctx, d=delay: Copy(ctx, d)))
    runner = optimize_for_inference(model, torch.randn(1, 3, 8, 8), candidates=["slow", "fast", "slower"],
                                    warmup=0, rounds=3, pause_s=0.0, one_at_a_time=True)
    assert runner.backend == "fast" and runner.alternatives == {} and "timed alone" in runner.reason
    assert max(peak) <= 2 and len(alive) == 1  # the fastest so far and the one being timed; then the winner only
    assert all(r.median_s is not None for r in runner.reports)


def test_wrong_or_broken_candidates_are_ruled_out(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Conv2d(3, 4, 3)

    def broken(ctx):
        raise RuntimeError("no such runtime here")

    def missing(ctx):
        raise ImportError("nope", name="some_runtime")

    monkeypatch.setitem(CANDIDATES, "wrong", _fake(lambda ctx: (lambda x: ctx.model()(x) * 1.01)))
    monkeypatch.setitem(CANDIDATES, "broken", _fake(broken))
    monkeypatch.setitem(CANDIDATES, "missing", _fake(missing))
    runner = optimize_for_inference(model, torch.randn(2, 3, 8, 8),
                                    candidates=["wrong", "broken", "missing", "cuda_graph", "eager"])
    status = {r.name: r.status for r in runner.reports}
    assert status == {"wrong": "inaccurate", "broken": "failed", "missing": "unavailable",
                      "cuda_graph": "unavailable", "eager": "ok"}
    assert runner.backend == "eager"
    with pytest.raises(ValueError, match="no candidate reproduces"):
        optimize_for_inference(model, torch.randn(2, 3, 8, 8), candidates=["wrong"])


def test_measure_false_takes_the_first_working_candidate_in_preference_order(tiny_train: nn.Module) -> None:
    runner = optimize_for_inference(tiny_train, torch.randn(2, 3, 32, 32), candidates=["eager", "torchscript"],
                                    measure=False)
    assert runner.backend == "torchscript"  # preferred over eager in CANDIDATES order
    assert [r.name for r in runner.reports] == ["torchscript"]  # the rest was not even built


def test_argument_errors(tiny_train: nn.Module) -> None:
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown candidate"):
        optimize_for_inference(tiny_train, x, candidates=["tensorrt9"])
    with pytest.raises(TypeError, match="nn.Module"):
        optimize_for_inference(lambda t: t, x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsupported dtype"):
        optimize_for_inference(tiny_train, x, dtype=torch.float64)
    assert default_candidates("cpu")[-1] == "eager" and "cuda_graph" not in default_candidates("cpu")
    assert "cuda_graph" in default_candidates("cuda") and "onnxruntime" not in default_candidates("cuda")


def test_output_deviation_compares_nested_outputs() -> None:
    a = [torch.ones(3), torch.full((2,), 2.0)]
    assert output_deviation(a, a) == 0.0
    assert output_deviation([torch.ones(3), torch.full((2,), 2.2)], a) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="shapes"):
        output_deviation(torch.ones(2), torch.ones(3))


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bfloat16 convolutions on this CPU")
def test_reduced_precision_is_used_only_when_asked_and_checked_loosely(tiny_train: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    runner = optimize_for_inference(tiny_train, x, dtype=torch.bfloat16, candidates=["eager", "onnxruntime"],
                                    check_accuracy=False)
    assert runner.dtype == torch.bfloat16 and runner.backend == "eager"  # ONNX Runtime is float32 only
    assert {r.name: r.status for r in runner.reports}["onnxruntime"] == "unavailable"
    assert relative_error(runner(x).float(), _eager(tiny_train, x)) <= 5e-2


def test_core_import_pulls_in_no_optional_runtime(tmp_path) -> None:
    """``import repvgg`` loads none of the optional runtimes; listing a folder's images and telling the model's task
    (what a cluster's driver does before its cluster starts) load no torchvision; plain ``predict`` of a classifier
    loads neither Ray (``--ray`` alone does) nor torchvision and timm (their import costs about 2 s of CPU a start)."""
    import sys

    from conftest import run_process

    code = ("import sys, repvgg; heavy = {'onnx', 'onnxruntime', 'onnxscript', 'timm', 'torchvision', 'matplotlib',"
            " 'ray'};"
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}));"
            "from PIL import Image; from repvgg.cli import main; folder = sys.argv[1];"
            "repvgg.save_weights(repvgg.create_model('repvgg_tiny', num_classes=3), folder + '/m.safetensors');"
            "Image.new('RGB', (40, 40)).save(folder + '/a.png');"
            "from repvgg.predict.inputs import expand_inputs; from repvgg.detection.predict import detection_artifact;"
            "from repvgg.segmentation.predict import segmentation_artifact; model = folder + '/m.safetensors';"
            "print(len(expand_inputs([folder])), detection_artifact(model), segmentation_artifact(model),"
            " 'torchvision' in sys.modules);"
            "print(main(['predict', folder + '/m.safetensors', folder + '/a.png']), 'ray' in sys.modules,"
            " sorted({'torchvision', 'timm'} & {m.split('.')[0] for m in sys.modules}))")
    result = run_process([sys.executable, "-c", code, str(tmp_path)], timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "[]" and lines[1] == "1 None None False", result.stdout[-2000:]
    assert lines[-1] == "0 False []", result.stdout[-2000:]


def test_the_image_extensions_are_torchvisions() -> None:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from repvgg.training.images import IMAGE_EXTENSIONS

    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS


def test_openvino_candidate_when_installed(tiny_train: nn.Module) -> None:
    pytest.importorskip("openvino")
    x = torch.randn(3, 3, 32, 32)
    runner = optimize_for_inference(tiny_train, x, candidates=["openvino"])
    assert runner.backend == "openvino"
    assert relative_error(runner(x), _eager(tiny_train, x)) <= 1e-4


def test_openvino_models_destroyed_out_of_order_leave_signals_working(tmp_path) -> None:
    """OpenVINO swaps the thread's alternate signal stack per compiled model; destroyed out of order, the thread
    was left on freed memory and the next handled signal (a DataLoader worker exiting, Ctrl-C) crashed."""
    pytest.importorskip("openvino")
    import sys

    from conftest import run_process

    code = f"""
import gc, os, signal, torch
from repvgg.io.onnx_run import openvino_model
path = {str(tmp_path / "conv.onnx")!r}
torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),), path, dynamo=False)
first, second = openvino_model(path), openvino_model(path)
del first; gc.collect()
del second; gc.collect()
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
for _ in range(3):
    os.kill(os.getpid(), signal.SIGUSR1)
print(len(got))
"""
    result = run_process([sys.executable, "-c", code], timeout=240)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.strip() == "3"


class _Resized(nn.Module):
    """A resize to 16 x 16 (any input size), then a conv: the resize is the identity on a 16 x 16 input."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode, self.conv = mode, nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        align = False if self.mode in ("bilinear", "bicubic") else None
        return self.conv(nn.functional.interpolate(x, size=(16, 16), mode=self.mode, align_corners=align))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript-based exporter
@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_openvino_drops_a_resize_to_the_same_size_exactly(tmp_path, mode: str) -> None:
    pytest.importorskip("openvino")
    from repvgg.io.onnx_run import openvino_model

    torch.manual_seed(0)
    model, path = _Resized(mode).eval(), tmp_path / "resized.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 16, 16),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {2: "h", 3: "w"}})

    def interpolations(compiled) -> int:
        return sum(op.get_rt_info()["layerType"].astype(str) == "Interpolate"
                   for op in compiled.get_runtime_model().get_ordered_ops())

    for shape, dropped in (((1, 3, 16, 16), True), ((1, 3, 24, 20), False)):
        x = torch.rand(*shape)
        compiled = openvino_model(path, shape=list(shape))
        got = torch.from_numpy(next(iter(compiled(x.numpy()).values())))
        with torch.no_grad():
            expected = model(x)
        assert torch.isfinite(got).all()
        assert (got - expected).abs().max() <= 1e-5, mode
        assert interpolations(compiled) == (0 if dropped else 1), (mode, shape)


def test_the_core_works_without_any_optional_dependency(tmp_path) -> None:
    """What `pip install repvgg` (no extras) promises: build, convert, save and load models with torch alone."""
    import sys

    from conftest import run_process

    code = f"""
import importlib.abc, sys
OPTIONAL = ("timm", "sklearn", "matplotlib", "onnx", "onnxruntime", "onnxscript", "huggingface_hub")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
import torch, repvgg
model = repvgg.create_model("repvgg_a0", num_classes=10).eval()
plain = repvgg.reparameterize_model(model)
x = torch.randn(1, 3, 32, 32)
assert (plain(x) - model(x)).abs().max() < 1e-4
repvgg.save_weights(plain, {str(tmp_path / "a0.safetensors")!r})
loaded = repvgg.load_model({str(tmp_path / "a0.safetensors")!r})
assert torch.equal(loaded(x), plain(x))
from repvgg.cli import main
code = main(["train", "--epochs", "1", "--output", {str(tmp_path / "run")!r}])
print("train without extras exits", code)
"""
    result = run_process([sys.executable, "-c", code], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train without extras exits 2" in result.stdout
    assert "pip install 'repvgg[train]'" in result.stderr

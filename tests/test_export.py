"""ONNX export: converted first, dynamic batch, checked, and the same function under ONNX Runtime."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import randomize_bn, relative_error
from repvgg import create_model, reparameterize_model, save_weights
from repvgg.cli import main
from repvgg.io.export import export_onnx, export_onnx_file, needs_conversion


@pytest.fixture(scope="module")
def tiny_train():
    return randomize_bn(create_model("repvgg_tiny", num_classes=10), seed=2).eval()


def test_training_time_model_is_converted_and_matches_under_onnxruntime(tiny_train, tmp_path) -> None:
    report = export_onnx(tiny_train, tmp_path / "tiny.onnx", img_size=32)
    assert report.converted and needs_conversion(tiny_train)  # the caller's model is left as it was
    assert report.max_rel_diff < 1e-4
    proto = onnx.load(report.path)
    onnx.checker.check_model(proto)
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # one conv per layer
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == tiny_train.spec.num_layers
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    plain = reparameterize_model(tiny_train)
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, 3, 32, 32)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            assert relative_error(got, plain(x)) < 1e-5


def test_a_dynamic_batch_graph_is_traced_at_two_rows_and_runs_the_batch_it_was_given(tiny_train, tmp_path) -> None:
    """The graph `predict`, `serve` and the fast path build their runtimes from is traced at two rows of the example
    batch, not all of them (a forward pass at the whole batch was most of the time it took), and runs that whole
    batch, and others, as the model does."""
    plain = reparameterize_model(tiny_train).eval()
    traced: list[int] = []
    hook = plain.register_forward_pre_hook(lambda module, args: traced.append(int(args[0].shape[0])))
    try:
        path = export_onnx_file(plain, torch.randn(16, 3, 32, 32), tmp_path / "graph.onnx")
    finally:
        hook.remove()
    assert traced and set(traced) == {2}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (16, 1, 3):
        x = torch.randn(batch, 3, 32, 32)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            assert got.shape[0] == batch and relative_error(got, plain(x)) < 1e-5


def test_deploy_model_is_exported_as_is(tiny_train, tmp_path) -> None:
    report = export_onnx(reparameterize_model(tiny_train), tmp_path / "plain.onnx", img_size=32)
    assert not report.converted and report.max_abs_diff < 1e-4


def test_cli_export_from_a_checkpoint(tiny_train, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = save_weights(tiny_train, tmp_path / "tiny.safetensors")
    out = tmp_path / "out.onnx"
    assert main(["export", str(checkpoint), str(out), "--img-size", "32"]) == 0
    stdout = capsys.readouterr().out
    assert "converted the training-time model" in stdout and "max |diff|" in stdout
    assert out.is_file()


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nope.pth"), str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model"):
        export_onnx("repvgg_a9", tmp_path / "x.onnx")


def test_dynamic_height_width_and_fp16_exports_are_checked(tmp_path) -> None:
    from repvgg.io.export import onnxruntime_session

    model = randomize_bn(create_model("repvgg_tiny", num_classes=10)).eval()
    report = export_onnx(model, tmp_path / "dyn.onnx", img_size=32, dynamic_hw=True)
    assert report.check_sizes == [32, 48] and report.relative_error <= 1e-4
    assert report.input_shape == ("batch", 3, "height", "width")
    session = onnxruntime_session(tmp_path / "dyn.onnx")
    plain = reparameterize_model(model)
    for size in (40, 72):  # sizes it was not checked at
        x = torch.randn(2, 3, size, size)
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert relative_error(out, plain(x).detach()) <= 1e-4
    half = export_onnx(model, tmp_path / "half.onnx", img_size=32, fp16=True)
    assert half.dtype == "float16" and 0 < half.relative_error <= 1e-2
    elem_type = onnx.load(str(tmp_path / "half.onnx")).graph.input[0].type.tensor_type.elem_type
    assert elem_type == onnx.TensorProto.FLOAT16

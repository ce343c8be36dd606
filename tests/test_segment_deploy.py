"""A trained segmenter used everywhere: predict (masks at each image's size, a palette PNG, --json fractions,
--draw), export (ONNX Runtime and OpenVINO give PyTorch's masks, pixel for pixel), quantize (held to the mIoU guard,
refused with exit 1 over it)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from repvgg.cli import main
from repvgg.segmentation.config import SegTrainConfig
from repvgg.segmentation.export import AveragePoolBins, TIE_TOLERANCE, mask_mismatch, onnx_segmenter
from repvgg.segmentation.predict import SegmentationPredictor
from repvgg.dense.scenes import SyntheticConfig, scene
from repvgg.segmentation.train import train_segmenter


@pytest.fixture(scope="module")
def trained_segmenter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A QARepVGG segmenter trained for a few seconds on small generated scenes: it finds some of the shapes (mIoU
    about 33, where background everywhere scores about 19), so a mask that moves is seen."""
    out = tmp_path_factory.mktemp("seg") / "run"
    summary = train_segmenter(SegTrainConfig(backbone="qarepvgg_tiny", synthetic_train=128, synthetic_val=8,
                                             synthetic_size=32, batch_size=8, head_channels=16, aux_channels=8,
                                             epochs=8, device="cpu", baseline="none", output=str(out)))
    assert summary["val_miou"] > 25, summary["val_miou"]
    return out, summary


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Generated scenes of the training size saved as PNGs, one of them cropped to a non-square size."""
    folder = tmp_path_factory.mktemp("images")
    config = SyntheticConfig(image_size=32, num_val=3, seed=9)
    paths = []
    for index in range(3):
        pixels = np.rint(scene(config, "val", index).image * 255).astype(np.uint8)
        if index == 2:
            pixels = pixels[:24, :30]
        Image.fromarray(pixels).save(folder / f"scene{index}.png")
        paths.append(folder / f"scene{index}.png")
    return paths


@pytest.mark.parametrize("bins", [1, 2, 3, 6])
@pytest.mark.parametrize("size", [(7, 5), (13, 9), (32, 32)])
def test_average_pool_bins_equal_adaptive_pooling(bins: int, size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size)
    assert torch.allclose(AveragePoolBins(bins)(x), nn.AdaptiveAvgPool2d(bins)(x), atol=1e-6)


def test_a_tie_excuses_a_different_pixel_and_nothing_else() -> None:
    logits = torch.tensor([[[1.0, 2.0]], [[1.0 + TIE_TOLERANCE / 2, 0.0]]])  # pixel 0 tied, pixel 1 clear
    assert mask_mismatch(logits, torch.tensor([[0, 0]])) == (0, 1)
    assert mask_mismatch(logits, torch.tensor([[1, 1]])) == (1, 0)
    assert mask_mismatch(logits, logits.argmax(0)) == (0, 0)


def test_predict_writes_each_mask_at_its_image_size(trained_segmenter: tuple[Path, dict], images: list[Path],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = trained_segmenter
    args = ["predict", str(run), *map(str, images), "--masks", str(tmp_path / "masks"), "--draw",
            str(tmp_path / "drawn"), "--json"]
    assert main(args) == 0
    document = json.loads(capsys.readouterr().out)
    predictor = SegmentationPredictor(run)
    assert document["task"] == "segmentation" and document["runtime"] == "pytorch"
    found = set()
    for row, path in zip(document["predictions"], images):
        written = Image.open(row["mask"])
        image = Image.open(path).convert("RGB")
        assert written.mode == "P" and written.size == image.size and Path(row["mask"]).stem == path.stem
        mask = torch.from_numpy(np.asarray(written).copy())
        assert torch.equal(mask, predictor.segment(image))
        fractions = {c["class"]: c["fraction"] for c in row["classes"]}
        assert abs(sum(fractions.values()) - 1) < 1e-5
        found |= set(fractions)
        counts = torch.bincount(mask.flatten().long(), minlength=len(predictor.classes))
        assert fractions == {predictor.classes[i]: round(float(counts[i]) / mask.numel(), 6)
                             for i in range(len(counts)) if counts[i]}
        assert Image.open(tmp_path / "drawn" / f"{path.stem}.png").size == image.size
    assert len(found) >= 2  # background and a shape: the masks have something to get wrong
    assert main(args) == 2  # the masks exist: not replaced without --overwrite
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    failing = ["predict", str(run), str(images[0]), str(broken), "--masks", str(tmp_path / "new" / "masks")]
    assert main(failing) == 2  # the image before it had its mask written: removed, with the folders made for it
    assert "broken.png" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main([*failing, "--bad-images", "skip"]) == 0  # so the same command runs again as it was
    assert [p.name for p in (tmp_path / "new" / "masks").iterdir()] == [f"{images[0].stem}.png"]
    linked = tmp_path / "linked"  # a link the user left, to a file not there yet: written through, then removed
    linked.mkdir()
    (linked / f"{images[0].stem}.png").symlink_to(tmp_path / "gone.png")
    assert main([*failing[:-1], str(linked)]) == 2
    assert (linked / f"{images[0].stem}.png").is_symlink() and not (tmp_path / "gone.png").exists()


def test_an_image_in_memory_is_read_as_its_file_is(trained_segmenter: tuple[Path, dict], images: list[Path],
                                                   tmp_path: Path) -> None:
    """``segment`` on a 16-bit PIL image gives the mask of its file (scaled to 8 bits, as ``predict`` reads it, not
    clipped to white), and a float tensor, which would be scaled by 255 again, is refused."""
    from repvgg.training.images import load_rgb

    predictor = SegmentationPredictor(trained_segmenter[0])
    seen: list[torch.Tensor] = []
    run = predictor._run
    predictor._run = lambda batch: seen.append(batch) or run(batch)  # what the model is given
    grey = np.asarray(Image.open(images[0]).convert("L"), dtype=np.uint16) * 257
    deep = tmp_path / "deep.png"
    Image.fromarray(grey).save(deep)  # a 16-bit grey PNG
    with Image.open(deep) as image:
        assert image.mode.startswith("I")
        assert torch.equal(predictor.segment(image), predictor.segment(load_rgb(deep)))
    assert torch.equal(seen[0], seen[1]) and seen[0].min() < 0.9  # a grey scene, not clipped to white
    with pytest.raises(ValueError, match="float32 tensor of shape \\(3, 32, 32\\): give a uint8"):
        predictor.segment(torch.rand(3, 32, 32))


def test_export_gives_pytorchs_masks_in_both_runtimes(trained_segmenter: tuple[Path, dict], images: list[Path],
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = trained_segmenter
    assert main(["export", str(run / "deploy.safetensors"), str(tmp_path / "seg.onnx"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images_checked"] > 0 and report["pixels_checked"] > 0
    reference = SegmentationPredictor(run)
    for runtime in ("onnxruntime", "openvino"):
        exported = SegmentationPredictor(tmp_path / "seg.onnx", runtime=runtime)
        assert exported.classes == reference.classes
        for path in images:
            image = Image.open(path).convert("RGB")
            expected, got = reference.segment(image), exported.segment(image)
            assert expected.shape == got.shape
            assert (expected != got).sum() <= report["pixels_at_ties"], (runtime, path)
    direct = onnx_segmenter(tmp_path / "seg.onnx")(torch.rand(3, 21, 35))
    assert direct.shape == (21, 35)


def test_quantize_holds_the_segmenter_to_its_miou_guard(trained_segmenter: tuple[Path, dict], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import repvgg.quant.segmenter as quant_segmenter

    run, _ = trained_segmenter
    out = tmp_path / "seg-int8.onnx"
    assert main(["quantize", str(run / "deploy.safetensors"), str(out), "--calib-images", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["miou_drop"] <= 1.0 and report["quantized_convs"] > 0
    assert set(report["miou_int8_by_runtime"]) == {"onnxruntime", "openvino"}
    assert all(report["miou_fp32"] - m <= 1.0 for m in report["miou_int8_by_runtime"].values())
    assert SegmentationPredictor(out).segment(torch.zeros(3, 24, 24, dtype=torch.uint8)).shape == (24, 24)
    assert main(["export", str(out), str(tmp_path / "repo"), "--format", "ovms", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "int8"  # the model server's file is the INT8 one

    original = quant_segmenter.mean_iou
    calls: list[int] = []

    def worse_int8(run_one, dataset, classes):  # the float32 file scores first, then each INT8 runtime
        calls.append(1)
        return original(run_one, dataset, classes) - (5.0 if len(calls) > 1 else 0.0)

    monkeypatch.setattr(quant_segmenter, "mean_iou", worse_int8)
    refused = tmp_path / "refused.onnx"
    assert main(["quantize", str(run / "deploy.safetensors"), str(refused), "--calib-images", "16"]) == 1
    assert "mean IoU" in capsys.readouterr().err and not refused.exists()


def test_serve_answers_the_masks_predict_writes(trained_segmenter: tuple[Path, dict], images: list[Path]) -> None:
    """repvgg serve on the segmenter: /predict's mask is the PNG predict --masks writes, byte for byte; the v2 infer's
    mask tensor is the same mask; concurrent uploads of different sizes, batched together, each get their own; bad
    input gets a 4xx and the next good request a 200."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    httpx = pytest.importorskip("httpx")
    import base64
    import re
    from concurrent.futures import ThreadPoolExecutor

    from conftest import server_thread
    from repvgg.segmentation.predict import mask_png
    from repvgg.serve.app import create_app
    from repvgg.serve.config import ServeConfig

    run, _ = trained_segmenter
    predictor = SegmentationPredictor(run)
    expected = {p.name: predictor.segment(Image.open(p).convert("RGB")) for p in images}
    config = ServeConfig(max_batch=4, max_queue=8, max_wait_ms=200, runtime="eager", max_segment_mp=0.0011)
    with server_thread(create_app(run, config), config) as (url, _), \
            httpx.Client(base_url=url, timeout=30) as client:
        meta = client.get("/v2/models/pspnet-qarepvgg_tiny").json()
        assert meta["parameters"]["task"] == "segmentation" and meta["outputs"][0]["name"] == "mask"

        def upload(path: Path) -> dict:
            answer = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
            assert answer.status_code == 200, answer.text
            return answer.json()

        with ThreadPoolExecutor(len(images)) as pool:  # one batch of three images of two sizes
            answers = list(pool.map(upload, images))
        for path, answer in zip(images, answers):
            mask = expected[path.name]
            assert base64.b64decode(answer["mask_png"]) == mask_png(mask, len(predictor.classes))
            assert {c["class"]: c["fraction"] for c in answer["classes"]} == predictor.fractions(mask)
            body = {"id": path.name, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                 "data": [base64.b64encode(path.read_bytes()).decode()]}]}
            infer = client.post("/v2/models/pspnet-qarepvgg_tiny/infer", json=body).json()
            (output,) = infer["outputs"]
            assert infer["id"] == path.name and output["shape"] == list(mask.shape)
            assert torch.equal(torch.tensor(output["data"], dtype=torch.uint8).view(*mask.shape), mask)
        batches = re.findall(r'^repvgg_batch_images_sum (\S+)$', client.get("/metrics").text, re.M)
        counts = re.findall(r'^repvgg_batch_images_count (\S+)$', client.get("/metrics").text, re.M)
        assert float(counts[0]) < float(batches[0])  # some forward pass ran more than one image
        bad = [client.post("/predict", files={"file": ("empty.png", b"", "image/png")}),
               client.post("/predict", files={"file": ("x.png", b"not an image", "image/png")}),
               client.post("/v2/models/pspnet-qarepvgg_tiny/infer", json={"inputs": [
                   {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}),
               client.post("/v2/models/pspnet-qarepvgg_tiny/infer", json={"inputs": [
                   {"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk=", "aGk="]}]}),
               client.post("/v2/models/pspnet-qarepvgg_tiny/infer", json={"outputs": [{"name": "boxes"}], "inputs": [
                   {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]})]
        large = io.BytesIO()
        Image.new("RGB", (40, 30)).save(large, "PNG")  # 1,200 pixels: over the 1,100 this server runs at their size
        bad.append(client.post("/predict", files={"file": ("large.png", large.getvalue(), "image/png")}))
        assert [r.status_code for r in bad] == [400, 400, 413, 400, 400, 413], [r.text for r in bad]
        assert "encoded images" in bad[2].json()["error"] and "--max-segment-mp" in bad[5].json()["error"]
        assert all("error" in r.json() for r in bad)
        assert upload(images[0])["mask_png"] == answers[0]["mask_png"]


def test_the_page_lays_the_served_mask_over_the_image(trained_segmenter: tuple[Path, dict], images: list[Path],
                                                      tmp_path: Path) -> None:
    """The page at / in headless Chromium: the classes the API gives, and the image with the mask's colours laid over
    it at half opacity, as predict --draw draws it."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from conftest import headless_chromium, server_thread
    from repvgg.segmentation.plots import colorize
    from repvgg.serve.app import create_app
    from repvgg.serve.config import ServeConfig

    run, _ = trained_segmenter
    predictor = SegmentationPredictor(run)
    image = Image.open(images[2]).convert("RGB")
    mask = predictor.segment(image)
    expected = 0.5 * np.asarray(image, dtype=np.float32) + 0.5 * colorize(mask, len(predictor.classes))
    config = ServeConfig(runtime="eager", max_wait_ms=0)
    with server_thread(create_app(run, config), config) as (url, _), \
            headless_chromium(tmp_path / "profile") as browser:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").get_attribute("data-task"))
        assert browser.find_element(By.ID, "model").get_attribute("data-task") == "segmentation"
        browser.find_element(By.ID, "file").send_keys(str(images[2]))
        shown = WebDriverWait(browser, 30).until(
            lambda b: b.find_element(By.ID, "results").get_attribute("data-classes"))
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "preview").get_attribute("data-drawn"))
        pixels = browser.execute_script("const c = document.getElementById('preview'); "
                                        "return [c.width, c.height, Array.from(c.getContext('2d')"
                                        ".getImageData(0, 0, c.width, c.height).data)];")
    assert shown.split(",") == list(predictor.fractions(mask))
    width, height, data = pixels
    drawn = np.asarray(data, dtype=np.float32).reshape(height, width, 4)[..., :3]
    assert (width, height) == image.size
    assert np.abs(drawn - expected).max() <= 3  # the browser's own rounding of the blend


def test_a_model_repository_of_the_segmenter_runs_by_its_configured_names(trained_segmenter: tuple[Path, dict],
                                                                          tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """export --format triton of a segmenter: model.onnx (checked as export checks it), labels.txt, and a config.pbtxt
    that Triton's schema parses, naming the graph's input and output with their types and dims, no batching; ovms:
    the graph alone."""
    from repvgg.io.card import load_onnx_proto

    run, _ = trained_segmenter
    repo = tmp_path / "models"
    assert main(["export", str(run), str(repo), "--format", "triton"]) == 0
    folder = repo / "pspnet-qarepvgg_tiny"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == \
        ["1/model.onnx", "config.pbtxt", "labels.txt"]
    assert (folder / "labels.txt").read_text().splitlines() == SegmentationPredictor(run).classes
    text = (folder / "config.pbtxt").read_text()
    graph = load_onnx_proto(folder / "1" / "model.onnx").graph
    assert f'name: "{graph.input[0].name}"' in text and 'name: "mask"' in text and "max_batch_size: 0" in text
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="tritonclient is not installed (the test extra)")
    from google.protobuf import text_format

    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert [o.name for o in config.output] == ["mask"] and list(config.input[0].dims) == [3, -1, -1]
    assert main(["export", str(run), str(tmp_path / "ovms"), "--format", "ovms"]) == 0
    assert sorted(p.name for p in (tmp_path / "ovms" / "pspnet-qarepvgg_tiny").rglob("*") if p.is_file()) == \
        ["model.onnx"]
    capsys.readouterr()
    # a classifier's flags, refused rather than ignored: the graph takes one image; its answers have no top-k
    assert main(["export", str(run), str(tmp_path / "batched"), "--format", "triton", "--max-batch", "4"]) == 2
    assert "a segmentation graph takes one image at a time" in capsys.readouterr().err
    assert not (tmp_path / "batched").exists()
    for flag, value in (("--topk", "3"), ("--score-threshold", "0.5")):
        assert main(["serve", str(run), flag, value, "--port", "0"]) == 2
        assert f"{flag} applies to" in capsys.readouterr().err

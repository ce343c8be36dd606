"""Detection: the detector on RepVGG features converted exactly, COCO folders read and checked, det-train through the
engine (resume, outputs), and det-eval's COCO metrics equal to pycocotools' own on the same detections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomize_bn
from repvgg import reparameterize_model
from repvgg.dense.scenes import SyntheticConfig, scene
from repvgg.detection import (DetTrainConfig, build_detection_data, compare_detectors, create_detector, load_detector,
                              read_coco, save_detector, train_detector)
from repvgg.detection.data import DetectionSet
from repvgg.detection.evaluate import evaluate_detector_file
from repvgg.detection.metrics import check_same_detections, comparison_summary, detect
from repvgg.errors import ConversionMismatch
from repvgg.io.checkpoint import load_checkpoint

#: Categories with the ids an exporter may give (not contiguous, not from 0).
CATEGORIES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}, {"id": 11, "name": "triangle"},
              {"id": 20, "name": "cross"}]
TINY = dict(backbone="repvgg_tiny", image_size=64, fpn_channels=64, head_convs=1)


def write_coco_folder(root: Path, train: int = 8, val: int = 4, size: int = 64) -> Path:
    """A COCO folder from generated scenes: PNGs (the val images 16 px wider than tall, so letterboxing shows) and
    ``annotations/instances_{train,val}.json`` with exporter-style category ids and one crowd box."""
    config = SyntheticConfig(image_size=size, num_train=train, num_val=val, seed=5)
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for split, count in (("train", train), ("val", val)):
        images, annotations = [], []
        for index in range(count):
            drawn = scene(config, split, index)
            pixels = np.rint(drawn.image * 255).astype(np.uint8)
            if split == "val":
                pixels = pixels[: size - 16]  # 64 wide, 48 tall
            name = f"{split}_{index}.png"
            Image.fromarray(pixels).save(root / "images" / name)
            images.append({"id": 100 + index, "file_name": name, "width": size, "height": pixels.shape[0]})
            for (x1, y1, x2, y2), cls in zip(drawn.boxes.tolist(), drawn.classes.tolist()):
                y2 = min(y2, pixels.shape[0])
                if y2 - y1 >= 2:
                    annotations.append({"id": len(annotations) + 1, "image_id": 100 + index, "iscrowd": 0,
                                        "category_id": CATEGORIES[cls - 1]["id"], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                        "area": (x2 - x1) * (y2 - y1)})
        annotations.append({"id": len(annotations) + 1, "image_id": 100, "category_id": 3, "iscrowd": 1,
                            "bbox": [0, 0, 20, 20], "area": 400})
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return root


@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
def test_the_converted_detector_detects_the_same(kind: str) -> None:
    model = randomize_bn(create_detector("repvgg_tiny", 4, kind=kind, image_size=64, fpn_channels=64,
                                         score_threshold=0.0)).eval()
    plain = reparameterize_model(model)
    assert plain.deploy and not model.deploy
    bundle = build_detection_data(None, image_size=64, synthetic=SyntheticConfig(num_train=2, num_val=6), augment=False)
    loader = torch.utils.data.DataLoader(bundle.val, batch_size=3)
    summary = comparison_summary(compare_detectors([model, plain], loader, bundle.val.coco))
    assert summary["labels_agree"] and summary["max_box_deviation_px"] <= 1e-3
    assert summary["val_ap"] == summary["val_ap_deploy"]
    check_same_detections(summary, "the converted detector")
    with pytest.raises(ConversionMismatch, match="before NMS"):
        check_same_detections(summary | {"max_box_deviation_px": 0.01}, "a converted detector")


def test_feature_pyramid_follows_the_backbones_taps() -> None:
    model = create_detector("repvgg_a0", 3, out_indices=(2, 3, 4))
    assert model.backbone.strides == [8, 16, 32, 64, 128]
    maps = model.backbone(torch.randn(1, 3, 128, 128))
    assert [m.shape[-1] for m in maps.values()] == [16, 8, 4, 2, 1] and all(m.shape[1] == 64 for m in maps.values())
    for width in (48, 32):  # 32 groups of one channel would have one value to normalise on P7's 1x1 map
        with pytest.raises(ValueError, match="multiple of 32 from 64"):
            create_detector("repvgg_a0", 3, fpn_channels=width)


def _break(root: Path, change) -> Path:
    path = root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].update(bbox=[50, 10, 30, 10]), "outside the 64x48 image"),
    (lambda d: d["annotations"][0].update(bbox=[5, 5, 0, 10]), "zero area"),
    (lambda d: d["annotations"][0].update(category_id=99), "category 99"),
    (lambda d: d["annotations"][0].update(image_id=12345), "image 12345"),
    (lambda d: d["images"][1].update(file_name="gone.png"), "'gone.png'"),
])
def test_each_bad_annotation_is_named(tmp_path: Path, change, message: str) -> None:
    root = write_coco_folder(tmp_path / "coco", train=2, val=2)
    path = _break(root, change)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        build_detection_data(root, image_size=64)
    assert str(path) in str(err.value)
    if "gone" not in message and "image 12345" not in message:
        assert "annotation 1 " in str(err.value)  # the annotation's id


def test_a_coco_folder_reads_with_its_categories_and_crowds(tmp_path: Path) -> None:
    root = write_coco_folder(tmp_path / "coco", train=2, val=2)
    coco = read_coco(root / "annotations" / "instances_val.json")
    assert coco.classes == ["circle", "square", "triangle", "cross"] and coco.category_ids == [3, 7, 11, 20]
    crowd = sum(a["iscrowd"] for a in coco.gt["annotations"])
    assert crowd == 1 and sum(len(b) for b in coco.boxes) == len(coco.gt["annotations"]) - crowd
    image, boxes, labels, index, scale = DetectionSet(coco, lambda i: torch.zeros(3, 48, 64, dtype=torch.uint8),
                                                      image_size=128, max_objects=8)[0]
    assert image.shape == (3, 128, 128) and float(scale) == 2.0
    assert torch.allclose(boxes[labels >= 0] / 2, torch.from_numpy(coco.boxes[0]))


def test_det_eval_scores_as_pycocotools_does_on_the_same_detections(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = write_coco_folder(tmp_path / "coco")
    model = randomize_bn(create_detector("repvgg_tiny", 4, image_size=64, fpn_channels=64, score_threshold=0.0))
    save_detector(model, tmp_path / "det.safetensors", classes=[c["name"] for c in CATEGORIES],
                  data={"data": str(root), "synthetic": None})
    result = evaluate_detector_file(tmp_path / "det.safetensors", batch_size=2)
    # the same detections, written as a COCO results file and scored by pycocotools from the files on disk
    loaded, _ = load_detector(tmp_path / "det.safetensors")
    bundle = build_detection_data(root, image_size=64, augment=False)
    found = detect(loaded, torch.utils.data.DataLoader(bundle.val, batch_size=2))
    image_ids = [image["id"] for image in json.loads((root / "annotations/instances_val.json").read_text())["images"]]
    rows = [{"image_id": image_id, "category_id": CATEGORIES[label]["id"], "score": score,
             "bbox": [x1, y1, x2 - x1, y2 - y1]}
            for image_id, d in zip(image_ids, found)
            for (x1, y1, x2, y2), score, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist())]
    assert rows and max(r["bbox"][1] + r["bbox"][3] for r in rows) <= 48 + 1e-3  # in the 64x48 image's pixels
    (tmp_path / "results.json").write_text(json.dumps(rows))
    truth = COCO(str(root / "annotations/instances_val.json"))
    evaluation = COCOeval(truth, truth.loadRes(str(tmp_path / "results.json")), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert result["val_ap"] == pytest.approx(evaluation.stats[0], abs=1e-12)
    assert result["val_ap50"] == pytest.approx(evaluation.stats[1], abs=1e-12)
    assert result["form"] == "training-time" and result["labels_agree"] and result["ap_difference"] == 0


def test_det_train_on_a_coco_folder_resumes_exactly(tmp_path: Path) -> None:
    root = write_coco_folder(tmp_path / "coco", train=8, val=4)
    common = dict(TINY, data=str(root), epochs=2, batch_size=4, max_objects=8)  # 2 steps per epoch
    full = train_detector(DetTrainConfig(**common, output=str(tmp_path / "full")))
    for name in ("summary.json", "metrics.jsonl", "deploy.safetensors", "best.pt", "curves.png", "predictions.png"):
        assert (tmp_path / "full" / name).is_file(), name
    row = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_classification_loss", "train_bbox_regression_loss", "train_bbox_ctrness_loss", "val_ap", "val_ap50",
            "val_ap75", "val_ap_small"} <= set(row)
    assert full["labels_agree"] and full["max_box_deviation_px"] <= 1e-3 and full["val_ap"] == full["val_ap_deploy"]
    best = max(json.loads(line)["val_ap"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())
    assert full["best_val_ap"] == best <= 1 and full["val_ap"] <= 1  # one unit: COCO's fractions
    part = train_detector(DetTrainConfig(**common, output=str(tmp_path / "part"), stop_after_steps=1))
    assert part["interrupted"] is True
    train_detector(DetTrainConfig(**common, output=str(tmp_path / "part"), resume=str(tmp_path / "part")))
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def measured(run: str) -> list[dict]:  # every row without its timings
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.endswith(("_s", "_per_s", "_per_step"))} for row in rows]

    assert len(measured("full")) == 2 and measured("full") == measured("part")
    deployed, meta = load_detector(tmp_path / "full" / "deploy.safetensors")
    assert deployed.deploy and meta["classes"] == ["circle", "square", "triangle", "cross"]


def test_a_detector_backbone_from_a_deploy_file(tmp_path: Path) -> None:
    """The backbone of a detector may come from a converted classifier: expanded into training-time blocks that
    compute the classifier's features."""
    from repvgg import create_model, save_weights

    fused = reparameterize_model(randomize_bn(create_model("qarepvgg_tiny", num_classes=5)))
    save_weights(fused, tmp_path / "deploy.safetensors")
    detector = create_detector("qarepvgg_tiny", 4, backbone_weights=tmp_path / "deploy.safetensors").eval()
    assert not detector.deploy
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = fused.forward_intermediates(x, indices=[2, 3, 4], intermediates_only=True)
        got = detector.backbone.body(x)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, expected))


@pytest.mark.parametrize("backbone, kind", [("repvgg_tiny", "fcos"), ("efficientrep_t", "yolo")])
def test_export_writes_a_detector_that_onnx_runtime_and_openvino_run(tmp_path: Path, backbone: str, kind: str) -> None:
    """The exported graph (resize, normalisation, decoding, NMS) detects what the converted detector does, in ONNX
    Runtime and in OpenVINO, on images of another size and shape than the training one."""
    from repvgg.cli import main
    from repvgg.detection.export import onnx_detector
    from repvgg.detection.metrics import box_deviation
    from repvgg.io.card import read_onnx_metadata

    # no top-k cut among near-equal random scores: every detection over the threshold is kept
    model = randomize_bn(create_detector(backbone, 4, kind=kind, image_size=64, score_threshold=0.05,
                                         detections_per_image=1000))
    if kind == "yolo":  # predictions start at a 1% score, the same everywhere: give them something to detect
        for conv in (*model.head.cls_preds, *model.head.reg_preds):
            torch.nn.init.normal_(conv.weight, std=0.3, generator=torch.Generator().manual_seed(1))
            torch.nn.init.zeros_(conv.bias)
    save_detector(model, tmp_path / "det.pt.safetensors", classes=["a", "b", "c", "d"],
                  data={"data": None, "synthetic": {"image_size": 64, "num_train": 2, "num_val": 3}})
    assert main(["export", str(tmp_path / "det.pt.safetensors"), str(tmp_path / "det.onnx")]) == 0
    assert json.loads(read_onnx_metadata(tmp_path / "det.onnx")["classes"]) == ["a", "b", "c", "d"]
    plain = reparameterize_model(model)
    image = torch.rand(3, 48, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain([image])[0]
    assert len(expected["labels"]) > 0
    for runtime in ("onnxruntime", "openvino"):
        got = onnx_detector(tmp_path / "det.onnx", runtime)(image)
        same, gap = box_deviation(expected, got)
        assert same and gap <= 1e-3


def test_predict_draws_the_boxes_it_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """predict on a detector: --json's boxes are the ones drawn by --draw (yellow outlines where --json puts them,
    the image untouched away from them), and --csv holds the same rows."""
    from repvgg.cli import main

    model = randomize_bn(create_detector("repvgg_tiny", 4, image_size=64, score_threshold=0.0, detections_per_image=3))
    save_detector(model, tmp_path / "det.safetensors", classes=["circle", "square", "triangle", "cross"])
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        pixels = np.rint(scene(SyntheticConfig(image_size=64), "val", index).image * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"s{index}.png")
    args = ["predict", str(tmp_path / "det.safetensors"), str(images), "--score-threshold", "0", "--json",
            "--draw", str(tmp_path / "drawn"), "--csv", str(tmp_path / "boxes.csv")]
    assert main(args) == 0
    document = json.loads(capsys.readouterr().out)
    rows = document["predictions"]
    assert document["task"] == "detection" and sum(len(r["detections"]) for r in rows) > 0
    for row in rows:
        drawn = np.asarray(Image.open(tmp_path / "drawn" / Path(row["source"]).name)).astype(int)
        original = np.asarray(Image.open(row["source"])).astype(int)
        near = np.zeros(original.shape[:2], bool)
        for detection in row["detections"]:
            x1, y1, x2, y2 = (int(round(v)) for v in detection["box"])
            x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, 63), min(y2, 63)
            assert (drawn[y1:y2 + 1, x1] == [255, 255, 0]).all(axis=1).mean() > 0.5  # the left edge is outlined
            near[max(y1 - 2, 0):y2 + 3, max(x1 - 2, 0):x2 + 3] = True  # the box
            near[max(y1 - 2, 0):y1 + 16, max(x1 - 2, 0):x1 + 80] = True  # its label
        assert (drawn[~near] == original[~near]).all()
    lines = (tmp_path / "boxes.csv").read_text().splitlines()
    assert lines[0] == "path,class,score,x1,y1,x2,y2,error"
    assert len(lines) - 1 == sum(len(r["detections"]) for r in rows)
    assert main(args) == 2  # the drawings exist: not replaced without --overwrite


@pytest.fixture(scope="module")
def trained_qa_detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The real-time detector on QARepVGG blocks (``qaefficientrep_t``) trained for a few seconds on small generated
    scenes (AP about 20, AP50 about 50): enough for deployment to have something to lose."""
    out = tmp_path_factory.mktemp("qa") / "run"
    summary = train_detector(DetTrainConfig(kind="yolo", backbone="qaefficientrep_t", image_size=64, epochs=6,
                                            ema_decay=0.0, synthetic_train=160, synthetic_val=32, batch_size=16,
                                            lr=0.02, output=str(out)))
    assert summary["val_ap50"] > 0.2, summary["val_ap50"]
    return out, summary


def test_the_exported_detector_scores_the_same_ap_in_both_runtimes(trained_qa_detector: tuple[Path, dict],
                                                                  tmp_path: Path) -> None:
    """The ONNX detector run by ONNX Runtime and by OpenVINO on the whole validation set: AP within 0.1 point of the
    training-time detector's."""
    from repvgg.detection.export import export_detector, onnx_detector
    from repvgg.detection.metrics import coco_scores

    run, summary = trained_qa_detector
    export_detector(run / "deploy.safetensors", tmp_path / "det.onnx")
    runners = {}
    for runtime in ("onnxruntime", "openvino"):
        one = onnx_detector(tmp_path / "det.onnx", runtime)
        runners[runtime] = lambda images, one=one: [one(image) for image in images]
    _, meta = load_detector(run / "deploy.safetensors")
    val = build_detection_data(None, image_size=64, synthetic=SyntheticConfig(**dict(
        meta["data"]["synthetic"], size_range=tuple(meta["data"]["synthetic"]["size_range"]))), augment=False).val
    for name, runner in runners.items():
        ap = coco_scores(val.coco, detect(runner, torch.utils.data.DataLoader(val, batch_size=8)))["ap"]
        assert abs(ap - summary["val_ap"]) <= 1e-3, (name, ap, summary["val_ap"])


def test_predict_runs_a_detector_file_on_the_fastest_runtime_that_detects_as_pytorch_does(
        trained_qa_detector: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Weighed on validation images, every installed runtime is checked and timed, the measured fastest is kept, and
    it detects what PyTorch does; a runtime that detects otherwise is left out (refused when it was asked for)."""
    import repvgg.detection.runtime as runtime_module
    from repvgg.cli import main
    from repvgg.detection.metrics import BOX_TOLERANCE_PX, box_deviation
    from repvgg.detection.predict import DetectionPredictor
    from repvgg.measure.timing import TimingResult

    run, _ = trained_qa_detector
    images = [Image.fromarray(np.rint(scene(SyntheticConfig(image_size=64), "val", i).image * 255).astype(np.uint8))
              for i in range(3)]
    eager = DetectionPredictor(run, runtime="pytorch")
    assert eager.backend == "pytorch"

    def timed(fns, **_):  # openvino measured fastest, then onnxruntime, then pytorch
        speed = {"openvino": 0.001, "onnxruntime": 0.002, "pytorch": 0.003}
        return {name: TimingResult(name, samples=[speed[name]] * 3) for name in fns}

    monkeypatch.setattr(runtime_module, "time_interleaved", timed)
    chosen = DetectionPredictor(run, samples=images)
    assert chosen.backend == "openvino" and set(chosen._runner.images_per_s) == {"pytorch", "onnxruntime", "openvino"}
    found = 0
    for image in images:
        expected, got = eager.detect(image), chosen.detect(image)
        same, gap = box_deviation(expected, got)
        assert same and gap <= BOX_TOLERANCE_PX
        found += len(expected["labels"])
    assert found > 0  # the comparison covered boxes
    images[0].save(tmp_path / "one.png")
    Image.new("RGB", (5000, 1)).save(tmp_path / "strip.png")  # the resize keeps no row of it: not a sample either
    assert main(["predict", str(run), str(tmp_path / "one.png"), str(tmp_path / "strip.png"), "--runtime", "openvino",
                 "--json", "--bad-images", "skip"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["runtime"] == "openvino" and document["runtime_reason"] == "asked for"
    assert "keeps no row or column" in document["predictions"][1]["error"]
    assert [d["class"] for d in document["predictions"][0]["detections"]] == [
        eager.classes[int(c)] for c in eager.detect(images[0])["labels"]]

    original = runtime_module.runtime_parity

    def openvino_differs(run_one, name, reference, samples):
        if name == "openvino":
            raise ConversionMismatch("openvino does not detect what PyTorch does (a test)")
        return original(run_one, name, reference, samples)

    monkeypatch.setattr(runtime_module, "runtime_parity", openvino_differs)
    assert DetectionPredictor(run, samples=images).backend == "onnxruntime"
    with pytest.raises(ConversionMismatch, match="openvino"):
        DetectionPredictor(run, runtime="openvino", samples=images)


def test_serve_answers_the_boxes_predict_gives(trained_qa_detector: tuple[Path, dict], tmp_path: Path) -> None:
    """repvgg serve on the trained detector: /predict answers the boxes predict --json gives, with the class names;
    the v2 infer answers them as tensors; uploads of different sizes batched together each get their own; bad input
    gets a 4xx and the next good request a 200."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    httpx = pytest.importorskip("httpx")
    import base64
    from concurrent.futures import ThreadPoolExecutor

    from conftest import server_thread
    from repvgg.detection.predict import DetectionPredictor
    from repvgg.serve.app import create_app
    from repvgg.serve.config import ServeConfig

    run, _ = trained_qa_detector
    paths = []
    for index, size in enumerate((64, 64, 80)):
        pixels = np.rint(scene(SyntheticConfig(image_size=size), "val", index).image * 255).astype(np.uint8)
        Image.fromarray(pixels[:, : size - 8 * index]).save(tmp_path / f"s{index}.png")
        paths.append(tmp_path / f"s{index}.png")
    predictor = DetectionPredictor(run, runtime="pytorch")
    expected = {p.name: predictor.describe(p.name, predictor.detect(Image.open(p).convert("RGB"))).as_dict()
                for p in paths}
    assert sum(len(e["detections"]) for e in expected.values()) > 0
    config = ServeConfig(max_batch=4, max_queue=8, max_wait_ms=200, runtime="eager")
    with server_thread(create_app(run, config), config) as (url, _), \
            httpx.Client(base_url=url, timeout=30) as client:
        name = "yolo-qaefficientrep_t"
        assert client.get(f"/v2/models/{name}").json()["parameters"]["task"] == "detection"

        def upload(path: Path) -> dict:
            answer = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
            assert answer.status_code == 200, answer.text
            return answer.json()

        with ThreadPoolExecutor(len(paths)) as pool:
            answers = list(pool.map(upload, paths))
        for path, answer in zip(paths, answers):
            assert answer["detections"] == expected[path.name]["detections"]
            assert answer["classes"] == predictor.classes
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                "data": [base64.b64encode(path.read_bytes()).decode()]}]}
            outputs = {o["name"]: o for o in client.post(f"/v2/models/{name}/infer", json=body).json()["outputs"]}
            boxes = torch.tensor(outputs["boxes"]["data"]).view(*outputs["boxes"]["shape"])
            assert [predictor.classes[i] for i in outputs["labels"]["data"]] == [
                d["class"] for d in expected[path.name]["detections"]]
            for box, detection in zip(boxes.tolist(), expected[path.name]["detections"]):
                assert max(abs(a - b) for a, b in zip(box, detection["box"])) <= 1e-3
        bad = [client.post("/predict", files={"file": ("x.png", b"not an image", "image/png")}),
               client.post("/predict", files={"file": ("thin.png", _png((400, 3)), "image/png")}),
               client.post(f"/v2/models/{name}/infer", json={"inputs": [{"name": "image", "datatype": "FP32",
                                                                         "shape": [1], "data": [1.0]}]}),
               client.post(f"/v2/models/{name}/infer", json={"inputs": [{"name": "image", "datatype": "BYTES",
                                                                         "shape": [99999999999], "data": ["aGk="]}]})]
        assert [r.status_code for r in bad] == [400] * 4, [r.text for r in bad]
        assert "one image a request ([1]), got 99999999999" in bad[3].json()["error"]
        assert upload(paths[0])["detections"] == expected[paths[0].name]["detections"]


def test_the_page_draws_the_served_boxes(trained_qa_detector: tuple[Path, dict], tmp_path: Path) -> None:
    """The page at / in headless Chromium: as many boxes as the API gives, drawn in yellow over the image."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from conftest import headless_chromium, server_thread
    from repvgg.detection.predict import DetectionPredictor
    from repvgg.serve.app import create_app
    from repvgg.serve.config import ServeConfig

    run, _ = trained_qa_detector
    pixels = np.rint(scene(SyntheticConfig(image_size=64), "val", 0).image * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    predictor = DetectionPredictor(run, runtime="pytorch")
    found = predictor.detect(Image.open(tmp_path / "scene.png").convert("RGB"))
    assert len(found["labels"]) > 0
    config = ServeConfig(runtime="eager", max_wait_ms=0)
    with server_thread(create_app(run, config), config) as (url, _), \
            headless_chromium(tmp_path / "profile") as browser:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").get_attribute("data-task"))
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "scene.png"))
        count = WebDriverWait(browser, 30).until(
            lambda b: b.find_element(By.ID, "results").get_attribute("data-detections"))
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "preview").get_attribute("data-drawn"))
        x1, y1, _, y2 = (int(round(v)) for v in found["boxes"][0].tolist())
        x1, y1, y2 = min(max(x1, 0), 63), max(y1, 0), min(y2, 64)
        edge = browser.execute_script(f"return Array.from(document.getElementById('preview').getContext('2d')"
                                      f".getImageData({x1}, {y1}, 1, {max(y2 - y1, 1)}).data);")
    assert int(count) == len(found["labels"])
    column = np.asarray(edge).reshape(-1, 4)[:, :3]
    assert ((column[:, 0] > 200) & (column[:, 1] > 200) & (column[:, 2] < 60)).mean() > 0.5  # the left edge, yellow


def test_a_model_repository_of_the_detector_names_its_nms_outputs(trained_qa_detector: tuple[Path, dict],
                                                                  tmp_path: Path) -> None:
    """export --format triton of a detector: its graph with NMS, checked as export checks it, and a config.pbtxt
    naming boxes, scores and labels with their types (no batching: the graph takes one image)."""
    from repvgg.cli import main

    run, _ = trained_qa_detector
    assert main(["export", str(run / "deploy.safetensors"), str(tmp_path / "models"), "--format", "triton"]) == 0
    folder = tmp_path / "models" / "yolo-qaefficientrep_t"
    text = (folder / "config.pbtxt").read_text()
    for output, kind in (("boxes", "TYPE_FP32"), ("scores", "TYPE_FP32"), ("labels", "TYPE_INT64")):
        assert f'name: "{output}"\n    data_type: {kind}' in text
    assert "max_batch_size: 0" in text and (folder / "1" / "model.onnx").is_file()
    assert (folder / "labels.txt").read_text().splitlines() == ["circle", "square", "triangle", "cross"]


def _png(size: tuple[int, int]) -> bytes:
    import io

    out = io.BytesIO()
    Image.new("RGB", size).save(out, format="PNG")
    return out.getvalue()


def test_quantize_writes_an_int8_detector_judged_by_its_ap(trained_qa_detector: tuple[Path, dict], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """quantize of a QARepVGG detector: the backbone and neck in INT8 (QDQ), the head in float, and its AP on the
    validation images within 1 point of the training-time detector's, in ONNX Runtime and in OpenVINO; a guard that
    cannot be met writes nothing."""
    from repvgg.cli import main
    from repvgg.quant.guard import PrecisionRejected, require_ap

    run, summary = trained_qa_detector
    assert main(["quantize", str(run / "deploy.safetensors"), str(tmp_path / "int8.onnx"), "--calib-images", "32",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration_images"] == 32 and report["val_images"] == 32
    assert 0 < report["quantized_convs"] < report["convs"]  # the head's convs stay in float
    assert abs(report["ap_fp32"] - summary["val_ap"]) <= 1e-3 and (tmp_path / "int8.onnx").is_file()
    assert 100 * abs(report["ap_int8"] - summary["val_ap"]) <= 1.0
    assert set(report["ap_int8_by_runtime"]) == {"onnxruntime", "openvino"}
    assert all(100 * abs(ap - summary["val_ap"]) <= 1.0 for ap in report["ap_int8_by_runtime"].values())
    with pytest.raises(PrecisionRejected, match="--max-ap-drop"):
        require_ap(0.50, 0.48, 1.0, "an INT8 detector")
    require_ap(0.50, 0.495, 1.0, "an INT8 detector")


def test_quantize_refuses_an_int8_detector_over_the_ap_drop_with_exit_1(
        trained_qa_detector: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An INT8 file that OpenVINO runs 2 AP points worse than the float32 export (its scores made so here) is refused
    with exit 1, and nothing is written, though ONNX Runtime's AP is within the limit."""
    import repvgg.quant.detector as quant_detector
    from repvgg.cli import main

    scored = quant_detector.coco_scores
    runtimes: list[str] = []

    def runtime_aware(detector: object, runtime: str = "onnxruntime") -> object:
        runtimes.append(runtime)
        return original_detector(detector, runtime)

    def worse_in_openvino(coco: object, detections: object) -> dict:
        scores = dict(scored(coco, detections))
        return scores | {"ap": scores["ap"] - 0.02} if runtimes[-1:] == ["openvino"] else scores

    original_detector = quant_detector._onnx_detector
    monkeypatch.setattr(quant_detector, "_onnx_detector", runtime_aware)
    monkeypatch.setattr(quant_detector, "coco_scores", worse_in_openvino)
    run, _ = trained_qa_detector
    assert main(["quantize", str(run / "deploy.safetensors"), str(tmp_path / "int8.onnx"), "--calib-images", "8"]) == 1
    err = capsys.readouterr().err
    assert "run by openvino" in err and "--max-ap-drop" in err
    assert not any(tmp_path.iterdir())


def test_an_nms_near_tie_is_told_from_a_deviation() -> None:
    """Two overlapping boxes of a class scoring within float rounding: NMS may keep either; that is not a converted
    or exported graph computing something else, but a box elsewhere or a score further off is."""
    from repvgg.detection.metrics import differs_by_ties_only

    def answer(box: list[float], score: float) -> dict[str, torch.Tensor]:
        return {"boxes": torch.tensor([box]), "scores": torch.tensor([score]), "labels": torch.tensor([2])}

    kept = answer([10.0, 10.0, 50.0, 50.0], 0.81234)
    assert differs_by_ties_only(kept, answer([12.0, 11.0, 52.0, 50.0], 0.81236))  # the other of a near-tie
    assert not differs_by_ties_only(kept, answer([12.0, 11.0, 52.0, 50.0], 0.80))  # a score further off
    assert not differs_by_ties_only(kept, answer([60.0, 60.0, 90.0, 90.0], 0.81234))  # a box elsewhere

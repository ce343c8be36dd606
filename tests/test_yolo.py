"""The real-time detector (``--kind yolo``): task-aligned assignment on hand-made cases, its losses against hand
computations, its configuration's rules, and the whole detector converted exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import randomize_bn
from repvgg import reparameterize_model
from repvgg.detection import DetTrainConfig, DetectorConfig, build_detector, create_detector
from repvgg.detection.tal import AssignConfig, task_aligned_assign, varifocal_loss, yolo_losses


def _assign(points: list[list[float]], boxes: list[list[float]], scores: list[list[float]], gt_boxes: list[list[float]],
            gt_labels: list[int], **config: float) -> tuple:
    return task_aligned_assign(torch.tensor([scores]), torch.tensor([boxes]), torch.tensor(points),
                               torch.tensor([gt_boxes]), torch.tensor([gt_labels]), AssignConfig(**config))


def test_the_best_aligned_points_inside_an_object_are_its_positives() -> None:
    """Alignment s * IoU^6 picks the top-k points inside the box; a point outside is never one, however well it
    scores; the class targets are the alignments scaled so the best point gets the object's best IoU."""
    points = [[8, 8], [24, 8], [8, 24], [24, 24], [40, 40]]
    boxes = [[0, 0, 32, 32], [0, 0, 32, 16], [0, 0, 16, 16], [0, 0, 32, 32], [0, 0, 32, 32]]  # IoU 1, .5, .25, 1, 1
    scores = [[0.1, 0.5], [0.1, 0.9], [0.1, 0.9], [0.1, 0.1], [0.1, 0.9]]
    got = _assign(points, boxes, scores, [[0, 0, 32, 32], [0, 0, 99, 99]], [1, -1], topk=2)  # the second: padding
    # alignments: 0.5, 0.9 / 64, 0.9 / 4096, 0.1, (outside)
    assert got.positive[0].tolist() == [True, False, False, True, False]
    assert got.labels[0].tolist() == [1, -1, -1, 1, -1]
    expected = torch.zeros(5, 2)
    expected[0, 1], expected[3, 1] = 1.0, 0.2  # 0.5 / 0.5 * 1.0 and 0.1 / 0.5 * 1.0
    assert torch.allclose(got.scores[0], expected, atol=1e-6)
    assert torch.equal(got.boxes[0, 0], torch.tensor([0.0, 0, 32, 32]))


def test_a_point_two_objects_choose_keeps_the_one_its_box_overlaps_most() -> None:
    """Both objects take the point (their only candidate); it goes to the one its predicted box overlaps most, even
    where the other is better aligned (beta 1: 0.9 x 0.39 against 0.2 x 1)."""
    got = _assign([[16, 16], [100, 100]], [[8, 8, 40, 40], [90, 90, 110, 110]], [[0.9, 0.2], [0.5, 0.5]],
                  [[0, 0, 32, 32], [8, 8, 40, 40]], [0, 1], beta=1.0)
    assert got.positive[0].tolist() == [True, False] and got.labels[0].tolist() == [1, -1]
    assert torch.equal(got.boxes[0, 0], torch.tensor([8.0, 8, 40, 40]))
    assert got.scores[0, 0].tolist() == pytest.approx([0.0, 1.0])


def test_an_image_without_objects_has_no_positive() -> None:
    got = _assign([[8, 8]], [[0, 0, 16, 16]], [[0.9]], [[0, 0, 16, 16]], [-1])
    assert not got.positive.any() and (got.labels == -1).all() and (got.scores == 0).all()


def test_the_varifocal_loss_matches_a_hand_computation() -> None:
    logits, targets = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.0, 0.6]])
    got = varifocal_loss(logits, targets, torch.tensor([[False, True]]))

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    negative = -math.log(1 - sigmoid(2.0)) * 0.75 * sigmoid(2.0) ** 2  # alpha p^gamma on a negative
    positive = -(0.6 * math.log(sigmoid(-1.0)) + 0.4 * math.log(1 - sigmoid(-1.0))) * 0.6  # the target on a positive
    assert got[0].tolist() == pytest.approx([negative, positive], rel=1e-6)


def test_the_box_loss_is_giou_weighted_by_the_class_target() -> None:
    """One object, one point inside it: GIoU of [0, 0, 20, 20] against [10, 10, 30, 30] is 1/7 - 200/900; the
    point's class target is its IoU, 1/7, which weights it; the sum of targets (under 1) counts as 1."""
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    boxes = torch.tensor([[[0.0, 0, 20, 20], [50, 50, 60, 60]]], requires_grad=True)
    losses = yolo_losses(logits, boxes, torch.tensor([[12.0, 12], [55, 55]]), torch.tensor([[[10.0, 10, 30, 30]]]),
                         torch.tensor([[1]]))
    giou = 1 / 7 - 200 / 900
    assert losses["bbox_regression"].item() == pytest.approx(2.5 * (1 - giou) / 7, rel=1e-5)
    p = 0.5  # sigmoid(0) everywhere: three negatives and the positive, whose target is 1/7
    t = 1 / 7
    vfl = 3 * -math.log(1 - p) * 0.75 * p ** 2 + -(t * math.log(p) + (1 - t) * math.log(1 - p)) * t
    assert losses["classification"].item() == pytest.approx(vfl, rel=1e-5)
    sum(losses.values()).backward()
    assert boxes.grad is not None and float(boxes.grad[0, 0].abs().sum()) > 0
    assert float(boxes.grad[0, 1].abs().sum()) == 0  # a negative's box has no loss


@pytest.mark.parametrize("backbone", ["efficientrep_t", "qaefficientrep_t", "repvgg_tiny"])
def test_the_whole_yolo_detector_converts_to_convs_and_relus(backbone: str) -> None:
    """Every block and conv-BN pair fuses (backbone, SimSPPF, Rep-PAN, head): candidates before NMS within 1e-4 px,
    and the converted state loads into the detector built converted."""
    model = randomize_bn(create_detector(backbone, 3, kind="yolo", image_size=64)).eval()
    plain = reparameterize_model(model)
    assert plain.deploy and not model.deploy
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    (boxes, scores), (plain_boxes, plain_scores) = model.candidates(images), plain.candidates(images)
    assert (boxes - plain_boxes).abs().max() <= 1e-4 and (scores - plain_scores).abs().max() <= 1e-5
    rebuilt = build_detector(model.config, deploy=True)
    rebuilt.load_state_dict(plain.state_dict())
    assert torch.equal(rebuilt.candidates(images)[0], plain_boxes)


def test_the_yolo_kind_sets_its_own_defaults_and_refuses_what_it_has_not() -> None:
    config = DetTrainConfig(kind="yolo")
    assert (config.backbone, config.epochs, config.ema_decay) == ("efficientrep_t", 12, 0.99)
    assert config.optimizer == "adamw"
    assert config.resolved_lr == 0.002 and config.weight_decay == 0.05 and DetTrainConfig().optimizer == "sgd"
    # the weight decay follows the optimizer, as the learning rate does (yolo with SGD took AdamW's 0.05)
    assert DetTrainConfig(kind="yolo", optimizer="sgd").weight_decay == 1e-4
    assert DetTrainConfig(optimizer="adamw").weight_decay == 0.05 and DetTrainConfig().weight_decay == 1e-4
    for bad, message in ((dict(kind="yolo", image_size=80), "image_size must be a multiple of 32 for --kind yolo"),
                         (dict(kind="retinanet", head_convs=6), "head_convs takes at most 4 with --kind retinanet"),
                         (dict(data="coco", synthetic_train=3, synthetic_seed=9),
                          "synthetic_train, synthetic_seed set the generated scenes, which --data coco replaces")):
        with pytest.raises(ValueError, match=message):  # were trained (yolo failing at the end) or silently ignored
            DetTrainConfig(**bad)
    assert DetTrainConfig().backbone == "repvgg_a0" and DetTrainConfig().epochs == 8
    assert DetectorConfig(backbone="efficientrep_n", kind="yolo").neck_depth == 4
    assert DetectorConfig(backbone="qaefficientrep_t", kind="yolo").neck_depth == 1
    assert DetectorConfig(kind="fcos").fpn_channels == 64 and DetectorConfig(kind="yolo").head_convs == 1
    with pytest.raises(ValueError, match="no fpn_channels"):
        DetectorConfig(kind="yolo", fpn_channels=64)
    with pytest.raises(ValueError, match="neck_depth sets the yolo"):
        DetectorConfig(kind="fcos", neck_depth=2)
    with pytest.raises(ValueError, match="three backbone stages"):
        create_detector("efficientrep_t", 2, kind="yolo", out_indices=(3, 4))


def test_det_train_refuses_a_pyramid_width_for_the_yolo_kind(capsys: pytest.CaptureFixture[str]) -> None:
    from repvgg.cli import main

    assert main(["det-train", "--kind", "yolo", "--fpn-channels", "64", "--epochs", "1"]) == 2
    assert "no fpn_channels" in capsys.readouterr().err


def test_an_exported_yolo_detector_answers_an_image_without_objects(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing over the threshold (fresh weights score 1% everywhere): ONNX Runtime and OpenVINO both answer empty
    tensors, not an error or a placeholder row, OpenVINO in the graph compiled for the image's shape and in the one
    for any shape (past its one static shape here)."""
    import repvgg.detection.export as export
    from repvgg.detection import save_detector
    from repvgg.detection.export import export_detector, onnx_detector

    monkeypatch.setattr(export, "STATIC_SHAPES", 1)

    model = create_detector("efficientrep_t", 4, kind="yolo", image_size=64)
    save_detector(model, tmp_path / "det.safetensors", classes=list("abcd"),
                  data={"data": None, "synthetic": {"image_size": 64, "num_train": 2, "num_val": 2}})
    export_detector(tmp_path / "det.safetensors", tmp_path / "det.onnx", images=2)
    for runtime in ("onnxruntime", "openvino"):
        run = onnx_detector(tmp_path / "det.onnx", runtime)
        for found in (run(torch.rand(3, 48, 80)), run(torch.rand(3, 64, 64)), run(torch.rand(3, 48, 80))):
            assert found["boxes"].shape == (0, 4) and found["scores"].shape == (0,) and found["labels"].shape == (0,)


def test_a_yolo_run_resumes_bit_exactly(tmp_path: Path) -> None:
    """Stopped after its first step and resumed, a yolo run (its EMA on, as by default) ends with the weights, the
    EMA and the metrics of the run that was never stopped."""
    import json

    from repvgg.detection import train_detector
    from repvgg.io.checkpoint import load_checkpoint

    common = dict(kind="yolo", image_size=64, epochs=2, batch_size=8, synthetic_train=16, synthetic_val=4)
    full = train_detector(DetTrainConfig(**common, output=str(tmp_path / "full")))
    assert full["labels_agree"] and full["max_box_deviation_px"] <= 1e-3
    assert train_detector(DetTrainConfig(**common, output=str(tmp_path / "part"), stop_after_steps=1))["interrupted"]
    train_detector(DetTrainConfig(**common, output=str(tmp_path / "part"), resume=str(tmp_path / "part")))
    a, b = (load_checkpoint(tmp_path / run / "last.pt") for run in ("full", "part"))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])

    def measured(run: str) -> list[dict]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.endswith(("_s", "_per_s", "_per_step"))} for row in rows]

    assert len(measured("full")) == 2 and measured("full") == measured("part")
    assert {"train_classification_loss", "train_bbox_regression_loss", "val_ap50"} <= set(measured("full")[0])

"""Segmentation: dilated backbones at output stride 8, exact conversion of the whole segmenter, the
auxiliary head, the loss, label files, metrics and the generated data."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import randomize_bn, relative_error
from repvgg import RepVGGBlock, reparameterize_model
from repvgg.segmentation import (
    ConfusionMatrix,
    PSPNet,
    SegmentationFolder,
    SegmentationOutput,
    SegmenterConfig,
    SyntheticConfig,
    SyntheticShapes,
    build_segmentation_data,
    build_segmenter,
    confusion_matrix,
    create_segmenter,
    evaluate_segmenter,
    metrics_from_confusion,
    segmentation_loss,
)
from repvgg.segmentation.transforms import IMAGENET_MEAN, IMAGENET_STD, apply_joint, eval_transform, train_transform

SMALL_HEAD = dict(head_channels=32, aux_channels=16)


def _segmenter(backbone: str, **kwargs) -> PSPNet:
    return create_segmenter(backbone, 5, **SMALL_HEAD, **kwargs)


@pytest.fixture(scope="module")
def resnet50_segmenter() -> PSPNet:
    """Built once: torchvision's ResNet-50 initialisation is the slowest step of this file."""
    return _segmenter("resnet50")


def _dense_dilations(stage: nn.Module) -> list[int]:
    return [block.rbr_dense.conv.dilation[0] for block in stage]


# --- backbones ---------------------------------------------------------------------------------


def test_repvgg_backbone_is_dilated_at_output_stride_8() -> None:
    model = _segmenter("repvgg_tiny")
    backbone = model.backbone
    assert backbone.spec.strides == (2, 2, 2, 1, 1) and backbone.spec.dilations == (1, 1, 1, 2, 4)
    for stage, dilation in ((backbone.stage1, 1), (backbone.stage2, 1), (backbone.stage3, 2), (backbone.stage4, 4)):
        for block in stage:
            assert block.rbr_dense.conv.dilation == (dilation, dilation)
            assert block.rbr_dense.conv.padding == (dilation, dilation)  # padding follows dilation
    for block in [*backbone.stage3, *backbone.stage4]:
        assert block.rbr_dense.conv.stride == (1, 1)
        assert block.rbr_1x1.conv.stride == (1, 1) and block.rbr_1x1.conv.padding == (0, 0)
    x = torch.randn(2, 3, 64, 80)
    aux, features = backbone(x)
    assert aux.shape == (2, backbone.spec.widths[3], 8, 10)
    assert features.shape == (2, backbone.spec.widths[4], 8, 10)
    assert [backbone.feature_info[i]["reduction"] for i in (3, 4)] == [8, 8]
    model.eval()
    assert model(torch.randn(1, 3, 61, 75)).shape == (1, 5, 61, 75)  # upsampled to any input size


def test_fast_variant_dilates_only_the_last_five_layers() -> None:
    # B-family depths (1, 4, 6, 16, 1): the last 4 layers of paper stage 4 and the one of stage 5.
    model = _segmenter("repvgg_tiny_b", fast=True)
    backbone = model.backbone
    assert backbone.spec.dilated_layers == 5
    assert _dense_dilations(backbone.stage3) == [1] * 12 + [2] * 4
    assert _dense_dilations(backbone.stage4) == [4]
    assert _dense_dilations(backbone.stage2) == [1] * 6
    assert backbone.stage3[0].rbr_dense.conv.stride == (1, 1)  # still output stride 8
    aux, features = backbone(torch.randn(1, 3, 64, 64))
    assert aux.shape[-2:] == features.shape[-2:] == (8, 8)

    custom = _segmenter("repvgg_tiny_b", dilated_layers=7)
    assert _dense_dilations(custom.backbone.stage3) == [1] * 10 + [2] * 6
    assert custom.config.dilated_layers == 7
    with pytest.raises(ValueError, match="dilated_layers"):
        _segmenter("repvgg_tiny_b", fast=True, dilated_layers=3)


def test_resnet50_backbone_is_dilated_at_output_stride_8(resnet50_segmenter: PSPNet) -> None:
    model = resnet50_segmenter
    backbone = model.backbone
    assert backbone.layer3[0].conv2.stride == (1, 1) and backbone.layer4[0].conv2.stride == (1, 1)
    assert backbone.layer3[-1].conv2.dilation == (2, 2) and backbone.layer4[-1].conv2.dilation == (4, 4)
    aux, features = backbone(torch.randn(2, 3, 64, 64))
    assert aux.shape == (2, 1024, 8, 8) and features.shape == (2, 2048, 8, 8)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5, 64, 64)
    with pytest.raises(ValueError, match="RepVGG backbones only"):
        _segmenter("resnet50", fast=True)


def test_unknown_backbone_names_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'repvgg_b1g3'.*Did you mean"):
        create_segmenter("repvgg_b1g3", 5)
    with pytest.raises(ValueError, match="resnet101"):
        create_segmenter("resnet34", 5)
    with pytest.raises(TypeError, match="unknown argument"):
        create_segmenter("repvgg_tiny", 5, head_width=3)
    assert create_segmenter("RepVGG-tiny", 3, **SMALL_HEAD).config.backbone == "repvgg_tiny"


def test_config_round_trips_and_rebuilds_the_same_architecture() -> None:
    model = _segmenter("repvgg_tiny_b", fast=True)
    config = SegmenterConfig.from_dict(model.config.to_dict())
    assert config == model.config
    rebuilt = build_segmenter(config)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="unknown SegmenterConfig fields"):
        SegmenterConfig.from_dict({**config.to_dict(), "crop": 3})


# --- conversion and the auxiliary head ----------------------------------------------------------


@pytest.mark.parametrize(
    "backbone, kwargs", [("repvgg_tiny", {}), ("repvgg_tiny_b", dict(fast=True)), ("resnet50", {})],
    ids=["normal", "fast", "resnet50"],
)
def test_converted_segmenter_gives_the_same_logits(
    backbone: str, kwargs: dict, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue("resnet50_segmenter") if backbone == "resnet50" else _segmenter(backbone, **kwargs)
    model = randomize_bn(copy.deepcopy(model), seed=3)
    x = torch.randn(2, 3, 48, 56)
    with torch.no_grad():
        expected = model.eval()(x)
        fused = reparameterize_model(model.train())  # conversion uses running stats in either mode
        actual = fused(x)
    assert not fused.training
    assert relative_error(actual, expected) <= 1e-5
    assert fused.aux_head is None and model.aux_head is not None  # a copy; the original keeps its aux head
    assert fused.deploy and not model.deploy
    assert all(b.deploy for b in fused.modules() if isinstance(b, RepVGGBlock))
    # the head is left as it is
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.classifier.modules()) == 1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.ppm.modules()) == len(fused.config.bins)

    # the deploy constructor builds the same structure, so the fused state dict loads into it
    deployed = build_segmenter(model.config, deploy=True)
    deployed.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert relative_error(deployed.eval()(x), expected) <= 1e-5


def test_aux_head_only_while_training() -> None:
    model = _segmenter("repvgg_tiny")
    x = torch.randn(2, 3, 48, 48)
    out = model.train()(x)
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == out.aux_logits.shape == (2, 5, 48, 48)
    assert isinstance(model.eval()(x), torch.Tensor)

    fused = reparameterize_model(model)
    assert isinstance(fused.train()(x), torch.Tensor)  # aux head is gone for good
    assert not any(k.startswith("aux_head.") for k in fused.state_dict())
    fused.reparameterize()  # idempotent
    assert fused.aux_head is None

    no_aux = create_segmenter("repvgg_tiny", 5, head_channels=32, aux_channels=0)
    assert no_aux.aux_head is None and isinstance(no_aux.train()(x), torch.Tensor)


# --- loss ---------------------------------------------------------------------------------------


def test_loss_ignores_255_and_weights_the_aux_loss() -> None:
    logits = torch.randn(2, 4, 6, 6)
    target = torch.randint(0, 4, (2, 6, 6))
    target[0, :3] = 255
    target[1, :, 4:] = 255
    valid = target != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    torch.testing.assert_close(segmentation_loss(logits, target), expected)

    changed = logits.clone()
    changed[0, :, :3] = 100 * torch.randn(4, 3, 6)  # anything at ignored pixels
    torch.testing.assert_close(segmentation_loss(changed, target), expected)

    aux = torch.randn_like(logits)
    aux_ce = F.cross_entropy(aux.permute(0, 2, 3, 1)[valid], target[valid])
    torch.testing.assert_close(segmentation_loss(SegmentationOutput(logits, aux), target), expected + 0.4 * aux_ce)
    torch.testing.assert_close(
        segmentation_loss(SegmentationOutput(logits, aux), target, aux_weight=1.0), expected + aux_ce
    )

    # no labelled pixel: zero, not NaN, and still differentiable
    leaf = logits.clone().requires_grad_()
    loss = segmentation_loss(leaf, torch.full_like(target, 255))
    loss.backward()
    assert loss.item() == 0.0 and leaf.grad is not None
    with pytest.raises(ValueError, match="does not match logits"):
        segmentation_loss(logits, target[:, :5])


def test_a_training_step_runs_end_to_end() -> None:
    model = _segmenter("repvgg_tiny").train()
    images, labels = next(iter(torch.utils.data.DataLoader(build_segmentation_data().train, batch_size=4)))
    loss = segmentation_loss(model(images), labels)
    loss.backward()
    assert math.isfinite(loss.item())
    assert model.aux_head[0].weight.grad is not None and model.backbone.stage0.rbr_dense.conv.weight.grad is not None


# --- folder data --------------------------------------------------------------------------------


def _write_pair(root: Path, split: str, stem: str, label: np.ndarray, *, image_size: tuple[int, int] | None = None,
                mode: str = "L") -> None:
    h, w = image_size or label.shape
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(len(stem)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "images" / split / f"{stem}.png")
    img = Image.fromarray(label.astype(np.uint8))  # mode L
    if mode == "P":
        img = Image.new("P", (label.shape[1], label.shape[0]))
        img.putdata(label.astype(np.uint8).ravel().tolist())
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    assert img.mode == mode
    img.save(root / "labels" / split / f"{stem}.png")


def _label(h: int = 10, w: int = 12, num_classes: int = 3) -> np.ndarray:
    label = np.arange(h * w).reshape(h, w) % num_classes
    label[0, :] = 255
    label[:, -2:] = 255
    return label


def test_folder_labels_load_with_ignore_pixels(tmp_path: Path) -> None:
    _write_pair(tmp_path, "train", "a", _label())
    _write_pair(tmp_path, "train", "b", _label(), mode="P")  # VOC-style palette PNG
    _write_pair(tmp_path, "val", "c", _label())
    (tmp_path / "classes.txt").write_text("road\ncar\nsky\n")
    ds = SegmentationFolder(tmp_path, "train", 3)
    assert [p[0].stem for p in ds.samples] == ["a", "b"]
    for i in range(2):
        image, label = ds[i]
        assert image.shape == (3, 10, 12) and image.dtype == torch.float32
        assert label.dtype == torch.int64
        assert torch.equal(label, torch.from_numpy(_label()))
    ds.verify()

    bundle = build_segmentation_data(tmp_path, crop_size=16, scale_range=(1.0, 1.0))
    assert bundle.num_classes == 3 and bundle.classes == ["road", "car", "sky"]
    image, label = bundle.train[0]
    assert image.shape == (3, 16, 16) and label.shape == (16, 16)
    # the crop is larger than the image: the padding is ignore, on top of the file's 30 ignore pixels
    assert (label == 255).sum() == 16 * 16 - 10 * 12 + 30
    assert set(label.unique().tolist()) <= {0, 1, 2, 255}
    assert len(bundle.val) == 1 and bundle.val[0][1].shape == (10, 12)
    with pytest.raises(ValueError, match="classes.txt lists 3 classes but num_classes=4"):
        build_segmentation_data(tmp_path, num_classes=4)


def test_bad_label_files_are_named_in_the_error(tmp_path: Path) -> None:
    _write_pair(tmp_path, "train", "wrong_size", _label(), image_size=(10, 14))
    _write_pair(tmp_path, "train", "out_of_range", np.where(_label() == 2, 7, _label()))
    ds = SegmentationFolder(tmp_path, "train", 3)
    by_stem = {p[0].stem: i for i, p in enumerate(ds.samples)}
    with pytest.raises(ValueError, match=r"wrong_size\.png.* 12x10 but its image is 14x10"):
        ds[by_stem["wrong_size"]]
    with pytest.raises(ValueError, match=r"out_of_range\.png.*class id\(s\) \[7\] outside 0\.\.2"):
        ds[by_stem["out_of_range"]]
    with pytest.raises(ValueError, match="wrong_size.png|out_of_range.png"):
        ds.verify()

    rgb_dir = tmp_path / "rgb"
    _write_pair(rgb_dir, "train", "colour", _label())
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(rgb_dir / "labels" / "train" / "colour.png")
    with pytest.raises(ValueError, match=r"colour\.png.*mode 'RGB'"):
        SegmentationFolder(rgb_dir, "train", 3)[0]


def test_wrong_layouts_say_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"images/\{train,val\}"):
        SegmentationFolder(tmp_path, "train", 3)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        SegmentationFolder(tmp_path, "train", 3)
    _write_pair(tmp_path, "train", "a", _label())
    (tmp_path / "labels" / "train" / "a.png").unlink()
    with pytest.raises(ValueError, match=r"have no label PNG.*\['a'\]"):
        SegmentationFolder(tmp_path, "train", 3)
    with pytest.raises(ValueError, match="pass num_classes or write"):
        build_segmentation_data(tmp_path)
    (tmp_path / "seg.log").write_text("a log")
    with pytest.raises(FileNotFoundError, match="'.*seg.log' is a file, not a folder"):
        SegmentationFolder(tmp_path / "seg.log", "train", 3)
    with pytest.raises(FileNotFoundError, match="'.*missing' does not exist"):
        SegmentationFolder(tmp_path / "missing", "train", 3)


# --- transforms ---------------------------------------------------------------------------------


def _interior(label: torch.Tensor) -> torch.Tensor:
    """Labelled pixels whose 3x3 neighbourhood holds one class (where resampling cannot blend classes)."""
    ids = label[None, None].float()
    return (F.max_pool2d(ids, 3, 1, 1) == -F.max_pool2d(-ids, 3, 1, 1))[0, 0] & (label != 255)


def test_joint_transforms_keep_image_and_label_aligned() -> None:
    # 8x8 blocks of class ids; the image's red channel encodes the block's id, so every pixel away from a block
    # edge can be checked against its label after random scale, crop and flip
    ids = (torch.arange(4 * 6) % 4).reshape(4, 6)
    label = ids.repeat_interleave(8, 0).repeat_interleave(8, 1).to(torch.uint8)
    image = torch.stack([label * 60, torch.full_like(label, 30), torch.full_like(label, 200)])
    std, mean = torch.tensor(IMAGENET_STD).reshape(3, 1, 1), torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    transform = train_transform(32, scale_range=(0.75, 2.0))
    torch.manual_seed(0)
    mismatched = []
    for _ in range(10):
        out_image, out_label = apply_joint(transform, image, label)
        assert out_image.dtype == torch.float32 and out_label.dtype == torch.int64
        assert out_image.shape == (3, 32, 32) and out_label.shape == (32, 32)
        red = (out_image * std + mean)[0] * 255  # 60 x class id, blended at most halfway next to an edge
        inside = _interior(out_label)
        assert inside.sum() > 100 and ((red - 60 * out_label)[inside].abs() <= 30.5).all()
        flipped = out_label.flip(-1)  # the check can fail: a label flipped alone disagrees with its image
        mismatched.append(bool(((red - 60 * flipped)[_interior(flipped)].abs() > 30.5).any()))
    assert all(mismatched)

    # smaller than the crop: padded bottom/right with ignore labels and the mean colour (about 0 after normalising)
    small_image, small_label = image[:, :5, :7], label[:5, :7]
    out_image, out_label = apply_joint(train_transform(8, scale_range=None, flip=False), small_image, small_label)
    assert torch.equal(out_label[:5, :7], small_label.long()) and (out_label == 255).sum() == 64 - 35
    assert out_image[:, 5:, :].abs().max() < 0.01 and out_image[:, :, 7:].abs().max() < 0.01

    # exact scale 2: nearest neighbour for labels, bilinear for the image; no transform: only normalisation
    torch.manual_seed(0)
    _, scaled_label = apply_joint(train_transform((10, 14), scale_range=(2.0, 2.0), flip=False),
                                  small_image, small_label)
    assert torch.equal(scaled_label, small_label.long().repeat_interleave(2, 0).repeat_interleave(2, 1))
    plain_image, plain_label = apply_joint(None, small_image, small_label)
    assert torch.allclose(plain_image, (small_image / 255 - mean) / std)
    assert torch.equal(plain_label, small_label.long())
    resized_image, resized_label = apply_joint(eval_transform((3, 4)), small_image, small_label)
    assert resized_image.shape == (3, 3, 4)
    assert set(resized_label.unique().tolist()) <= set(small_label.unique().tolist())


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_on_hand_made_confusions() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])
    matrix = confusion_matrix(pred, target, 4)
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    metrics = metrics_from_confusion(matrix)
    # IoU: class 0: 1 / (2 + 2 - 1); class 1: 2 / (2 + 3 - 2); class 2: 1 / (2 + 1 - 1); class 3 never occurs
    assert metrics.iou[:3] == pytest.approx((1 / 3, 2 / 3, 1 / 2))
    assert math.isnan(metrics.iou[3])
    assert metrics.mean_iou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert metrics.pixel_accuracy == pytest.approx(4 / 6)  # the two ignored pixels do not count
    assert metrics.mean_accuracy == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert metrics.as_dict(["a", "b", "c", "d"])["iou/b"] == pytest.approx(2 / 3)

    # a class predicted but never labelled counts with IoU 0
    false_positive = metrics_from_confusion(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 2))
    assert false_positive.iou == (0.5, 0.0) and false_positive.mean_iou == pytest.approx(0.25)

    meter = ConfusionMatrix(4)
    logits = F.one_hot(pred.clamp(max=3), 4).permute(2, 0, 1)[None].float()
    meter.update(logits, target[None])
    meter.update(pred, target)
    assert torch.equal(meter.matrix, 2 * matrix)
    with pytest.raises(ValueError, match="label values must lie in 0..3"):
        confusion_matrix(pred, torch.full_like(target, 4), 4)


def test_evaluate_segmenter_scores_a_perfect_model() -> None:
    class Oracle(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return F.one_hot(images[:, 0].long(), 3).permute(0, 3, 1, 2).float()

    labels = torch.randint(0, 3, (4, 5, 5))
    batches = [(labels[:2, None].float().expand(-1, 3, -1, -1), labels[:2]),
               (labels[2:, None].float().expand(-1, 3, -1, -1), labels[2:])]
    model = Oracle().train()
    metrics = evaluate_segmenter(model, batches, 3)
    assert metrics.mean_iou == metrics.pixel_accuracy == 1.0
    assert model.training  # restored


# --- generated data -----------------------------------------------------------------------------


def test_synthetic_scenes_are_deterministic_and_labelled() -> None:
    config = SyntheticConfig(num_train=6, num_val=3)
    first, again = SyntheticShapes("train", config), SyntheticShapes("train", config)
    for i in (5, 0, 3):  # order of access does not matter
        image, label = first[i]
        image2, label2 = again[i]
        assert torch.equal(image, image2) and torch.equal(label, label2)
    image, label = first[0]
    assert image.shape == (3, 64, 64) and label.shape == (64, 64) and label.dtype == torch.int64
    labels = torch.stack([first[i][1] for i in range(len(first))])
    values = set(labels.unique().tolist())
    assert values <= {0, 1, 2, 3, 4, 255} and 255 in values and len(values - {0, 255}) >= 2
    assert 0.005 < (labels == 255).float().mean() < 0.2  # a thin band around outlines

    other_seed = SyntheticShapes("train", SyntheticConfig(num_train=6, num_val=3, seed=1))
    assert not torch.equal(other_seed[0][1], label)
    val = SyntheticShapes("val", config)
    assert len(val) == 3 and not torch.equal(val[0][1], label)

    bundle = build_segmentation_data(synthetic=config)
    assert bundle.num_classes == 5 and bundle.classes[0] == "background"
    assert len(bundle.train) == 6 and bundle.train[0][0].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticShapes("test")

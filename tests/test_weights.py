"""Weights: official and timm formats load as they are; bad files fail clearly and change nothing."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import timm
import torch

from conftest import randomize_bn, relative_error
from repvgg import create_model, load_model, read_checkpoint, reparameterize_model, save_weights
from repvgg.io.loading import infer_architecture
from repvgg.io.weights import load_weights, official_to_timm, timm_to_official
from repvgg.nn.block import RepVGGBlock


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_state_dict_keys_follow_the_official_release() -> None:
    keys = set(create_model("repvgg_a0").state_dict())
    for key in ("stage0.rbr_dense.conv.weight", "stage0.rbr_dense.bn.running_var", "stage0.rbr_1x1.conv.weight",
                "stage1.0.rbr_1x1.bn.running_mean", "stage1.1.rbr_identity.weight", "stage4.0.rbr_dense.bn.bias",
                "linear.weight", "linear.bias"):
        assert key in keys
    assert "stage1.0.rbr_identity.weight" not in keys  # stride-2 first layer has no identity
    deploy_keys = set(create_model("repvgg_a0", deploy=True).state_dict())
    assert "stage1.0.rbr_reparam.weight" in deploy_keys and "stage3.13.rbr_reparam.bias" in deploy_keys
    assert not any("rbr_dense" in k for k in deploy_keys)
    se_keys = set(create_model("repvgg_d2se").state_dict())
    assert {"stage0.se.down.weight", "stage2.3.se.up.bias"} <= se_keys


def test_official_train_and_deploy_files_load(tmp_path: Path) -> None:
    source = randomize_bn(create_model("repvgg_a0", num_classes=1000)).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = source(x)
    # Official train files are plain state dicts; deploy files come from the official convert script.
    torch.save(source.state_dict(), tmp_path / "RepVGG-A0-train.pth")
    torch.save(reparameterize_model(source).state_dict(), tmp_path / "RepVGG-A0-deploy.pth")
    train = create_model("repvgg_a0", weights=tmp_path / "RepVGG-A0-train.pth").eval()
    plain = create_model("repvgg_a0", deploy=True, weights=tmp_path / "RepVGG-A0-deploy.pth").eval()
    torch.testing.assert_close(train(x), expected)
    assert relative_error(plain(x), expected) <= 1e-5
    assert plain.num_classes == 1000 and plain.deploy


def test_wrapped_and_ddp_prefixed_checkpoints_are_unwrapped(tmp_path: Path) -> None:
    source = randomize_bn(create_model("repvgg_tiny", num_classes=10)).eval()
    sd = {f"module.{k}": v for k, v in source.state_dict().items()}
    for wrapper in ("state_dict", "model"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: sd, "epoch": 3, "arch": "repvgg_tiny"}, path)
        model = create_model("repvgg_tiny", weights=path).eval()
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(model(x), source(x))


def _timm_model(name: str) -> tuple[torch.nn.Module, dict[str, object]]:
    """timm's ``name`` and the overrides that give our matching model: repvgg_d2se (133M parameters) keeps its
    layout (depths, SE) at 2/5 of its widths."""
    if name != "repvgg_d2se":
        return timm.create_model(name, num_classes=10), {}
    from timm.models.byobnet import ByobNet, model_cfgs

    cfg = model_cfgs[name]
    narrow = dataclasses.replace(cfg, blocks=tuple(dataclasses.replace(b, c=b.c * 2 // 5) for b in cfg.blocks))
    return ByobNet(narrow, num_classes=10), {"width_multipliers": (1.0, 2.0)}


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b1g4", "repvgg_d2se"])
def test_timm_state_dicts_load_and_give_timm_outputs(name: str, tmp_path: Path) -> None:
    timm_model, overrides = _timm_model(name)
    reference = randomize_bn(timm_model).eval()
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    model = create_model(name, weights=tmp_path / "timm.pth", **overrides).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        # and the way back: our weights in timm's naming load into timm (strictly) and compute the same
        expected = model(x)
        with torch.no_grad():
            for p in reference.parameters():
                p.zero_()  # the timm model forgets its own weights first
        reference.load_state_dict(official_to_timm(model.state_dict()))
        torch.testing.assert_close(reference(x), expected)


def test_timm_fused_state_dict_loads_into_deploy_model(tmp_path: Path) -> None:
    from timm.utils.model import reparameterize_model as timm_reparameterize

    reference = randomize_bn(timm.create_model("repvgg_a0", num_classes=10)).eval()
    fused = timm_reparameterize(reference)
    torch.save(fused.state_dict(), tmp_path / "timm-deploy.pth")
    model = create_model("repvgg_a0", deploy=True, weights=tmp_path / "timm-deploy.pth").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused(x))


def test_name_translation_round_trips() -> None:
    sd = create_model("repvgg_d2se", num_classes=3).state_dict()
    assert timm_to_official(official_to_timm(sd)).keys() == sd.keys()
    assert "stem.conv_kxk.conv.weight" in official_to_timm(sd)
    assert "stages.3.0.attn.fc2.bias" in official_to_timm(sd)


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = randomize_bn(create_model("repvgg_tiny", num_classes=10, use_se=True)).eval()
    plain = reparameterize_model(model)
    path = save_weights(plain, tmp_path / "deploy.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["arch"] == "repvgg_tiny" and meta["deploy"] == "true" and meta["num_classes"] == "10"
    rebuilt = load_model(path)  # from the file alone: the spec (with SE) is in the metadata
    assert rebuilt.deploy and rebuilt.spec.use_se and rebuilt.name == "repvgg_tiny"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), plain(x))
    _, metadata = read_checkpoint(path)
    assert metadata["deploy"] is True and metadata["spec"]["use_se"] is True


def test_official_file_without_metadata_is_recognised(tmp_path: Path) -> None:
    source = randomize_bn(create_model("repvgg_b1g2", num_classes=10)).eval()
    torch.save(source.state_dict(), tmp_path / "RepVGG-B1g2-train.pth")
    sd, _ = read_checkpoint(tmp_path / "RepVGG-B1g2-train.pth")
    assert infer_architecture(sd) == "repvgg_b1g2"
    plain = load_model(tmp_path / "RepVGG-B1g2-train.pth", deploy=True)
    assert plain.deploy and plain.name == "repvgg_b1g2"
    x = torch.randn(1, 3, 64, 64)
    assert relative_error(plain(x), source(x)) <= 1e-5


@pytest.mark.parametrize("name, overrides", [("repvgg_tiny", {}), ("qarepvgg_tiny", {}), ("repvggplus_tiny", {}),
                                             ("repvgg_tiny", {"post_bn": True, "use_se": True})])
def test_a_deploy_file_expands_into_training_blocks_that_compute_the_same(tmp_path: Path, name: str,
                                                                           overrides: dict) -> None:
    """Users ask to train a converted model further: its fused kernels go into the 3x3 branches, the other branches
    start at zero, and the training-time model computes what the deploy file does (before any step)."""
    fused = reparameterize_model(randomize_bn(create_model(name, num_classes=10, **overrides)))
    save_weights(fused, tmp_path / "deploy.safetensors")
    model = create_model(name, num_classes=10, weights=tmp_path / "deploy.safetensors", **overrides).eval()
    assert not model.deploy
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    assert all(not b.rbr_1x1.conv.weight.any() for b in blocks if b.rbr_1x1 is not None)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(model(x), fused(x)) <= 1e-5
        assert relative_error(reparameterize_model(model)(x), fused(x)) <= 1e-5  # and converts back to it
    trained = load_model(tmp_path / "deploy.safetensors", deploy=False)
    assert not trained.deploy and relative_error(trained.eval()(x), fused(x)) <= 1e-5


def test_a_deploy_file_of_another_architecture_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    fused = reparameterize_model(create_model("repvgg_tiny", num_classes=10))
    torch.save(fused.state_dict(), tmp_path / "deploy.pth")
    model = create_model("repvgg_tiny", num_classes=10, width_multipliers=(0.75, 1.0))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="needs a fused kernel of shape"):
        load_weights(model, tmp_path / "deploy.pth")
    assert _unchanged(model, before)


def test_training_file_into_deploy_model_is_refused(tmp_path: Path) -> None:
    torch.save(create_model("repvgg_tiny", num_classes=10).state_dict(), tmp_path / "train.pth")
    with pytest.raises(ValueError, match="reparameterize_model"):
        create_model("repvgg_tiny", deploy=True, weights=tmp_path / "train.pth")


def test_wrong_number_of_classes_is_refused_and_skip_head_works(tmp_path: Path) -> None:
    source = randomize_bn(create_model("repvgg_tiny", num_classes=10))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="num_classes=10"):
        create_model("repvgg_tiny", num_classes=5, weights=tmp_path / "w.pth")
    model = create_model("repvgg_tiny", num_classes=5)
    head = model.linear.weight.clone()
    load_weights(model, tmp_path / "w.pth", skip_head=True)
    assert torch.equal(model.linear.weight, head)
    torch.testing.assert_close(model.stage0.rbr_dense.conv.weight, source.stage0.rbr_dense.conv.weight)


def test_wrong_architecture_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    torch.save(create_model("repvgg_a0", num_classes=10).state_dict(), tmp_path / "a0.pth")
    model = create_model("repvgg_a1", num_classes=10)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="does not match"):
        load_weights(model, tmp_path / "a0.pth")
    assert _unchanged(model, before)


def test_missing_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        create_model("repvgg_tiny", weights=tmp_path / "nope.pth")
    model = create_model("repvgg_tiny", num_classes=10)
    torch.save(model.state_dict(), tmp_path / "full.pth")
    save_weights(model, tmp_path / "full.safetensors")
    for name in ("full.pth", "full.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="truncated"):
            create_model("repvgg_tiny", weights=tmp_path / f"cut-{name}")


class _Payload:
    def __reduce__(self):  # would run code on a plain pickle load
        return (os.system, ("echo pwned",))


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused"):
        read_checkpoint(tmp_path / "evil.pth")


def test_file_without_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save({"epoch": 1}, tmp_path / "nothing.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_checkpoint(tmp_path / "nothing.pth")
    torch.save({0: torch.zeros(1), "stem.weight": torch.zeros(1)}, tmp_path / "numbered.pth")
    with pytest.raises(ValueError, match="numbered.pth holds tensors under keys that are not parameter names, e.g. 0"):
        read_checkpoint(tmp_path / "numbered.pth")


def test_a_count_in_the_metadata_is_ascii_digits(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    for value in ("\u00b3", "9" * 5000, "-1"):  # '³' passes str.isdigit(), which int() then refuses
        save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"), metadata={"in_chans": value})
        with pytest.raises(ValueError, match="metadata field 'in_chans' must be a non-negative integer"):
            read_checkpoint(tmp_path / "w.safetensors")


def test_a_headless_backbone_loads_back_from_the_file_it_was_saved_to(tmp_path: Path) -> None:
    model = create_model("repvgg_tiny", num_classes=0).eval()
    loaded = load_model(save_weights(model, tmp_path / "headless.safetensors")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert loaded.num_classes == 0 and torch.equal(loaded(x), model(x))


def test_a_loaded_models_file_round_trip_keeps_its_card_pooling_and_compiled_form(tmp_path: Path) -> None:
    """save_weights writes what load_model read: the class names and preprocessing a file declared (they became
    numbered classes and the default preprocessing), global_pool="" (the reloaded model pooled), and a
    torch.compile'd model as the model it compiles (its keys carried "_orig_mod.", and the file was called
    inconsistent)."""
    import json

    from repvgg import load_weights

    names, preprocessing = ["cat", "dog", "eel"], {"img_size": 64, "interpolation": "bicubic"}
    save_weights(create_model("repvgg_tiny", num_classes=3), tmp_path / "a.safetensors",
                 extra={"classes": json.dumps(names), "preprocessing": json.dumps(preprocessing)})
    loaded = load_model(tmp_path / "a.safetensors")
    again = load_model(save_weights(reparameterize_model(loaded), tmp_path / "b.safetensors"))
    assert again.card.classes == tuple(names) and again.card.preprocessing == loaded.card.preprocessing
    assert again.card.preprocessing.img_size == 64
    x = torch.randn(2, 3, 32, 32)
    unpooled = create_model("repvgg_tiny", num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert load_model(save_weights(unpooled, tmp_path / "g.safetensors")).eval()(x).shape == unpooled(x).shape
    compiled = torch.compile(create_model("repvgg_tiny", num_classes=3))
    reloaded = load_model(save_weights(compiled, tmp_path / "c.safetensors"))
    assert reloaded.state_dict().keys() == compiled._orig_mod.state_dict().keys()
    load_weights(compiled, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"repvgg.load_weights\(model, path, skip_head=True\)"):  # no such argument
        create_model("repvgg_tiny", num_classes=5, weights=tmp_path / "a.safetensors")  # of create_model
    assert again.pretrained_cfg["architecture"] == "repvgg_tiny"  # was "repvgg_custom": built from the file's spec


def test_arguments_that_would_mislead_later_are_refused_at_once() -> None:
    """A dict registered as a spec broke create_model and every later register_timm_models(); features_only="no"
    built a backbone."""
    import repvgg

    with pytest.raises(TypeError, match="register_model takes a RepVGGSpec"):
        repvgg.register_model("mine", {"depths": (1, 1, 1, 1, 1)})  # type: ignore[arg-type]
    assert "mine" not in repvgg.list_models()
    with pytest.raises(TypeError, match="features_only must be True or False"):
        create_model("repvgg_tiny", features_only="no")


def test_a_file_that_does_not_fit_its_spec_is_named_by_its_architecture(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from repvgg.io.weights import read_safetensors

    tensors, metadata = read_safetensors(save_weights(create_model("repvgg_tiny", num_classes=3), tmp_path / "a.pt"))
    tensors.pop("linear.bias")
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="does not match the architecture of repvgg_tiny: 1 missing key"):
        load_model(tmp_path / "cut.safetensors")  # it named repvgg_custom, the model built from the spec

"""Encoders offline: local hf-hub timm folders, pooling, saved models rebuilt without the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.encoders import TINY_VIT, TINY_VIT_CFG, fill_hf_cache, save_timm_folder

from expreg.modeling.encoders import ModelError, weights_digest
from expreg.modeling.model import ExpRegModel, build_model

GENES = ["A", "B", "C"]


def _build(source, **kwargs) -> ExpRegModel:
    return build_model("resnet18", 3, pretrained_path=str(source), image_size=32, gene_names=GENES, **kwargs).eval()


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_timm_folder_loads_offline_with_its_own_preprocessing(tmp_path, weights):
    source = save_timm_folder(tmp_path / "enc", weights=weights)
    model = _build(tmp_path / "enc")
    own = source.state_dict()
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(own) - {"head.weight", "head.bias"}  # the classifier is dropped
    for key, value in loaded.items():
        assert torch.equal(value, own[key]), key
    config = model.config
    assert config.backbone == TINY_VIT  # the folder names the encoder (model.backbone is not used)
    assert config.image_mean == TINY_VIT_CFG["mean"] and config.image_std == TINY_VIT_CFG["std"]
    assert config.image_interpolation == "bicubic"
    assert config.encoder_source == str(tmp_path / "enc")
    assert config.backbone_config["model_args"]["reg_tokens"] == 4
    assert "file" not in config.backbone_config["pretrained_cfg"]  # no path of this machine in the saved model


@pytest.mark.parametrize("pooling,width", [("avg", 32), ("cls", 32), ("cls+mean", 64)])
def test_pooling_of_a_vit_with_register_tokens(tmp_path, pooling, width):
    source = save_timm_folder(tmp_path / "enc")
    model = _build(tmp_path / "enc", pooling=pooling)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = source.forward_features(x)  # (B, 1 class + 4 register + 16 patch tokens, 32)
        embedding = model.embed(x)
    assert tokens.shape[1] == 21
    patch_mean = tokens[:, 5:].mean(dim=1)  # register tokens are not patches
    expected = {"avg": patch_mean, "cls": tokens[:, 0], "cls+mean": torch.cat([tokens[:, 0], patch_mean], 1)}
    torch.testing.assert_close(embedding, expected[pooling])
    assert model.head.in_features == width


def test_cls_pooling_needs_a_class_token():
    with pytest.raises(ModelError, match="model.pooling=cls needs a class token"):
        build_model("test_resnet", 3, image_size=32, pooling="cls")


def test_a_saved_model_rebuilds_its_encoder_without_the_folder(tmp_path):
    save_timm_folder(tmp_path / "enc")
    model = _build(tmp_path / "enc", pooling="cls+mean", head="mlp")
    model.save_pretrained(tmp_path / "saved")
    for path in (tmp_path / "enc").iterdir():
        path.unlink()
    (tmp_path / "enc").rmdir()
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch, expreg.model; from transformers import AutoModel; "
        f"m = AutoModel.from_pretrained(r'{tmp_path / 'saved'}').eval(); "
        f"torch.save(m(torch.load(r'{tmp_path / 'x.pt'}')).predictions, r'{tmp_path / 'y.pt'}')"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x).predictions, rtol=0, atol=0)


def test_an_hf_hub_backbone_reloads_offline_after_its_cache_is_gone(tmp_path, monkeypatch):
    """``hf-hub:`` names: timm asks the Hub for the config even without weights; the saved model does not."""
    import huggingface_hub

    source = tmp_path / "download"
    save_timm_folder(source, seed=3)
    cache = tmp_path / "hf_cache"
    fill_hf_cache(cache, "expreg-test/tiny-vit", source)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model = build_model("hf-hub:expreg-test/tiny-vit", 3, pretrained=True, image_size=32, gene_names=GENES).eval()
    assert model.config.backbone == "hf-hub:expreg-test/tiny-vit"
    assert model.config.image_mean == TINY_VIT_CFG["mean"]
    model.save_pretrained(tmp_path / "saved")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    reloaded = ExpRegModel.from_pretrained(tmp_path / "saved").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).predictions, model(x).predictions, rtol=0, atol=0)
    assert weights_digest(reloaded.backbone) == weights_digest(model.backbone)


def test_an_hf_hub_backbone_fails_fast_offline_without_a_cache(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(ModelError, match="could not fetch .*hf-hub:expreg-test/missing.*model.pretrained_path"):
        build_model("hf-hub:expreg-test/missing", 3, pretrained=False, image_size=32)


def _write_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_folders_that_are_not_encoders_are_named_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a save_pretrained folder.*hf-hub timm layout"):
        _build(tmp_path / "empty")
    save_timm_folder(tmp_path / "no_weights").state_dict()
    (tmp_path / "no_weights" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"no_weights: no weights \(model.safetensors or pytorch_model.bin\)"):
        _build(tmp_path / "no_weights")
    save_timm_folder(tmp_path / "unknown")
    _write_config(tmp_path / "unknown", architecture="vit_that_does_not_exist")
    with pytest.raises(ModelError, match="config.json: unknown architecture 'vit_that_does_not_exist'"):
        _build(tmp_path / "unknown")
    save_timm_folder(tmp_path / "no_arch")
    config = json.loads((tmp_path / "no_arch" / "config.json").read_text())
    del config["architecture"]
    (tmp_path / "no_arch" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no 'architecture'"):
        _build(tmp_path / "no_arch")
    save_timm_folder(tmp_path / "bad_json")
    (tmp_path / "bad_json" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="bad_json/config.json: not a readable JSON model config"):
        _build(tmp_path / "bad_json")


def test_weights_of_another_shape_name_the_tensor(tmp_path):
    folder = tmp_path / "enc"
    save_timm_folder(folder, model_args={**_args(), "embed_dim": 48, "num_heads": 2})
    _write_config(folder, model_args=_args())  # config.json says 32 wide; the weights are 48 wide
    with pytest.raises(ModelError, match=r"model.safetensors: the weights do not fit .*size mismatch for \S+"):
        _build(folder)
    save_timm_folder(tmp_path / "no_layer_scale")  # timm alone would leave the missing tensors at random init
    with pytest.raises(ModelError, match="tensors the model has but the file lacks: blocks.0.ls1.gamma"):
        _build(tmp_path / "no_layer_scale", encoder_args={"init_values": 1e-5})
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="model.safetensors"):
        _build(folder)


def _args() -> dict:
    from helpers.encoders import TINY_VIT_ARGS

    return dict(TINY_VIT_ARGS)


def test_local_dir_backbone_name_is_the_same_as_pretrained_path(tmp_path):
    save_timm_folder(tmp_path / "enc")
    by_path = _build(tmp_path / "enc")
    by_name = build_model(f"local-dir:{tmp_path / 'enc'}", 3, image_size=32, gene_names=GENES).eval()
    assert weights_digest(by_name.backbone) == weights_digest(by_path.backbone)
    assert by_name.config.backbone == TINY_VIT


def test_a_model_saved_before_backbone_config_existed_still_loads(tmp_path):
    torch.manual_seed(0)
    model = build_model("test_vit", 3, image_size=32, gene_names=GENES).eval()  # timm's own (token) pooling
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("backbone_config", "pooling", "image_interpolation", "encoder_source"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = ExpRegModel.from_pretrained(tmp_path).eval()
    assert old.config.pooling is None and old.config.backbone_config is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(old(x).predictions, model(x).predictions, rtol=0, atol=0)
        torch.testing.assert_close(old.embed(x), old.backbone(x))  # pooled as timm pools it, as before


def test_encoder_args_complete_a_folder_whose_model_card_passes_layers_in_code(tmp_path):
    """Virchow2 / UNI2-h: config.json lacks ``mlp_layer=SwiGLUPacked, act_layer=SiLU``, which their cards pass in code."""
    import timm.layers

    from expreg.config import ConfigError, load_recipe

    args = {**_args(), "mlp_ratio": 5.3375}
    torch.manual_seed(0)
    source = timm.create_model(TINY_VIT, num_classes=0, mlp_layer=timm.layers.SwiGLUPacked, act_layer="silu", **args)
    save_timm_folder(tmp_path / "enc", model_args=args)  # config.json as such cards ship it...
    from safetensors.torch import save_file

    save_file(source.state_dict(), str(tmp_path / "enc" / "model.safetensors"))  # ...with SwiGLU weights
    with pytest.raises(ModelError, match=r"size mismatch for blocks\.0\.mlp\.fc2\.weight"):
        _build(tmp_path / "enc")
    layers = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
    model = _build(tmp_path / "enc", encoder_args=layers)
    assert weights_digest(model.backbone) == weights_digest(source)
    assert model.config.backbone_config["model_args"]["mlp_layer"] == "swiglu_packed"  # recorded, as text
    model.save_pretrained(tmp_path / "saved")
    reloaded = ExpRegModel.from_pretrained(tmp_path / "saved").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).predictions, model(x).predictions, rtol=0, atol=0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  encoder_args: {mlp_layer: swiglu_packed, act_layer: silu}\n")
    assert load_recipe(recipe).model.encoder_kwargs() == layers  # a YAML mapping, or JSON text on the command line
    with pytest.raises(ConfigError, match="model.encoder_args must be a JSON object"):
        load_recipe(None, ["model.encoder_args=[1, 2]"])
    with pytest.raises(ModelError, match="mlp_layer 'swishy': not one of"):
        _build(tmp_path / "enc", encoder_args={"mlp_layer": "swishy"})


def test_a_vit_folder_at_another_input_size_gets_its_position_embedding_resampled(tmp_path):
    source = save_timm_folder(tmp_path / "enc")  # 32-px inputs: 16 patch tokens
    model = build_model("resnet18", 3, pretrained_path=str(tmp_path / "enc"), image_size=48)
    assert model.backbone.pos_embed.shape[1] == 5 + 36 and source.pos_embed.shape[1] == 5 + 16
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.embed(torch.randn(1, 3, 48, 48)).shape == (1, 32)


def test_commands_refuse_a_broken_encoder_folder_before_writing_anything(tmp_path, dataset_csv, capsys):
    from expreg.cv import main as cv_main

    save_timm_folder(tmp_path / "enc")
    (tmp_path / "enc" / "model.safetensors").unlink()
    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml")
    overrides = [f"data.metadata_csv={dataset_csv}", f"model.pretrained_path={tmp_path / 'enc'}"]
    out = tmp_path / "cv"
    assert cv_main([recipe, *overrides, "--methods", "linear_probe", "--out_dir", str(out)]) == 2
    assert "enc: no weights (model.safetensors or pytorch_model.bin)" in capsys.readouterr().err
    assert not out.exists()
    from test_train import train

    result = train(tmp_path / "runs", "broken", *overrides, "train.mode=frozen", expect_ok=False)
    assert result.returncode == 2 and "no weights" in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("backbone", ["test_convnext", "test_efficientnet", "test_maxvit"])
def test_avg_pooling_of_models_that_pool_in_their_head_is_their_own(backbone):
    """ConvNeXt, EfficientNet, MaxViT keep their global pool elsewhere than ``global_pool``: ``avg`` is theirs."""
    torch.manual_seed(0)
    model = build_model(backbone, 3, image_size=64, pooling="avg").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), model.backbone(x), rtol=0, atol=0)
    with pytest.raises(ModelError, match="needs a class token"):
        build_model(backbone, 3, image_size=64, pooling="cls+mean")


def test_cls_pooling_of_a_vit_built_for_average_pooling_is_normalised(tmp_path):
    args = {**_args(), "global_pool": "avg"}  # timm then normalises after pooling (fc_norm), not before
    save_timm_folder(tmp_path / "enc", model_args=args)
    model = _build(tmp_path / "enc", pooling="cls")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.backbone.forward_features(x)
        torch.testing.assert_close(model.embed(x), model.backbone.fc_norm(tokens[:, 0]))
        torch.testing.assert_close(_build(tmp_path / "enc", pooling="avg").embed(x), model.backbone(x))

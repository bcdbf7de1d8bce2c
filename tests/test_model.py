"""ExpRegModel: timm backbone + head as a transformers model; save/load; offline weights."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import timm
import torch
from transformers import AutoModel

from expreg.modeling.model import ExpRegConfig, ExpRegModel, build_model


def _model(backbone="test_resnet", **kwargs) -> ExpRegModel:
    torch.manual_seed(0)
    return build_model(
        backbone,
        5,
        gene_names=["A", "B", "C", "D", "E"],
        target_mean=[1.0, 2.0, 3.0, 4.0, 5.0],
        target_std=[0.5, 1.0, 2.0, 1.0, 1.0],
        image_size=32,
        **kwargs,
    )


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit", "test_efficientnet"])
def test_save_and_load_give_identical_predictions(tmp_path, backbone):
    model = _model(backbone, head="mlp", dropout=0.1).eval()
    x = torch.randn(3, 3, 32, 32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ExpRegModel)
    torch.testing.assert_close(loaded(x).predictions, model(x).predictions, rtol=0, atol=0)
    assert loaded.config.gene_names == ["A", "B", "C", "D", "E"]
    assert loaded.config.target_std == [0.5, 1.0, 2.0, 1.0, 1.0]


def test_auto_model_in_a_fresh_process_without_remote_code(tmp_path):
    _model().save_pretrained(tmp_path)
    code = (
        "import expreg.model, sys; from transformers import AutoModel; "
        f"m = AutoModel.from_pretrained(r'{tmp_path}'); print(type(m).__name__, m.config.model_type)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ExpRegModel", "expreg"]
    assert "auto_map" not in (tmp_path / "config.json").read_text()


def test_timm_initialisation_is_kept():
    torch.manual_seed(0)
    reference = timm.create_model("test_resnet", num_classes=0)
    model = _model()
    expected, mine = reference.state_dict(), model.backbone.state_dict()
    assert list(expected) == list(mine) and len(expected) > 10  # the same tensors, in the same order
    for name, tensor in expected.items():
        assert torch.equal(tensor, mine[name]), name


def test_forward_loss_and_expression_units():
    model = _model().eval()
    x = torch.randn(4, 3, 32, 32)
    labels = torch.randn(4, 5)
    out = model(x, labels=labels)
    assert out.predictions.shape == (4, 5)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.predictions, labels))
    expression = model.predict_expression(x)
    torch.testing.assert_close(
        expression, out.predictions * torch.tensor([0.5, 1.0, 2.0, 1.0, 1.0]) + torch.arange(1.0, 6.0)
    )


def test_config_checks_lengths():
    with pytest.raises(ValueError, match="gene_names has 2 entries for num_genes=3"):
        ExpRegConfig(num_genes=3, gene_names=["a", "b"])


def test_hub_weights_offline_fail_fast_and_clearly():
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="could not fetch pretrained weights.*model.pretrained_path"):
        build_model("resnet18", 5, pretrained=True)
    assert time.perf_counter() - start < 30


def test_local_weights_file_loads_offline(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(123)
    source = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "backbone.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model("test_resnet", 5, pretrained_path=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="could not load local weights"):
        build_model("test_resnet", 5, pretrained_path=str(tmp_path / "missing.safetensors"))


def test_backbone_weights_from_a_save_pretrained_folder(tmp_path):
    source = _model()  # seeded: a "pretrained" expreg model saved by another run
    source.save_pretrained(tmp_path / "saved")
    torch.manual_seed(99)  # a different init, which the loaded weights must replace
    model = build_model("test_resnet", 3, pretrained_path=str(tmp_path / "saved"))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert model.head.out_features == 3  # only the backbone is taken
    other = build_model("test_vit", 3, pretrained_path=str(tmp_path / "saved"))  # the folder names the encoder
    assert other.config.backbone == "test_resnet" and other.config.backbone_config["architecture"] == "test_resnet"
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="not a save_pretrained folder"):
        build_model("test_resnet", 3, pretrained_path=str(tmp_path / "empty"))

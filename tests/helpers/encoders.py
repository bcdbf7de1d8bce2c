"""Small timm encoders saved by the tests in the hf-hub timm layout (what a downloaded foundation model looks like)."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch

# a ViT with a class token and 4 register tokens (as Virchow2 / UNI2-h / H-optimus have), 32-px inputs
TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "reg_tokens": 4}
TINY_VIT_CFG = {
    "input_size": [3, 32, 32],
    "interpolation": "bicubic",
    "mean": [0.7, 0.6, 0.8],
    "std": [0.15, 0.2, 0.1],
    "num_classes": 10,
    "classifier": "head",
}


def save_timm_folder(
    folder: Path,
    architecture: str = TINY_VIT,
    model_args: dict | None = None,
    pretrained_cfg: dict | None = None,
    seed: int = 0,
    weights: str = "model.safetensors",
) -> torch.nn.Module:
    """Build a seeded timm model with a 10-class classifier, save it as ``folder`` (config.json + weights); return it."""
    model_args = dict(TINY_VIT_ARGS if model_args is None else model_args)
    pretrained_cfg = dict(TINY_VIT_CFG if pretrained_cfg is None else pretrained_cfg)
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=10, **model_args).eval()
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": architecture,
        "num_classes": 10,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(folder / weights))
    else:
        torch.save(model.state_dict(), folder / weights)
    return model


def fill_hf_cache(cache: Path, repo_id: str, source: Path, revision: str = "0" * 40) -> None:
    """Put a model folder into a Hugging Face hub cache as ``repo_id`` (what a past download leaves)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for path in source.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())

"""``train.mode=frozen``: the head trained on cached embeddings by the fine-tuning loop; a complete saved model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.encoders import TINY_VIT, save_timm_folder
from test_train import TWO_PROCESSES, assert_same_run, metrics, resume, train

from expreg.config import ConfigError, load_recipe
from expreg.modeling.encoders import weights_digest
from expreg.modeling.model import ExpRegModel
from expreg.predict import main as predict_main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def frozen_setup(tmp_path_factory):
    """A synthetic data set, a ViT encoder folder (class + 4 register tokens) and a frozen-head reference run."""
    from expreg.data.demo import make_synthetic_dataset

    root = tmp_path_factory.mktemp("frozen")
    data_csv = make_synthetic_dataset(root / "data", 5, 12, 16, 50, seed=3)
    save_timm_folder(root / "encoder", seed=7)
    settings = (
        f"data.metadata_csv={data_csv}",
        f"model.pretrained_path={root / 'encoder'}",
        "model.pooling=cls+mean",
        "model.head=mlp",
        "model.dropout=0.2",
        "data.image_size=32",
        "data.augment_dihedral=true",
        f"data.image_cache_dir={root / 'cache'}",
        "train.mode=frozen",
        "train.epochs=3",
        "train.checkpointing_steps=5",
    )
    result = train(root / "runs", "reference", *settings)
    return root, settings, result


def test_the_head_trains_on_cached_embeddings_and_the_saved_model_is_complete(frozen_setup, tmp_path):
    root, _, result = frozen_setup
    run = root / "runs" / "reference"
    m = metrics(run)
    assert m["status"] == "finished" and m["epochs_done"] == 3 and m["best_val_spearman_mean"] is not None
    stores = sorted((root / "cache" / "embeddings").iterdir())
    assert len(stores) == 8  # every image of the run in each of the 8 views
    recorded = json.loads((run / "embedding_stores.json").read_text())
    assert recorded["stores"] == [str(s) for s in sorted(stores, key=lambda p: int(p.name.split("-view")[1][0]))]
    assert "(float32, views 0, 1, 2, 3, 4, 5, 6, 7) = about" in result.stdout  # one pass, one size estimate
    assert len(re.findall(r"embedded [\d,]+ images x 8 view\(s\)", result.stdout)) == 1
    log = (run / "log.txt").read_text()
    assert "mode frozen" in log and f"embedding store: {stores[0]}" in log  # where they are, in the run's log
    model = ExpRegModel.from_pretrained(run / "checkpoints" / "best")
    config = model.config
    assert config.backbone == TINY_VIT and config.pooling == "cls+mean" and config.head == "mlp"
    info = json.loads((stores[0] / "info.json").read_text())
    assert weights_digest(model.backbone) == info["weights_sha256"]  # the encoder the store was made with
    assert "frozen encoder" in (run / "checkpoints" / "best" / "README.md").read_text()
    # expreg.predict runs the saved encoder + head on the images: the run's own validation predictions
    val = pd.read_csv(run / "predictions_val.csv")
    data_dir = Path(json.loads(json.dumps(str(root / "data"))))
    pd.DataFrame({"path": [str(data_dir / p) for p in val["path"]]}).to_csv(tmp_path / "val.csv", index=False)
    args = ["--model", str(run), "--metadata_csv", str(tmp_path / "val.csv"), "--out_csv", str(tmp_path / "p.csv")]
    assert predict_main([*args, "--num_workers", "0"]) == 0
    predicted = pd.read_csv(tmp_path / "p.csv")
    genes = list(config.gene_names)
    np.testing.assert_allclose(predicted[genes].to_numpy(), val[genes].to_numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # 20 s of stop and resume: the slow tier
def test_stop_and_resume_equals_uninterrupted_and_reuses_the_stores(frozen_setup):
    root, settings, _ = frozen_setup
    out = root / "runs"
    stopped = train(out, "stopped", *settings, "train.stop_after_steps=7")
    assert not re.search(r"embedded [\d,]+ images", stopped.stdout)  # every store existed: nothing embedded again
    state = json.loads((out / "stopped" / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["global_step"] == 7 and state["batches_done"] > 0  # mid-epoch
    resumed = resume(out / "stopped" / "checkpoints" / "last")
    assert not re.search(r"embedded [\d,]+ images", resumed.stdout)
    assert_same_run(out / "reference", out / "stopped")


@pytest.mark.slow
def test_resume_refuses_another_encoder(frozen_setup, tmp_path):
    import shutil

    root, settings, _ = frozen_setup
    shutil.copytree(root / "encoder", tmp_path / "encoder")
    mine = [s for s in settings if not s.startswith("model.pretrained_path")]
    mine.append(f"model.pretrained_path={tmp_path / 'encoder'}")
    train(tmp_path / "runs", "stopped", *mine, "train.stop_after_steps=3")
    save_timm_folder(tmp_path / "encoder", seed=8)  # the folder's weights change meanwhile
    result = resume(tmp_path / "runs" / "stopped" / "checkpoints" / "last", expect_ok=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the encoder differs from the one this run's head was trained on (weights_sha256 changed" in result.stderr


def test_jitter_cannot_be_cached():
    with pytest.raises(ConfigError, match="train.mode=frozen .* colour and stain jitter"):
        load_recipe(REPO / "recipes" / "tiny.yaml", ["train.mode=frozen", "data.hed_jitter=0.1"])


def test_each_epoch_draws_its_own_views_reproducibly():
    from expreg.training.frozen import EmbeddingRows

    views = [np.full((50, 2), v, dtype=np.float32) for v in range(8)]
    rows = EmbeddingRows(views, np.zeros((50, 3)), [f"p{i}" for i in range(50)], seed=0)
    drawn = {}
    for epoch in (0, 1, 0):
        rows.set_epoch(epoch)
        drawn.setdefault(epoch, []).append(rows.__getitems__(list(range(50)))["pixel_values"][:, 0].numpy())
    np.testing.assert_array_equal(drawn[0][0], drawn[0][1])  # the same epoch, the same views
    assert (drawn[0][0] != drawn[1][0]).mean() > 0.5 and len(set(drawn[0][0].tolist())) == 8


@pytest.mark.slow
def test_two_processes_share_the_stores_and_resume_exactly(frozen_setup, tmp_path):
    root, settings, _ = frozen_setup
    settings = tuple(s for s in settings if not s.startswith("data.image_cache_dir")) + (
        f"data.image_cache_dir={tmp_path / 'cache'}",
    )
    train(tmp_path, "ddp", *settings, launcher=TWO_PROCESSES)
    assert metrics(tmp_path / "ddp")["num_processes"] == 2
    assert len(list((tmp_path / "cache" / "embeddings").iterdir())) == 8  # built once, by both processes
    train(tmp_path, "ddp_stopped", *settings, "train.stop_after_steps=4", launcher=TWO_PROCESSES)
    resume(tmp_path / "ddp_stopped" / "checkpoints" / "last", launcher=TWO_PROCESSES)
    assert_same_run(tmp_path / "ddp", tmp_path / "ddp_stopped")
    one = ExpRegModel.from_pretrained(root / "runs" / "reference" / "checkpoints" / "best")
    two = ExpRegModel.from_pretrained(tmp_path / "ddp" / "checkpoints" / "best")
    assert weights_digest(one.backbone) == weights_digest(two.backbone)  # the same frozen encoder


@pytest.mark.slow
def test_the_same_encoder_folder_can_be_fine_tuned(frozen_setup):
    root, settings, _ = frozen_setup
    finetune = [s for s in settings if not s.startswith(("train.mode", "train.epochs"))] + ["train.epochs=1"]
    train(root / "runs", "finetuned", *finetune, "train.mode=finetune")
    tuned = ExpRegModel.from_pretrained(root / "runs" / "finetuned" / "checkpoints" / "best")
    frozen = ExpRegModel.from_pretrained(root / "runs" / "reference" / "checkpoints" / "best")
    assert tuned.config.backbone_config == frozen.config.backbone_config  # the same encoder, rebuilt offline
    assert weights_digest(tuned.backbone) != weights_digest(frozen.backbone)  # and this time it was trained
    assert metrics(root / "runs" / "finetuned")["status"] == "finished"


@pytest.mark.slow
def test_a_dry_run_embeds_only_the_rows_it_reads(frozen_setup, tmp_path):
    root, settings, _ = frozen_setup
    dry = [s for s in settings if not s.startswith("data.image_cache_dir")] + [f"data.image_cache_dir={tmp_path}"]
    result = train(tmp_path / "runs", "dry", *dry, "--dry_run")
    assert "dry run: only the rows it reads are embedded (train 24, validation 11)" in result.stdout
    info = json.loads(next((tmp_path / "embeddings").glob("*view0*/info.json")).read_text())
    assert info["num_images"] == 35  # batch 8 x 3 steps, and the 11 validation rows (< 2 batches of 8)

"""The embedding store: each image embedded once per encoder/weights/preprocessing/view, memory-mapped, shared."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from expreg.embeddings import EmbeddingStoreError, dihedral_view, ensure_embedding_views, ensure_embeddings
from expreg.inference import dihedral_views, image_loader
from expreg.modeling.model import build_model

REPO = Path(__file__).resolve().parent.parent


def _model(seed: int = 0, image_size: int = 16, backbone: str = "test_resnet", **kwargs):
    torch.manual_seed(seed)
    return build_model(backbone, 3, image_size=image_size, **kwargs).eval()


def _files(csv: Path) -> list[str]:
    return [str(csv.parent / p) for p in pd.read_csv(csv)["path"]]


def _direct(model, files, view: int = 0) -> np.ndarray:
    """What the encoder gives for these images, batch by batch, without any store."""
    rows = []
    with torch.inference_mode():
        for pixel_values in image_loader(model, files, batch_size=8, num_workers=0):
            rows.append(model.embed(dihedral_views(pixel_values)[view]).numpy())
    return np.concatenate(rows)


class _Counting:
    """Counts the images the encoder sees."""

    def __init__(self, model) -> None:
        self.images = 0
        model.backbone.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.images += len(args[0])


def test_built_once_then_read_from_the_memory_map(dataset_csv, tmp_path, capsys):
    files = _files(dataset_csv)
    model = _model().train()  # as a training run hands it over: the store is still made in eval mode
    seen = _Counting(model)
    store = ensure_embeddings(model, files, cache_root=tmp_path, batch_size=8)
    assert model.training  # and the model is given back as it came
    model.eval()
    out = capsys.readouterr().out
    assert f"embedding store: {len(files)} images x {store.num_features} features (float32, view 0) = about" in out
    assert seen.images == len(files)
    again = ensure_embeddings(model, list(reversed(files)), cache_root=tmp_path)  # any order: the same set
    assert seen.images == len(files) and again.folder == store.folder  # nothing embedded the second time
    assert isinstance(again.array, np.memmap) and again.array.dtype == np.float32
    np.testing.assert_allclose(again.get(files), _direct(model, files), rtol=1e-5, atol=1e-6)
    subset = files[::3]
    np.testing.assert_array_equal(again.get(subset), again.get(files)[::3])  # rows follow the order asked for


def test_each_part_of_the_identity_makes_its_own_store(dataset_csv, tmp_path):
    files = _files(dataset_csv)
    base = ensure_embeddings(_model(), files, cache_root=tmp_path).folder
    folders = {
        "other weights": ensure_embeddings(_model(seed=1), files, cache_root=tmp_path).folder,
        "other size": ensure_embeddings(_model(image_size=24), files, cache_root=tmp_path).folder,
        "other view": ensure_embeddings(_model(), files, view=3, cache_root=tmp_path).folder,
        "other images": ensure_embeddings(_model(), files[:-1], cache_root=tmp_path).folder,
        "other mean": ensure_embeddings(_model(image_mean=[0.5] * 3), files, cache_root=tmp_path).folder,
    }
    vit = {pooling: _model(backbone="test_vit", image_size=32, pooling=pooling) for pooling in ("avg", "cls")}
    for name, model in vit.items():  # the same weights, pooled two ways
        folders[f"vit {name}"] = ensure_embeddings(model, files, cache_root=tmp_path).folder
    assert ensure_embeddings(_model(), files, cache_root=tmp_path).folder == base  # same seed: same weights
    assert len({base, *folders.values()}) == 8, folders
    os.utime(files[0], ns=(1, 1))  # an image changed on disk
    assert ensure_embeddings(_model(), files, cache_root=tmp_path).folder != base


def test_a_view_is_the_rotated_and_flipped_image(dataset_csv, tmp_path):
    files = _files(dataset_csv)[:10]
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    for view, expected in enumerate(dihedral_views(x)):
        assert torch.equal(dihedral_view(x, view), expected)
    store = ensure_embeddings(model, files, view=5, cache_root=tmp_path)
    np.testing.assert_allclose(store.get(files), _direct(model, files, view=5), rtol=1e-5, atol=1e-6)
    assert store.info["view"] == 5
    seen = _Counting(model)
    stores = ensure_embedding_views(model, files, views=[2, 5, 7], cache_root=tmp_path)  # one pass for the two missing
    assert [s.info["view"] for s in stores] == [2, 5, 7] and stores[1].folder == store.folder
    assert seen.images == 2 * len(files)  # view 5 existed; each image decoded once for views 2 and 7
    for s in stores:
        np.testing.assert_allclose(s.get(files), _direct(model, files, view=s.info["view"]), rtol=1e-5, atol=1e-6)


def test_unknown_images_and_a_full_disk_are_clear_errors(dataset_csv, tmp_path, monkeypatch):
    files = _files(dataset_csv)
    store = ensure_embeddings(_model(), files[1:], cache_root=tmp_path)
    with pytest.raises(EmbeddingStoreError, match=f"{files[0]} is not in the embedding store"):
        store.get(files[:2])
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
    with pytest.raises(EmbeddingStoreError, match="needs about .* which has 100 B free: set EXPREG_CACHE"):
        ensure_embeddings(_model(), files, cache_root=tmp_path / "other")
    assert not list((tmp_path / "other" / "embeddings").glob("*"))  # nothing half-written


def test_an_unreadable_image_is_named_and_nothing_is_written(dataset_csv, tmp_path):
    from expreg.data import UnreadableImageError

    files = _files(dataset_csv)
    Path(files[4]).write_bytes(b"not a png")
    with pytest.raises(UnreadableImageError, match=Path(files[4]).name):
        ensure_embeddings(_model(), files, cache_root=tmp_path)
    assert not [p for p in (tmp_path / "embeddings").iterdir() if not p.name.startswith(".")]


_BUILD = """
import sys, torch, numpy as np
from accelerate import Accelerator
from expreg.embeddings import ensure_embeddings
from expreg.modeling.model import build_model
torch.manual_seed(0)
model = build_model("test_resnet", 3, image_size=16)
files = [line for line in open(sys.argv[1]).read().splitlines() if line]
store = ensure_embeddings(model, files, accelerator=Accelerator(cpu=True), cache_root=sys.argv[2], batch_size=5)
print("STORE", store.folder, len(store))
"""


@pytest.mark.slow
def test_two_processes_share_the_building_with_no_image_lost_or_repeated(make_dataset, tmp_path):
    from test_train import TWO_PROCESSES, _env

    files = _files(make_dataset(num_groups=3, samples_per_group=13))[:39]  # 8 batches of 5 (the last padded)
    (tmp_path / "files.txt").write_text("\n".join(files))
    (tmp_path / "build.py").write_text(_BUILD)
    cmd = [*TWO_PROCESSES, str(tmp_path / "build.py"), str(tmp_path / "files.txt"), str(tmp_path / "two")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("STORE")] == ["39", "39"]
    two = ensure_embeddings(_model(), files, cache_root=tmp_path / "two")  # the same store: opened, not rebuilt
    assert sorted(two.paths) == sorted(files) and len(two) == 39
    one = ensure_embeddings(_model(), files, cache_root=tmp_path / "one", batch_size=5)
    np.testing.assert_allclose(two.get(files), one.get(files), rtol=1e-5, atol=1e-6)

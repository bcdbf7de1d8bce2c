"""The decoded-image cache: same pixels as decoding, rebuilt when images or size change, bad images recorded."""

from __future__ import annotations

import os
import pickle
import shutil

import datasets
import pytest
import torch

from expreg.data import build_dataloaders, decode_resized, load_expression_dataset, load_image
from expreg.image_cache import ImageCacheError, ensure_image_cache


def _paths(csv) -> list[str]:
    ds = load_expression_dataset(csv)
    out = []
    for part in ds.values():
        out += [item["path"] for item in part.cast_column("image", datasets.Image(decode=False))["image"]]
    return out


def _folders(root) -> list[str]:
    return sorted(p.name for p in (root / "images").iterdir())


def test_cached_pixels_equal_decoded_pixels_also_after_pickling(dataset_csv, tmp_path):
    paths = _paths(dataset_csv)
    cache = ensure_image_cache(paths, 24, tmp_path, progress=False)
    assert len(cache) == len(paths)
    reopened = pickle.loads(pickle.dumps(cache))  # how DataLoader workers get it
    for path in paths:
        pixels, reason = reopened.get(path)
        assert reason is None and pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 24)
        assert torch.equal(pixels, decode_resized(load_image(path)[0], 24))
    with pytest.raises(KeyError, match="not in the image cache"):
        cache.get(str(tmp_path / "elsewhere.png"))


def test_training_batches_are_identical_with_and_without_the_cache(dataset_csv, tmp_path):
    ds = load_expression_dataset(dataset_csv)
    cache = ensure_image_cache(_paths(dataset_csv), 20, tmp_path, num_workers=2, progress=False)
    batches = {}
    for name, image_cache in (("files", None), ("cache", cache)):
        loaders = build_dataloaders(
            ds, image_size=20, batch_size=8, num_workers=2, seed=3, color_jitter=0.2, hed_jitter=0.05,
            image_cache=image_cache,
        )  # fmt: skip
        loaders["train_sampler"].set_epoch(1)
        loaders["train_transform"].set_epoch(1)
        batches[name] = [b["pixel_values"] for b in loaders["train"]] + [
            b["pixel_values"] for b in loaders["validation"]
        ]
    assert len(batches["files"]) == len(batches["cache"]) > 2
    for a, b in zip(batches["files"], batches["cache"]):
        assert torch.equal(a, b)


def test_cache_is_reused_and_rebuilt_when_an_image_or_the_size_changes(dataset_csv, tmp_path):
    paths = _paths(dataset_csv)
    first = ensure_image_cache(paths, 16, tmp_path, progress=False)
    again = ensure_image_cache(list(reversed(paths)), 16, tmp_path, progress=False)  # order does not matter
    assert again.folder == first.folder and len(_folders(tmp_path)) == 1
    assert ensure_image_cache(paths, 32, tmp_path, progress=False).folder != first.folder
    replacement = paths[1]  # overwrite one image with another's content: new bytes, new mtime
    shutil.copyfile(paths[0], replacement)
    os.utime(replacement, ns=(1, 1))
    changed = ensure_image_cache(paths, 16, tmp_path, progress=False)
    assert changed.folder not in (first.folder,) and len(_folders(tmp_path)) == 3
    assert torch.equal(changed.get(replacement)[0], changed.get(paths[0])[0])
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]  # no staging left


def test_unreadable_images_are_recorded_with_the_reason(dataset_csv, tmp_path):
    paths = _paths(dataset_csv)
    with open(paths[2], "r+b") as f:
        f.truncate(40)
    cache = ensure_image_cache(paths, 16, tmp_path, progress=False)
    pixels, reason = cache.get(paths[2])
    assert pixels is None and reason
    assert cache.unreadable() == [(paths[2], reason)]
    assert cache.get(paths[3])[1] is None


def test_not_enough_disk_space_is_a_clear_error(dataset_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ImageCacheError, match=r"needs about .* GB free: set data.image_cache_dir"):
        ensure_image_cache(_paths(dataset_csv), 64, tmp_path, progress=False)
    assert not list((tmp_path / "images").iterdir())

"""The decoded-image cache: same pixels as decoding, rebuilt when images or size change, bad images recorded."""

from __future__ import annotations

import os
import pickle
import shutil

import datasets
import pytest
import torch

from expreg.config import RunConfig
from expreg.data import build_dataloaders, decode_resized, load_expression_dataset, load_image
from expreg.data import image_cache as image_cache
from expreg.data.image_cache import ImageCacheError, ensure_image_cache


def _paths(csv) -> list[str]:
    ds = load_expression_dataset(csv)
    out = []
    for part in ds.values():
        out += [item["path"] for item in part.cast_column("image", datasets.Image(decode=False))["image"]]
    return out


def _folders(root) -> list[str]:
    return sorted(p.name for p in (root / "images").iterdir())


def test_cached_pixels_equal_decoded_pixels_also_after_pickling(dataset_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(image_cache, "ROWS_PER_BATCH", 7)  # several Arrow record batches, a short last one
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
    for name, source in (("files", None), ("cache", cache)):
        loaders = build_dataloaders(
            ds, image_size=20, batch_size=8, num_workers=2, seed=3, color_jitter=0.2, hed_jitter=0.05,
            image_cache=source,
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
    with open(paths[4], "wb") as f:
        f.write(b"not an image at all")
    cache = ensure_image_cache(paths, 16, tmp_path, progress=False)
    pixels, reason = cache.get(paths[2])
    assert pixels is None and reason
    assert sorted(cache.unreadable()) == sorted([(paths[2], reason), (paths[4], cache.get(paths[4])[1])])
    assert paths[4] in cache.get(paths[4])[1]  # the reason names the file
    assert cache.get(paths[3])[1] is None


def test_unreadable_evaluation_images_stop_the_run_even_when_training_skips(dataset_csv, tmp_path):
    from types import SimpleNamespace

    from expreg.data import UnreadableImageError
    from expreg.training.setup import setup_image_cache as _setup_image_cache

    ds = load_expression_dataset(dataset_csv)
    victim = ds["validation"].cast_column("image", datasets.Image(decode=False))[0]["image"]["path"]
    with open(victim, "wb") as f:
        f.write(b"broken")
    cfg = RunConfig()
    cfg.data.image_cache, cfg.data.image_cache_dir, cfg.data.image_size = True, str(tmp_path), 16
    cfg.data.bad_image_policy = "skip"
    accelerator = SimpleNamespace(is_local_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(UnreadableImageError, match=r"1 validation image\(s\) cannot be decoded: .*evaluation needs"):
        _setup_image_cache(cfg, SimpleNamespace(datasets=ds), accelerator)


def test_a_cache_of_another_size_is_refused(dataset_csv, tmp_path):
    ds = load_expression_dataset(dataset_csv)
    cache = ensure_image_cache(_paths(dataset_csv), 16, tmp_path, progress=False)
    with pytest.raises(ValueError, match="holds 16-px images, not 24"):
        build_dataloaders(ds, image_size=24, batch_size=4, image_cache=cache)


def test_half_built_caches_of_dead_processes_are_removed(dataset_csv, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    images = tmp_path / "images"
    abandoned = images / f".16px-0123.{image_cache._HOST}.{pid}.tmp"
    abandoned.mkdir(parents=True)
    mine = images / f".16px-0123.{image_cache._HOST}.{os.getpid()}.tmp"  # alive: kept
    mine.mkdir()
    ensure_image_cache(_paths(dataset_csv), 16, tmp_path, progress=False)
    assert not abandoned.exists() and mine.exists()


def test_not_enough_disk_space_is_a_clear_error(dataset_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ImageCacheError, match=r"needs about .* GB free: set data.image_cache_dir"):
        ensure_image_cache(_paths(dataset_csv), 64, tmp_path, progress=False)
    assert not list((tmp_path / "images").iterdir())


def test_an_unwritable_cache_folder_is_a_clear_error(dataset_csv, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(ImageCacheError, match=r"cannot write the decoded-image cache in .*data.image_cache_dir"):
        ensure_image_cache(_paths(dataset_csv), 16, blocker, progress=False)

"""The dataset object, transforms, train-only target statistics and seeding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from expreg.data import (
    ExpressionTransform,
    ImageTransform,
    TargetStats,
    collate_fn,
    compute_target_stats,
    dataset_gene_names,
    load_expression_dataset,
    to_rgb,
)
from expreg.data.metadata import MetadataError
from expreg.seeding import derive_seed, epoch_generator
from expreg.splits import main as splits_main


@pytest.fixture
def split_csv(dataset_csv, tmp_path):
    out = tmp_path / "split.csv"
    assert splits_main(["--metadata_csv", str(dataset_csv), "--out_csv", str(out), "--test_frac", "0.2"]) == 0
    return out


def test_dataset_dict_rows(dataset_csv, split_csv):
    ds = load_expression_dataset(dataset_csv, split_csv)
    assert set(ds) == {"train", "validation", "test"}
    split = pd.read_csv(split_csv)
    for name, part in ds.items():
        assert sorted(part["path"]) == sorted(split.loc[split["split"] == name, "path"])
    row = ds["train"][0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (16, 16)
    assert len(row["labels"]) == 50 and ds["train"].features["labels"].feature.dtype == "float32"
    assert row["sample_id"].endswith("_s1")  # extra columns kept
    assert dataset_gene_names(ds)[:2] == ["GENE00", "GENE01"]
    meta = pd.read_csv(dataset_csv).set_index("path")
    expected = meta.loc[row["path"], [f"y{i}" for i in range(50)]].to_numpy(dtype=np.float64)  # pandas 2: object row
    np.testing.assert_allclose(row["labels"], expected, rtol=1e-6)


def test_without_split_file_a_group_split_is_made(dataset_csv):
    ds = load_expression_dataset(dataset_csv, seed=1)
    assert set(ds) == {"train", "validation"}
    assert not set(ds["train"]["group_id"]) & set(ds["validation"]["group_id"])


def test_fold_file_holds_out_one_fold_and_validates_on_training_groups(dataset_csv, tmp_path):
    folds = tmp_path / "folds.csv"
    assert splits_main(["--metadata_csv", str(dataset_csv), "--out_csv", str(folds), "--n_folds", "5"]) == 0
    ds = load_expression_dataset(dataset_csv, folds, fold=2)
    held_out = set(pd.read_csv(folds).query("fold == 2")["group_id"])
    assert set(ds["test"]["group_id"]) == held_out
    assert not held_out & (set(ds["train"]["group_id"]) | set(ds["validation"]["group_id"]))
    with pytest.raises(MetadataError, match="choose the held-out fold"):
        load_expression_dataset(dataset_csv, folds)


def test_target_stats_use_training_split_only(dataset_csv, split_csv):
    before = compute_target_stats(load_expression_dataset(dataset_csv, split_csv)["train"])
    frame = pd.read_csv(dataset_csv, dtype=str, keep_default_na=False)
    val_paths = pd.read_csv(split_csv).query("split != 'train'")["path"]
    frame.loc[frame["path"].isin(val_paths), "y0"] = "1000.0"
    frame.to_csv(dataset_csv, index=False)
    ds = load_expression_dataset(dataset_csv, split_csv)
    after = compute_target_stats(ds["train"])
    np.testing.assert_array_equal(before.mean, after.mean)
    np.testing.assert_array_equal(before.std, after.std)
    assert max(ds["validation"]["labels"], key=lambda r: r[0])[0] == 1000.0  # the change did land


def test_target_stats_round_trip_and_constant_genes():
    labels = np.array([[1.0, 5.0], [3.0, 5.0]])
    stats = TargetStats.from_labels(labels)
    np.testing.assert_allclose(stats.std, [1.0, 1.0])  # constant gene gets std 1
    z = stats.normalize(labels.astype(np.float32))
    np.testing.assert_allclose(z[:, 0], [-1.0, 1.0])
    np.testing.assert_allclose(stats.denormalize(z), labels, rtol=1e-6)
    again = TargetStats.from_dict(stats.to_dict())
    np.testing.assert_array_equal(again.mean, stats.mean)


def test_transform_outputs_normalised_batches(dataset_csv, split_csv):
    ds = load_expression_dataset(dataset_csv, split_csv)
    stats = compute_target_stats(ds["train"])
    train = ds["train"].with_transform(ExpressionTransform(ImageTransform(24, train=True, seed=0), stats))
    batch = collate_fn([train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 24, 24) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (4, 50)
    all_labels = np.asarray(ds["train"]["labels"])
    np.testing.assert_allclose(batch["labels"].numpy(), stats.normalize(all_labels[:4]), rtol=1e-5, atol=1e-6)


def test_augmentation_depends_only_on_seed_epoch_and_path():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(20, 20, 3), dtype=np.uint8))
    t = ImageTransform(20, train=True, seed=5, mean=(0, 0, 0), std=(1, 1, 1))
    same = [t(image, "a.png") for _ in range(2)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    draws = set()
    for epoch in range(12):
        t.set_epoch(epoch)
        draws.add(t(image, "a.png").numpy().tobytes())
    assert len(draws) > 2  # dihedral transform varies across epochs
    evaluation = ImageTransform(20, train=False, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(
        evaluation(image, "a.png") * 255, torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
    )


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "F"])
def test_any_image_mode_becomes_rgb(mode):
    base = Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 128/255 of the 16-bit range
    elif mode == "F":
        image = Image.fromarray(np.full((8, 8), 128 / 255, dtype=np.float32))
    else:
        image = base.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    if mode in ("L", "I;16", "F"):  # (P quantises to a palette)
        assert abs(int(np.asarray(rgb)[0, 0, 0]) - 128) <= 1


@pytest.mark.parametrize(
    ("mode", "low", "high", "value", "expected"),
    [
        ("I", 200, 300, 200, round(200 / 65535 * 255)),  # 32-bit integer: the fixed 0..65535 range
        ("F", 0.5, 2.0, 0.5, 128),  # float: the fixed 0..1 range (2.0 is clipped)
    ],
)
def test_high_bit_depth_images_use_one_fixed_range(mode, low, high, value, expected):
    """The same pixel value gives the same intensity whatever else the image holds (never its own maximum)."""
    dtype = np.int32 if mode == "I" else np.float32
    only_low = Image.fromarray(np.full((4, 4), low, dtype=dtype))
    with_high = np.full((4, 4), value, dtype=dtype)
    with_high[0, 0] = high
    with_high = Image.fromarray(with_high)
    assert only_low.mode == with_high.mode == mode
    a, b = np.asarray(to_rgb(only_low)), np.asarray(to_rgb(with_high))
    assert a[1, 1, 0] == b[1, 1, 0] == expected


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(1, 2, "x") == derive_seed(1, 2, "x")
    assert len({derive_seed(1, e, "x") for e in range(50)}) == 50
    a = torch.randperm(100, generator=epoch_generator(0, 3))
    b = torch.randperm(100, generator=epoch_generator(0, 3))
    assert torch.equal(a, b) and not torch.equal(a, torch.randperm(100, generator=epoch_generator(0, 4)))


def test_loading_attempts_no_network(dataset_csv, split_csv):
    """Without HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (conftest sets them for every other test), in a fresh process."""
    import os
    import subprocess
    import sys

    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise AssertionError('network access attempted')\n"
        "socket.socket.connect = refuse; socket.getaddrinfo = refuse; socket.create_connection = refuse\n"
        "from expreg.data.dataset import load_expression_dataset\n"
        "ds = load_expression_dataset(sys.argv[1], sys.argv[2])\n"
        "assert len(ds['train']) > 0 and ds['train'][0]['image'] is not None\n"
        "print('rows', sum(len(p) for p in ds.values()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    result = subprocess.run(
        [sys.executable, "-c", code, str(dataset_csv), str(split_csv)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"rows {len(pd.read_csv(dataset_csv))}"


def test_splits_are_memory_mapped_arrow_files_removed_at_exit_or_after_a_crash(dataset_csv, split_csv, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from expreg.data.dataset import load_expression_dataset as load; "
        "ds = load(sys.argv[1], sys.argv[2]); files = [f['filename'] for p in ds.values() for f in p.cache_files]; "
        "print(files[0]); assert len(files) == len(ds)"
    )
    env = {"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    from expreg.data.arrow_files import host_name as _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left_by_a_killed_run = tmp_path / f"expreg-arrow-{_host()}-{int(dead.stdout)}-abc123"
    (left_by_a_killed_run / "build-0").mkdir(parents=True)
    # A TMPDIR shared between nodes: another machine's live run, whose pid is not alive *here*
    other_node = tmp_path / f"expreg-arrow-{_host()}x-{int(dead.stdout)}-def456"
    (other_node / "build-0").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-c", code, str(dataset_csv), str(split_csv)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    arrow_file = result.stdout.strip().splitlines()[-1]
    assert arrow_file.startswith(str(tmp_path / f"expreg-arrow-{_host()}-")) and arrow_file.endswith(".arrow")
    # its own removed at exit, the killed run's of this machine on first use, the other machine's kept
    assert list(tmp_path.glob("expreg-arrow-*")) == [other_node]


def test_rows_survive_the_arrow_round_trip(dataset_csv, split_csv):
    import datasets

    from expreg.data.metadata import read_metadata

    ds = load_expression_dataset(dataset_csv, split_csv)
    metadata = read_metadata(dataset_csv)
    by_path = dict(zip(metadata.frame["path"], metadata.targets()))
    groups = dict(zip(metadata.frame["path"], metadata.frame["group_id"]))
    rows = [row for part in ds.values() for row in part.cast_column("image", datasets.Image(decode=False))]
    assert sorted(r["path"] for r in rows) == sorted(metadata.frame["path"])
    for row in rows:
        np.testing.assert_array_equal(np.asarray(row["labels"], dtype=np.float32), by_path[row["path"]])
        assert row["group_id"] == groups[row["path"]] and row["image"]["path"].endswith(row["path"])


def test_result_files_are_readable_by_others(tmp_path):
    import os
    import stat

    from expreg.run_dir import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


def test_training_order_changes_every_epoch_and_is_reproducible():
    from expreg.data import EpochBatchSampler

    def order(epoch: int, seed: int = 0) -> list[int]:
        sampler = EpochBatchSampler(50, 8, seed=seed)
        sampler.set_epoch(epoch)
        return [i for batch in sampler for i in batch]

    assert sorted(order(0)) == list(range(50))
    assert order(0) != order(1) != order(2) and order(0) != order(2)  # a new shuffle each epoch
    assert order(1) == order(1)  # a fresh sampler at the same epoch: the same order (exact resume)
    assert order(1, seed=1) != order(1)


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)  # dark colour...
    rgba[0, 0, 3] = 0  # ...fully transparent here
    rgba[1:, :, 3] = 255  # opaque elsewhere
    rgba[0, 1:, 3] = 128  # half transparent
    out = np.asarray(to_rgb(Image.fromarray(rgba, mode="RGBA")))
    assert tuple(out[0, 0]) == (255, 255, 255)  # slide background, not the hidden colour
    assert tuple(out[2, 2]) == (10, 20, 30)
    assert all(abs(int(v) - (c + 255) / 2) <= 1 for v, c in zip(out[0, 1], (10, 20, 30)))
    la = Image.fromarray(np.stack([np.full((2, 2), 0, np.uint8), np.zeros((2, 2), np.uint8)], -1), mode="LA")
    assert tuple(np.asarray(to_rgb(la))[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("num_processes", [1, 2, 3])
@pytest.mark.parametrize("num_samples", [2 * 3, 17, 33, 48, 49, 50, 97])
def test_each_training_sample_once_per_epoch_across_processes(num_samples, num_processes):
    """The batches accelerate deals to each process: every sample exactly once, equal batch counts."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from expreg.data import EpochBatchSampler

    sampler = EpochBatchSampler(num_samples, 8, seed=0, num_processes=num_processes)
    sampler.set_epoch(3)
    loader = DataLoader(list(range(num_samples)), batch_sampler=sampler)
    per_process = [
        [
            batch.tolist()
            for batch in prepare_data_loader(
                loader, num_processes=num_processes, process_index=rank, put_on_device=False
            )
        ]
        for rank in range(num_processes)
    ]
    seen = sorted(i for batches in per_process for batch in batches for i in batch)
    assert seen == list(range(num_samples))
    assert len({len(batches) for batches in per_process}) == 1  # no process waits for another
    sizes = [len(b) for batches in per_process for b in batches]
    assert max(sizes) <= 8 + 2 and (min(sizes) >= 2 or num_samples < 2 * num_processes * 2)


def test_hed_jitter_changes_stain_not_geometry_and_is_seeded():
    from expreg.data import hed_jitter

    patch = np.full((16, 16, 3), (200, 120, 170), dtype=np.uint8)
    patch[4:8, 4:8] = (80, 40, 120)  # a "nucleus"
    unchanged = hed_jitter(patch, 0.0, np.random.default_rng(1))
    assert np.abs(unchanged.astype(int) - patch).max() <= 1  # the round trip through HED is exact
    a = hed_jitter(patch, 0.1, np.random.default_rng(7))
    b = hed_jitter(patch, 0.1, np.random.default_rng(7))
    assert np.array_equal(a, b) and not np.array_equal(a, patch)
    assert a[5, 5].astype(int).sum() < a[0, 0].astype(int).sum()  # the nucleus stays darker
    t = ImageTransform(16, train=True, seed=3, hed_jitter=0.1, dihedral=False, mean=(0, 0, 0), std=(1, 1, 1))
    image = Image.fromarray(patch)
    torch.testing.assert_close(t(image, "p.png"), t(image, "p.png"), rtol=0, atol=0)
    assert not torch.equal(t(image, "p.png"), t(image, "q.png"))  # per-sample draws
    c = hed_jitter(patch, 0.1, np.random.default_rng(8))
    assert not np.array_equal(a, c)  # another seed, another stain
    assert np.abs(a.astype(int) - patch).max() <= 0.1 * 255 * 3  # bounded by the strength


@pytest.mark.slow
def test_workers_start_from_a_fork_server_under_torch_distributed_with_the_same_batches(
    dataset_csv, split_csv, tmp_path
):
    """Under a process group, DataLoader workers are started by ``forkserver`` (forking the process, whose
    communication threads call into Python, can hang a worker: CPython gh-112275); the batches, augmented
    and seeded, are the same as from forked workers, epoch after epoch, with the image cache too."""
    import torch.distributed as dist

    from expreg.data import build_dataloaders
    from expreg.data.dataset import image_files
    from expreg.data.image_cache import ensure_image_cache
    from expreg.data.loaders import worker_context

    ds = load_expression_dataset(dataset_csv, split_csv)
    cache = ensure_image_cache([p for part in ds.values() for p in image_files(part)], 24, tmp_path / "cache")

    def batches() -> list:
        loaders = build_dataloaders(ds, image_size=24, batch_size=4, num_workers=2, seed=0, image_cache=cache)
        out = []
        for epoch in range(2):
            loaders["train_sampler"].set_epoch(epoch)
            loaders["train_transform"].set_epoch(epoch)
            out += [(b["pixel_values"], b["labels"]) for b in loaders["train"]]
        return out, loaders["train"].multiprocessing_context

    assert worker_context(2) is None and worker_context(0) is None
    forked, context = batches()
    assert context is None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert worker_context(2).get_start_method() == "forkserver" and worker_context(0) is None
        served, context = batches()
        assert context.get_start_method() == "forkserver"
    finally:
        dist.destroy_process_group()
    assert len(forked) == len(served) > 0
    for (x, y), (x2, y2) in zip(forked, served):
        assert torch.equal(x, x2) and torch.equal(y, y2)


FORK_SERVER_SCRIPT = """
import os, signal, time
from multiprocessing import forkserver
from expreg.data.loaders import FORKSERVER_PRELOAD
import multiprocessing
import expreg.data.fork_server  # imported here, outside the server: the handler stays

assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
first = context.Process(target=time.sleep, args=(0,))
first.start(); first.join()
os.kill(forkserver._forkserver._forkserver_pid, signal.SIGTERM)  # as torchrun's os.killpg does, at once
second = context.Process(target=time.sleep, args=(0,))
second.start(); second.join()  # EOFError: unexpected EOF, when the server died
print("exit codes", first.exitcode, second.exitcode)
"""


def test_the_fork_server_outlives_a_sigterm_to_its_process_group():
    """torchrun stops a process by signalling its process group, the DataLoader fork server included; the
    process saves a checkpoint first, which can need new workers: the server ignores SIGTERM. Importing the
    module outside the server changes nothing (the script checks the handler)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", FORK_SERVER_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "exit codes 0 0" in result.stdout


def test_a_worker_gets_the_patch_stores_registered_when_its_loader_was_built(monkeypatch):
    """A fork server's workers start with the server's environment, from before a store registered later:
    ``worker_init`` hands them the stores of the moment the DataLoader was built."""
    import os

    from expreg.data import loaders, patch_store

    monkeypatch.setenv(patch_store.ENV, '["/data/cohort/patches"]')
    init = loaders.worker_init(seed=False)
    monkeypatch.delenv(patch_store.ENV)  # the worker's environment
    init(0)
    assert os.environ[patch_store.ENV] == '["/data/cohort/patches"]'


def _tiny_store(folder: Path, paths: list[str]) -> Path:
    """A patch store of ``paths`` (relative to ``folder``), image i holding the bytes ``b"img<i>"``."""
    import pyarrow as pa

    from expreg.data.patch_store import ShardWriter, shard_schema

    table = pa.table({"path": paths, "group_id": ["G"] * len(paths)})
    writer = ShardWriter(folder / "patches", shard_schema(table.schema))
    writer.write(table, pa.array([f"img{i}".encode() for i in range(len(paths))], pa.binary()))
    writer.finish()
    return folder / "patches"


@pytest.mark.parametrize("collide", [False, True])
def test_the_patch_store_finds_each_path_and_refuses_a_path_twice(tmp_path, monkeypatch, collide):
    import expreg.data.patch_store as patch_store

    if collide:  # every path the same hash: lookups compare the paths themselves
        monkeypatch.setattr("expreg.data.paths.key_hash", lambda path: 7)
    paths = [f"patches/s{i % 3}/p{i}.png" for i in range(20)]
    store = patch_store.PatchStore(_tiny_store(tmp_path / "ok", paths))
    root = tmp_path / "ok"
    for i in [0, 7, 19]:
        assert store.read(str(root / paths[i])) == f"img{i}".encode()
    assert str(root / "patches/s0/p1.png") not in store and len(store) == 20
    with pytest.raises(patch_store.PatchStoreError, match="'patches/s1/p4.png' appears twice"):
        patch_store.PatchStore(_tiny_store(tmp_path / "dup", paths[:5] + ["patches/s1/p4.png"] + paths[5:]))

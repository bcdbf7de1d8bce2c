"""A 4-section synthetic cohort (benchmarks/make_cohort.py) through prepare (1 and 2 workers, image files
and Parquet shards), then training, CV and prediction from both stores: the same patches, tables and
numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from expreg.data.h5ad import read_h5ad
from expreg.ingest.prepare import Options, prepare

REPO = Path(__file__).resolve().parent.parent
STORES = [("files", 1), ("files", 2), ("shards", 1), ("shards", 2)]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1")
    env["OMP_NUM_THREADS"] = "1"  # bit-identical runs
    return env


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """The cohort (4 sections, 4 patients) prepared four ways: ``{(store, workers): out_dir}``."""
    root = tmp_path_factory.mktemp("cohort")
    args = ["--sections", "4", "--spots", "60", "--genes", "400", "--um_per_px", "8", "--sections_per_patient", "1"]
    command = [sys.executable, str(REPO / "benchmarks" / "make_cohort.py"), "--out", str(root / "raw"), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outs = {}
    for store, workers in STORES:
        out = root / f"{store}{workers}"
        options = Options(patch_um=112.0, patch_px=16, num_workers=workers, store=store)
        summary = prepare(root / "raw" / "samples.csv", out, options)
        assert summary["spots"] > 150 and summary["inputs"]["store"] == store
        outs[store, workers] = out
    return outs


def _shard_rows(out: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    files = sorted((out / "patches").glob("data-*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def test_files_and_shards_with_one_or_two_workers_hold_the_same_patches_and_tables(cohort):
    reference = cohort["files", 1]
    metadata = pd.read_csv(reference / "metadata.csv")
    counts = read_h5ad(reference / "expression.h5ad")
    for key, out in cohort.items():
        assert (out / "metadata.csv").read_bytes() == (reference / "metadata.csv").read_bytes(), key
        pictures = sorted((out / "qc").iterdir())  # one per section, the same whoever cut it
        assert [p.stem for p in pictures] == sorted(metadata["sample_id"].unique())
        assert [p.read_bytes() for p in pictures] == [p.read_bytes() for p in sorted((reference / "qc").iterdir())]
        other = read_h5ad(out / "expression.h5ad")
        assert (other.X != counts.X).nnz == 0 and other.obs.equals(counts.obs), key
    for workers in (1, 2):
        assert not list((cohort["shards", workers] / "patches").rglob("*.png"))  # no image files at all
        rows = _shard_rows(cohort["shards", workers])
        assert list(rows.columns) == ["image", *metadata.columns]  # every metadata column beside the image
        assert rows["path"].tolist() == metadata["path"].tolist()
        pd.testing.assert_frame_equal(rows.drop(columns="image"), metadata, check_dtype=False)
        for image, path in zip(rows["image"], rows["path"]):
            assert image["path"] == path and image["bytes"] == (reference / path).read_bytes()
    first, second = (sorted((cohort["shards", w] / "patches").glob("*.parquet")) for w in (1, 2))
    assert [f.read_bytes() for f in first] == [f.read_bytes() for f in second]  # shards too, byte for byte
    record = json.loads((cohort["shards", 2] / "prepare.json").read_text())["store"]
    assert record["kind"] == "shards" and record["shards"] == [f.name for f in second]
    assert record["bytes"] == sum(f.stat().st_size for f in second)


def test_jpeg_patches_go_into_the_shards_as_the_files_hold_them(cohort, tmp_path):
    raw = cohort["files", 1].parent / "raw" / "samples.csv"
    sheet = tmp_path / "one.csv"
    sheet.write_text("".join(raw.read_text().splitlines(keepends=True)[:2]).replace(",S", f",{raw.parent}/S", 1))
    outs = {}
    for store in ("files", "shards"):
        options = Options(patch_um=112.0, patch_px=16, image_format="jpeg", store=store)
        prepare(sheet, tmp_path / store, options)
        outs[store] = tmp_path / store
    rows = _shard_rows(outs["shards"])
    assert len(rows) > 30 and all(p.endswith(".jpg") for p in rows["path"])
    assert all(
        image["bytes"] == (outs["files"] / path).read_bytes() for image, path in zip(rows["image"], rows["path"])
    )


def test_the_shards_open_with_load_dataset_parquet_as_images(cohort):
    from datasets import load_dataset
    from PIL import Image

    out = cohort["shards", 1]
    ds = load_dataset("parquet", data_files=str(out / "patches" / "*.parquet"), split="train")
    metadata = pd.read_csv(out / "metadata.csv")
    assert ds.num_rows == len(metadata) and type(ds.features["image"]).__name__ == "Image"
    row = ds[7]
    with Image.open(cohort["files", 1] / metadata["path"][7]) as expected:
        assert np.array_equal(np.asarray(row["image"]), np.asarray(expected))
    assert row["sample_id"] == metadata["sample_id"][7] and row["x_px"] == pytest.approx(metadata["x_px"][7])


def test_a_dataset_from_shards_gives_the_pixels_of_the_files(cohort, tmp_path):
    from expreg.data import load_expression_dataset
    from expreg.data.dataset import image_files
    from expreg.data.metadata import MetadataError, read_metadata
    from expreg.data.transforms import load_image

    files, shards = cohort["files", 1], cohort["shards", 1]
    with pytest.raises(MetadataError, match=r"image file not found .*set data\.patches=.*patches"):
        read_metadata(shards / "metadata.csv", check_images="exists", targets_required=False)
    with pytest.raises(MetadataError, match="no such folder"):
        read_metadata(shards / "metadata.csv", targets_required=False, patches=shards / "nowhere")
    metadata = read_metadata(
        shards / "metadata.csv", check_images="decode", targets_required=False, patches=shards / "patches"
    )
    assert len(metadata.frame) > 150
    paths = metadata.image_paths()
    assert not Path(paths[0]).exists()  # served by the store
    for path in paths[::17]:
        a, _ = load_image(path)
        b, _ = load_image(str(files / Path(path).relative_to(shards)))
        assert np.array_equal(np.asarray(a), np.asarray(b))
    split = metadata.frame[["path", "group_id"]].assign(
        split=np.where(metadata.frame["group_id"] == "P000", "validation", "train")
    )
    # in a notebook: a CSV elsewhere, with targets, naming the store's patches from its own folder
    frame = metadata.frame.assign(y0=1.0, y1=2.0)
    frame["path"] = [os.path.relpath(p, tmp_path) for p in paths]
    frame.to_csv(tmp_path / "with_targets.csv", index=False)
    split.assign(path=frame["path"]).to_csv(tmp_path / "split.csv", index=False)
    ds = load_expression_dataset(tmp_path / "with_targets.csv", tmp_path / "split.csv", patches=shards / "patches")
    assert set(ds) == {"train", "validation"} and image_files(ds["validation"])[0] in paths
    # a DataLoader worker started afresh (spawn) finds the store the parent registered
    import multiprocessing

    from expreg.data.patch_store import read_bytes

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(read_bytes, (paths[5],)) == (files / Path(paths[5]).relative_to(shards)).read_bytes()


def test_the_image_cache_knows_a_stored_image_by_its_store_and_a_rewritten_store_is_opened_again(cohort):
    from expreg.data.image_cache import fingerprint
    from expreg.data.metadata import read_metadata
    from expreg.data.patch_store import stamp, use_store

    shards = cohort["shards", 1]
    paths = read_metadata(shards / "metadata.csv", targets_required=False, patches=shards / "patches").image_paths()
    registered = use_store(shards / "patches")
    assert stamp(paths[5]) == f"{registered.signature}:{registered.row(paths[5])}" and stamp(paths[5] + "x") is None
    before = fingerprint(paths[:3], 16)
    shard = next((shards / "patches").glob("*.parquet"))
    times = (shard.stat().st_atime_ns, shard.stat().st_mtime_ns)
    try:
        os.utime(shard, ns=(times[0], times[1] + 10**9))  # as a new prepare --overwrite would leave it
        reopened = use_store(shards / "patches")
        assert reopened is not registered and reopened.signature != registered.signature
        assert fingerprint(paths[:3], 16) != before
    finally:
        os.utime(shard, ns=times)
        use_store(shards / "patches")


def test_samples_are_shared_largest_first_to_the_least_loaded_process():
    from types import SimpleNamespace

    from expreg.ingest.processes import Processes, share

    results = [SimpleNamespace(keep=range(n)) for n in (100, 900, 300, 500, 200)]
    mine = [share(results, Processes(index=i, count=2)) for i in range(2)]
    assert mine == [[0, 1], [2, 3, 4]]  # 900 + 100 against 500 + 300 + 200
    assert sorted(mine[0] + mine[1]) == list(range(5)) and share(results, Processes()) == list(range(5))


def _train(out: Path, name: str, prepared: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(REPO / "run_regression.py"), str(REPO / "recipes" / "tiny.yaml")]
    cmd += [f"data.metadata_csv={prepared / 'metadata.csv'}", f"data.expression_file={prepared / 'expression.h5ad'}"]
    cmd += ["data.genes=hvg:8", "data.image_size=16", "train.epochs=1", f"logging.output_dir={out}"]
    cmd += [f"logging.run_name={name}", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / name / "metrics.json").read_text())


def _scores(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("best_val", "val_", "num_")) or k == "history"}


@pytest.mark.slow  # training runs and CV from both stores: about 2 minutes
def test_training_cv_and_predict_from_shards_give_the_numbers_of_files(cohort, tmp_path):
    files, shards = cohort["files", 1], cohort["shards", 2]
    store = f"data.patches={shards / 'patches'}"
    a = _train(tmp_path, "files", files)
    b = _train(tmp_path, "shards", shards, store)
    assert _scores(a) == _scores(b) and a["best_val_spearman_mean"] == b["best_val_spearman_mean"]
    c = _train(
        tmp_path,
        "shards_workers",
        shards,
        store,
        "data.num_workers=2",
        "data.image_cache=true",
        f"data.image_cache_dir={tmp_path / 'cache'}",
    )  # forked DataLoader workers and the cache read the store
    assert c["best_val_spearman_mean"] == pytest.approx(a["best_val_spearman_mean"], abs=1e-5)

    summaries = []
    for name, prepared, extra in (("cv_files", files, []), ("cv_shards", shards, [store])):
        cmd = [sys.executable, "-m", "expreg.cv", str(REPO / "recipes" / "tiny.yaml"), "--n_folds", "2"]
        cmd += [
            f"data.metadata_csv={prepared / 'metadata.csv'}",
            f"data.expression_file={prepared / 'expression.h5ad'}",
        ]
        cmd += ["data.genes=hvg:8", "data.image_size=16", "train.epochs=1", *extra]
        cmd += ["--methods", "finetune,frozen,linear_probe,ridge,mean", "--out_dir", str(tmp_path / name)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        summaries.append(json.loads((tmp_path / name / "cv_summary.json").read_text())["methods"])
    for method in summaries[0]:
        keys = ("spearman_mean", "pearson_mean", "num_test_samples", "test_groups")
        one = [{k: f.get(k) for k in keys} for f in summaries[0][method]["folds"]]
        two = [{k: f.get(k) for k in keys} for f in summaries[1][method]["folds"]]
        assert one == two, method

    predictions = []
    for name, prepared, extra in (("files", files, []), ("shards", shards, ["--patches", str(shards / "patches")])):
        cmd = [sys.executable, "-m", "expreg.predict", "--model", str(tmp_path / name / "checkpoints" / "best")]
        cmd += ["--metadata_csv", str(prepared / "metadata.csv"), "--out_csv", str(tmp_path / f"{name}.csv"), *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        predictions.append(pd.read_csv(tmp_path / f"{name}.csv"))
    pd.testing.assert_frame_equal(predictions[0], predictions[1])


@pytest.mark.slow  # two processes under accelerate launch: about 20 s
def test_prepare_under_accelerate_launch_shares_the_samples_and_writes_what_one_process_writes(cohort, tmp_path):
    reference = cohort["shards", 1]
    raw = reference.parent / "raw" / "samples.csv"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
    cmd += ["-m", "expreg.prepare", "--samples", str(raw), "--out_dir", str(tmp_path / "out"), "--store", "shards"]
    cmd += ["--patch_px", "16"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [line.startswith("wrote ") for line in result.stdout.splitlines()].count(True) == 1  # the main one reports
    shard_names = sorted(f.relative_to(reference) for f in (reference / "patches").glob("*.parquet"))
    assert sorted(f.relative_to(tmp_path / "out") for f in (tmp_path / "out" / "patches").glob("*")) == shard_names
    for name in ("metadata.csv", *shard_names):
        assert (tmp_path / "out" / name).read_bytes() == (reference / name).read_bytes(), name
    a, b = read_h5ad(tmp_path / "out" / "expression.h5ad"), read_h5ad(reference / "expression.h5ad")
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left


@pytest.mark.slow  # two processes under accelerate launch: about 20 s
def test_a_failure_on_one_process_of_prepare_stops_every_process_and_leaves_nothing(tmp_path):
    from test_map import SPOT_PITCH_UM
    from test_prepare_workers import three_sample_sheet

    three_sample_sheet(tmp_path)
    image = tmp_path / "sr" / "S2" / "S2_fullres.png"  # S2 is process 1's share (20 spots each: S1, S3 to 0)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # its header reads, its pixels do not
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
    cmd += ["-m", "expreg.prepare", "--samples", str(tmp_path / "sheet.csv"), "--out_dir", str(tmp_path / "out")]
    cmd += ["--patch_px", "16", "--spot_pitch_um", str(SPOT_PITCH_UM), "--store", "shards"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert result.returncode != 0
    assert "process 1: " in result.stderr and "S2_fullres.png" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written

"""A cohort's table in bounded memory (issue 24): the metadata CSV memory-mapped, every per-row step taken a
chunk of rows (or a block of genes) at a time, and the same results whatever the chunk size.

The chunk sizes are module constants read at call time, so these tests set them to a few rows and check that
chunked work equals the work done in one piece (the memory itself is measured by
``benchmarks/bench_cohort.py --parts rss``, not here).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from expreg.data import metadata as metadata_module
from expreg.data import paths as paths_module
from expreg.data.dataset import ARROW_CHUNK_ROWS, build_split_datasets, compute_target_stats, labels_array
from expreg.data.metadata import MetadataError, read_metadata
from expreg.evaluation import metrics as metrics_module
from expreg.evaluation.metrics import compute_metrics, mean_squared_error


def _everything(csv):
    """What a run takes from a metadata CSV: the table, the split's datasets, their labels and target statistics."""
    table = read_metadata(csv)
    parts, _ = build_split_datasets(table, None, seed=3, val_frac=0.3)
    labels = {name: labels_array(part) for name, part in parts.items()}
    paths = {name: part["path"] for name, part in parts.items()}
    stats = compute_target_stats(parts["train"])
    return table, labels, paths, stats


def test_chunked_reading_checking_and_conversion_equal_one_piece(make_dataset, monkeypatch):
    csv = make_dataset(num_groups=6, samples_per_group=9)
    whole = _everything(csv)
    monkeypatch.setattr(paths_module, "CHUNK_ROWS", 4)
    monkeypatch.setattr("expreg.data.dataset.ARROW_CHUNK_ROWS", 5)
    monkeypatch.setattr("expreg.data.arrow_files.CSV_BLOCK_BYTES", 600)  # a few rows per parsed block
    monkeypatch.setattr("expreg.data.arrow_files._MAPPED", {})
    chunked = _everything(csv)
    assert ARROW_CHUNK_ROWS == 50_000  # the default, untouched outside this test
    assert chunked[0].frame["path"].array.__arrow_array__().num_chunks > 1  # the CSV was parsed in blocks
    pd.testing.assert_frame_equal(chunked[0].frame, whole[0].frame)
    for name in whole[1]:
        np.testing.assert_array_equal(chunked[1][name], whole[1][name])
        assert chunked[2][name] == whole[2][name]
    np.testing.assert_array_equal(chunked[3].mean, whole[3].mean)
    np.testing.assert_array_equal(chunked[3].std, whole[3].std)
    assert chunked[3].mean.shape == (50,) and np.all(chunked[3].std > 0)


def test_a_duplicate_and_a_missing_image_in_a_later_chunk_are_named_by_their_lines(dataset_csv, monkeypatch):
    monkeypatch.setattr(paths_module, "CHUNK_ROWS", 3)
    lines = dataset_csv.read_text().splitlines()
    first = lines[2].split(",")[0]  # line 3's image, named again (as ./<path>) on line 30
    cells = lines[29].split(",")
    lines[29] = ",".join(["./" + first, *cells[1:]])
    dataset_csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError, match=r"column 'path', lines 3, 30: duplicate image: lines 3 and 30 name"):
        read_metadata(dataset_csv)
    lines[29] = ",".join(["images/not_there.png", *cells[1:]])
    dataset_csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        MetadataError, match=r"column 'path', line 30: image file not found \(e\.g\. .*not_there\.png\)"
    ):
        read_metadata(dataset_csv)


def test_row_paths_give_the_normalised_paths_one_at_a_time_or_by_rows(dataset_csv, monkeypatch):
    monkeypatch.setattr(paths_module, "CHUNK_ROWS", 4)
    table = read_metadata(dataset_csv)
    every = table.image_paths()
    rows = table.path_rows()
    assert len(rows) == len(every) and list(rows) == every
    assert rows[5] == every[5] and rows[-1] == every[-1]
    mask = np.arange(len(every)) % 3 == 1
    assert list(rows[mask]) == [p for p, m in zip(every, mask) if m]
    assert list(rows[np.array([7, 2])]) == [every[7], every[2]]


def test_the_csv_is_mapped_once_per_process_and_read_again_when_it_changes(dataset_csv):
    from expreg.data.arrow_files import arrow_dir

    first = read_metadata(dataset_csv)
    files = set(arrow_dir().glob("metadata-*.arrow"))
    again = read_metadata(dataset_csv)
    assert set(arrow_dir().glob("metadata-*.arrow")) == files  # the same mapped table, no second file
    pd.testing.assert_frame_equal(first.frame, again.frame)
    text = dataset_csv.read_text().splitlines()
    dataset_csv.write_text("\n".join(text[:-3]) + "\n")  # three rows fewer
    assert len(read_metadata(dataset_csv).frame) == len(first.frame) - 3


def _predictions(n=301, k=11, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(n, k)).astype(np.float32)
    truth[:, 4] = np.round(truth[:, 4])  # ties
    predictions = truth + rng.normal(size=(n, k))
    depth = rng.integers(100, 5000, size=n).astype(float)
    return predictions, truth, depth


@pytest.mark.parametrize("block", [1, 3, 4])
def test_scores_by_blocks_of_genes_equal_the_whole_matrix(block, monkeypatch):
    predictions, truth, depth = _predictions()
    monkeypatch.setattr(metrics_module, "GENE_BLOCK", 64)
    whole = compute_metrics(predictions, truth.astype(np.float64), library_size=depth)  # every gene in one block
    monkeypatch.setattr(metrics_module, "GENE_BLOCK", block)
    blocks = compute_metrics(predictions, truth, library_size=depth)  # float32 truth, converted block by block
    for key in ("spearman", "pearson", "mse", "spearman_adjusted", "pearson_adjusted", "depth_oracle"):
        np.testing.assert_allclose(getattr(blocks, key), getattr(whole, key), rtol=1e-12, atol=1e-14, err_msg=key)
        assert getattr(blocks, key).shape == (11,)
    assert blocks.summary["spearman_mean"] == pytest.approx(whole.summary["spearman_mean"], abs=1e-14)


def test_the_validation_loss_by_chunks_of_rows_is_the_mean_over_measured_targets(monkeypatch):
    predictions, truth, _ = _predictions(n=1003)
    predictions = predictions.astype(np.float32)
    squared = (predictions.astype(np.float64) - truth) ** 2
    monkeypatch.setattr(metrics_module, "MSE_CHUNK_ROWS", 100)
    assert mean_squared_error(predictions, truth) == pytest.approx(squared.mean(), rel=1e-12)
    truth[[3, 700], [2, 9]] = np.nan  # not measured: left out
    assert mean_squared_error(predictions, truth) == pytest.approx(
        np.nanmean(np.where(np.isnan(truth), np.nan, squared)), rel=1e-12
    )
    predictions[5, 1] = np.nan  # a diverged model: the loss says so
    assert np.isnan(mean_squared_error(predictions, truth))


def test_evaluation_rows_are_collected_in_order_into_one_array():
    from expreg.inference import gather_outputs

    batches = [np.arange(i, i + 4, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32) for i in (0, 4, 8)]

    class Loader(list):
        dataset = range(10)  # two rows fewer than the batches hold: kept, for the caller's count check

    rows = gather_outputs(lambda x: __import__("torch").as_tensor(x), Loader(batches), progress=False)
    np.testing.assert_array_equal(rows[:, 0], np.arange(12))
    assert rows.shape == (12, 3)
    exact = gather_outputs(lambda x: __import__("torch").as_tensor(x), Loader(batches[:2]), progress=False)
    assert exact.shape == (8, 3) and np.array_equal(exact[:, 2], np.arange(8))


def test_the_fast_reader_keeps_no_python_object_per_cell(dataset_csv):
    frame = read_metadata(dataset_csv).frame
    assert all(frame[c].dtype != object for c in frame.columns)  # Arrow-backed text and numbers
    assert metadata_module.TARGET_PATTERN.match("y0")

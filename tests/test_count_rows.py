"""Counts streamed by rows from an .h5ad (CSR, dense, CSC) equal the matrix read whole, in any row order."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from expreg.data import count_rows
from expreg.data.count_rows import CountRows
from expreg.data.counts import transform_counts
from expreg.data.h5ad import H5adError, write_h5ad


def _counts(seed=0, spots=40, genes=9) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.6, (spots, genes)).astype(np.float32)
    dense[5] = 0  # an empty row
    return sp.csr_matrix(dense)


def _file(tmp_path, X, name="x.h5ad"):
    path = tmp_path / name
    write_h5ad(path, X, pd.DataFrame(index=[f"s{i}" for i in range(X.shape[0])]), [f"g{j}" for j in range(X.shape[1])])
    return path


@pytest.mark.parametrize("stored", ["csr", "dense", "csc", "memory"])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_blocks_give_the_selected_rows_in_the_callers_order(tmp_path, stored, chunk, monkeypatch):
    counts = _counts()
    if stored == "memory":
        rows = CountRows(counts)
    else:
        X = counts.toarray() if stored == "dense" else counts
        path = _file(tmp_path, X)
        if stored == "csc":  # anndata writes CSR; rewrite X as a CSC group the way anndata stores one
            with h5py.File(path, "a") as f:
                del f["X"]
                csc = sp.csc_matrix(counts)
                group = f.create_group("X")
                group.attrs.update({"encoding-type": "csc_matrix", "encoding-version": "0.1.0", "shape": csc.shape})
                for key in ("data", "indices", "indptr"):
                    group[key] = getattr(csc, key)
        monkeypatch.setattr(count_rows, "DENSE_BLOCK_BYTES", 3 * 9 * 4)  # three dense rows per read
        rows = CountRows.open(path)
        assert isinstance(rows.source, count_rows._H5Source) == (stored != "csc")  # CSC is read whole
    picked = np.array([30, 2, 2, 17, 5, 39, 0, 18, 19, 20, 11])  # out of order, a repeat, gaps, a run
    selection = rows.select(picked)
    seen = np.zeros(len(picked), dtype=int)
    for where, block in selection.blocks(chunk):
        assert block.shape == (len(where), 9)
        np.testing.assert_array_equal(block.toarray(), counts[picked[where]].toarray())
        seen[where] += 1
        if stored == "dense":  # dense files are read DENSE_BLOCK_BYTES at a time: a span of 3 rows here
            assert np.ptp(picked[where]) < 3
        elif chunk == 1:  # a block spans about chunk_nnz stored entries (one row at least)
            assert len(where) == 1 or counts[picked[where]].nnz == 0
    assert (seen == 1).all()  # every selected row exactly once
    np.testing.assert_array_equal(selection.read().toarray(), counts[picked].toarray())
    np.testing.assert_allclose(selection.row_sums(), counts[picked].sum(axis=1).A1)
    mask = np.zeros(40, bool)
    mask[[3, 4, 30]] = True
    np.testing.assert_array_equal(rows.select(mask).read().toarray(), counts[[3, 4, 30]].toarray())
    assert rows.select(np.array([], dtype=np.int64)).read().shape == (0, 9)


def test_an_h5ad_without_a_matrix_is_named(tmp_path):
    path = tmp_path / "bad.h5ad"
    with h5py.File(path, "w") as f:
        f.create_group("obs")
    with pytest.raises(H5adError, match=r"bad\.h5ad: no 'X'"):
        CountRows.open(path)
    with h5py.File(path, "a") as f:
        f.create_group("X").attrs["encoding-type"] = "coo_matrix"
    with pytest.raises(H5adError, match=r"bad\.h5ad: unreadable"):  # not by rows: anndata reads it, or names it
        CountRows.open(path)
    with h5py.File(path, "a") as f:
        del f["X"]
        f["X"] = np.array([["a", "b"]], dtype="S1")
    with pytest.raises(H5adError, match="not spots x genes of numbers"):
        CountRows.open(path)


def test_targets_streamed_in_small_blocks_equal_the_whole_matrix(tmp_path, monkeypatch):
    """``expression_targets`` reads blocks of 5 stored entries: the same genes, targets and library sizes
    as the transform of the matrix read whole, for metadata rows in another order than the file's."""
    from expreg.data import expression
    from expreg.data.metadata import Metadata

    counts = _counts(seed=1, spots=60, genes=12)
    obs = pd.DataFrame(
        {"sample_id": ["A"] * 30 + ["B"] * 30, "barcode": [f"b{i}" for i in range(60)]},
        index=[f"s{i}" for i in range(60)],
    )
    path = tmp_path / "e.h5ad"
    write_h5ad(path, counts, obs, [f"G{j}" for j in range(12)])
    order = np.random.default_rng(2).permutation(60)
    frame = obs.iloc[order].reset_index(drop=True)
    frame["group_id"] = np.where(frame["sample_id"] == "A", "P1", "P2")
    frame["path"] = [f"p{i}.png" for i in order]
    is_train = (frame["group_id"] == "P1").to_numpy()
    results = {}
    for chunk in (5, None):
        monkeypatch.setattr(count_rows, "CHUNK_NNZ", chunk or 1 << 22)
        expression._EXPRESSION_CACHE.clear()
        results[chunk] = expression.expression_targets(
            Metadata(tmp_path / "m.csv", frame, [], []),
            path,
            is_train,
            "hvg:4",
            min_detection=0.05,
            transform="log1p_cpm",
        )
    (small, choice), (whole, whole_choice) = results[5], results[None]
    assert choice.genes == whole_choice.genes
    np.testing.assert_array_equal(small.targets(), whole.targets())
    columns = [int(g[1:]) for g in choice.genes]
    expected = transform_counts(counts[order], columns, "log1p_cpm")
    np.testing.assert_array_equal(small.targets(), expected)
    np.testing.assert_array_equal(small.frame["library_size"].to_numpy(), counts[order].sum(axis=1).A1)
    assert choice.record()["per_gene_on_training_spots"] == whole_choice.record()["per_gene_on_training_spots"]


def test_a_file_rewritten_between_passes_a_wrong_mask_and_a_mismatched_x_are_refused(tmp_path):
    from expreg.data import expression

    counts = _counts()
    path = _file(tmp_path, counts)
    rows = CountRows.open(path)
    with pytest.raises(ValueError, match="a mask of 3 rows for a selection of 40"):
        rows.select(np.ones(3, bool))
    _file(tmp_path, counts * 2)  # a new file under the same name (a second prepare meanwhile)
    with pytest.raises(H5adError, match=r"x\.h5ad: rewritten while it was being read"):
        next(rows.blocks())
    with h5py.File(path, "a") as f:  # X that says it has fewer rows than obs
        shape = f["X"].attrs["shape"]
        f["X"].attrs["shape"] = (shape[0] - 1, shape[1])
    expression._EXPRESSION_CACHE.clear()
    with pytest.raises(H5adError, match=r"X is 39 x 9 but obs x var is 40 x 9"):
        expression._read_expression(path)

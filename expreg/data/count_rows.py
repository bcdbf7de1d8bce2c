"""Raw counts read in blocks of rows, from an ``.h5ad`` on disk or a matrix in memory.

Gene choice and the targets need the counts row by row only (a spot's library size is its own
row's total), so ``CountRows`` never holds a cohort's matrix: 300,000 spots x 18,000 genes are
~3 GB of non-zeros, streamed here ``chunk_nnz`` stored entries at a time.

- ``CountRows.open(path)``: the ``X`` of an ``.h5ad`` as anndata stores it. A CSR group
  (``data``/``indices``/``indptr``, what ``expreg.prepare`` writes) and a dense 2-D dataset are read
  by row ranges with h5py; a CSC group cannot be read by rows and is read whole (said in the log).
- ``CountRows(matrix)``: a matrix already in memory (sparse or dense), the same interface.
- ``rows.select(file_rows)``: some rows, in the caller's order (a metadata's rows, the training
  rows); ``blocks()`` reads them in file order, in contiguous ranges, and says where each row goes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

CHUNK_NNZ = 1 << 22  # stored entries per block: 4M x (4 B value + 4 B column) = 32 MB, ~4x that in temporaries
DENSE_BLOCK_BYTES = 64 * 2**20


class CountRows:
    """Selected rows of a raw-count matrix (spots x genes), read block by block.

    Args:
        source: A scipy sparse matrix or a dense array, or ``_H5Source`` (``CountRows.open``).
        rows: The source rows, in the order the caller numbers them (default: all, in order).
    """

    def __init__(self, source, rows: np.ndarray | None = None):
        if not isinstance(source, _H5Source):
            source = sp.csr_matrix(source) if sp.issparse(source) else np.atleast_2d(np.asarray(source))
        self.source = source
        n = source.shape[0]
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    @classmethod
    def open(cls, path) -> CountRows:
        """The counts ``X`` of the ``.h5ad`` at ``path``, left on disk when it can be read by rows."""
        source = _H5Source.open(Path(path).resolve())
        if source is None:  # CSC (columns contiguous, rows not) or an older anndata's layout
            from expreg.data.h5ad import read_h5ad

            logging.getLogger("expreg").info(f"{path}: X cannot be read by rows (CSC or an old layout): read whole")
            return cls(read_h5ad(path).X)
        return cls(source)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), int(self.source.shape[1])

    def select(self, rows) -> CountRows:
        """Rows ``rows`` of this selection (indices or a boolean mask), in that order."""
        rows = np.asarray(rows)
        if rows.dtype == bool and len(rows) != len(self.rows):
            raise ValueError(f"a mask of {len(rows)} rows for a selection of {len(self.rows)}")
        picked = self.rows[np.flatnonzero(rows)] if rows.dtype == bool else self.rows[rows.astype(np.int64)]
        return CountRows(self.source, picked)

    def blocks(self, chunk_nnz: int | None = None) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """``(positions, block)``: the CSR counts of the selected rows at ``positions`` (in this selection's
        order), about ``chunk_nnz`` (default ``CHUNK_NNZ``) stored entries at a time, read in file order."""
        chunk_nnz = chunk_nnz or CHUNK_NNZ
        if len(self.rows) == 0:
            return
        order = np.argsort(self.rows, kind="stable")
        ordered = self.rows[order]
        if isinstance(self.source, _H5Source):
            yield from self.source.blocks(ordered, order, chunk_nnz)
            return
        if sp.issparse(self.source):
            starts = self.source.indptr[ordered]
            sizes = self.source.indptr[ordered + 1] - starts
        else:
            sizes = np.full(len(ordered), self.source.shape[1], dtype=np.int64)
            starts = np.arange(len(ordered), dtype=np.int64) * self.source.shape[1]
        for part in _groups(starts, sizes, chunk_nnz):
            block = self.source[ordered[part]]
            yield order[part], (block if sp.issparse(block) else sp.csr_matrix(block))

    def read(self) -> sp.csr_matrix:
        """Every selected row in memory, in this selection's order (``svg`` needs the columns of all of them)."""
        parts, positions = [], []
        for where, block in self.blocks():
            parts.append(block)
            positions.append(where)
        if not parts:
            return sp.csr_matrix(self.shape, dtype=np.float32)
        matrix = sp.vstack(parts, format="csr")
        inverse = np.empty(len(self.rows), dtype=np.int64)
        inverse[np.concatenate(positions)] = np.arange(len(self.rows))
        return matrix[inverse]

    def row_sums(self) -> np.ndarray:
        """Each selected row's total over every gene (a spot's library size), float64."""
        totals = np.zeros(len(self.rows))
        for where, block in self.blocks():
            totals[where] = np.asarray(block.sum(axis=1), dtype=np.float64).reshape(-1)
        return totals


def as_count_rows(counts) -> CountRows:
    return counts if isinstance(counts, CountRows) else CountRows(counts)


def _groups(starts: np.ndarray, sizes: np.ndarray, chunk_nnz: int) -> Iterator[slice]:
    """Consecutive ranges of the (file-ordered) rows whose span of stored entries stays near ``chunk_nnz``
    (at least one row each)."""
    ends = starts + sizes
    i, n = 0, len(starts)
    while i < n:
        j = int(np.searchsorted(ends, starts[i] + chunk_nnz, side="right"))
        j = min(max(j, i + 1), n)
        yield slice(i, j)
        i = j


class _H5Source:
    """``X`` of an ``.h5ad`` on disk, read by row ranges: a CSR group or a dense dataset."""

    def __init__(self, path: Path, shape: tuple[int, int], indptr: np.ndarray | None):
        self.path, self.shape, self.indptr = path, shape, indptr
        self.stamp = _stamp(path)

    @classmethod
    def open(cls, path: Path) -> _H5Source | None:
        import h5py

        from expreg.data.h5ad import H5adError

        try:
            with h5py.File(path, "r") as f:
                if "X" not in f:
                    raise H5adError(f"{path}: no 'X' (the expression matrix) in this .h5ad file")
                x = f["X"]
                if isinstance(x, h5py.Dataset):
                    if x.ndim != 2 or x.dtype.kind not in "biuf":
                        raise H5adError(f"{path}: X is {x.ndim}-D {x.dtype}, not spots x genes of numbers")
                    return cls(path, tuple(int(s) for s in x.shape), None)
                kind = x.attrs.get("encoding-type", x.attrs.get("h5sparse_format", ""))
                kind = kind.decode() if isinstance(kind, bytes) else str(kind)
                if kind != "csr_matrix" or "encoding-type" not in x.attrs:
                    return None  # CSC, or an older anndata's layout: anndata reads it whole
                if not {"data", "indices", "indptr"} <= set(x.keys()) or x["data"].dtype.kind not in "biuf":
                    raise H5adError(f"{path}: X is not a CSR matrix of numbers (data, indices, indptr)")
                shape = tuple(int(s) for s in x.attrs["shape"])
                return cls(path, shape, np.asarray(x["indptr"][:], dtype=np.int64))
        except OSError as err:
            raise H5adError(f"{path}: unreadable .h5ad ({err})") from err

    def blocks(self, ordered: np.ndarray, order: np.ndarray, chunk_nnz: int):
        import h5py

        from expreg.data.h5ad import H5adError

        if _stamp(self.path) != self.stamp:
            raise H5adError(f"{self.path}: rewritten while it was being read; run again")
        with h5py.File(self.path, "r") as f:
            x = f["X"]
            if self.indptr is None:
                step = max(1, DENSE_BLOCK_BYTES // max(1, self.shape[1] * x.dtype.itemsize))
                starts = ordered.astype(np.int64)
                for part in _groups(starts, np.ones(len(starts), np.int64), step):
                    lo, hi = int(ordered[part][0]), int(ordered[part][-1]) + 1
                    block = np.asarray(x[lo:hi])[ordered[part] - lo]
                    yield order[part], sp.csr_matrix(block)
                return
            data, indices, indptr = x["data"], x["indices"], self.indptr
            starts, ends = indptr[ordered], indptr[ordered + 1]
            for part in _groups(starts, ends - starts, chunk_nnz):
                yield order[part], _csr_rows(data, indices, starts[part], ends[part], self.shape[1])


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _csr_rows(data, indices, starts: np.ndarray, ends: np.ndarray, n_genes: int) -> sp.csr_matrix:
    """The CSR rows with stored entries ``starts[i]:ends[i]`` (file-ordered), one contiguous read."""
    lo, hi = int(starts[0]), int(ends.max())
    values, columns = np.asarray(data[lo:hi]), np.asarray(indices[lo:hi])
    sizes = ends - starts
    pointer = np.concatenate([[0], np.cumsum(sizes)])
    if not np.array_equal(starts[1:], ends[:-1]) or starts[0] != lo or pointer[-1] != hi - lo:  # gaps: gather
        take = np.repeat(starts - lo - pointer[:-1], sizes) + np.arange(pointer[-1])
        values, columns = values[take], columns[take]
    return sp.csr_matrix((values, columns, pointer), shape=(len(starts), n_genes))

"""Scores that choose the target genes (``data.genes=hvg|var|mean|svg:K``), from sparse raw counts in blocks.

Memory stays flat in the number of genes, never a dense training spots x eligible genes copy:
``hvg``, ``var`` and ``mean`` need per gene moments only, computed from the non-zeros in chunks of
rows (``sparse_moments``: a zero count transforms to 0; each value rounded through float32 as the
targets are); ``svg`` needs each section's values, transformed for one block of genes at a time
(``BLOCK_BYTES`` of spots x block float64, from one CSC copy of the counts). Either way the scores
equal the dense computation to rounding and choose the same genes (tested).

- ``hvg``: scanpy's ``highly_variable_genes(flavor="seurat")``: per gene mean and variance of the
  linear values (``expm1`` of the log values), then dispersions normalised within bins of mean over
  all genes (``seurat_from_moments``);
- ``var`` / ``mean``: variance (ddof 1) / mean of the transformed values;
- ``svg``: Moran's I on each training section (``expreg.data.spatial_genes``), neighbour weights
  computed once per section.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from expreg.data.count_rows import CountRows, as_count_rows
from expreg.data.counts import CPM_TARGET_SUM, transform_counts

HVG_BINS = 20  # scanpy's n_bins
BLOCK_BYTES = 32 * 2**20  # one block of transformed values (spots x genes, float64); its temporaries are ~4x that


def detection_rate(counts, chunk_nnz: int | None = None) -> np.ndarray:
    """Fraction of spots (rows) in which each gene (column) has a non-zero count; ``counts`` a matrix or
    ``CountRows`` (read ``chunk_nnz`` stored entries at a time, never a copy of the matrix)."""
    rows = as_count_rows(counts)
    nonzero = np.zeros(rows.shape[1], dtype=np.int64)
    for _, block in rows.blocks(chunk_nnz):
        nonzero += np.bincount(block.indices[block.data != 0], minlength=rows.shape[1])
    return nonzero.astype(np.float64) / max(rows.shape[0], 1)


def linear_moments(log_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column mean and variance (ddof 1) of ``expm1(log_values)`` (scanpy's Seurat flavour works on those)."""
    linear = np.expm1(np.asarray(log_values, dtype=np.float64))
    mean = linear.mean(axis=0)
    var = linear.var(axis=0, ddof=1) if linear.shape[0] > 1 else np.zeros_like(mean)
    return mean, var


def seurat_from_moments(mean: np.ndarray, var: np.ndarray, n_bins: int = HVG_BINS) -> np.ndarray:
    """Normalised dispersions of scanpy's ``highly_variable_genes(flavor="seurat")`` from the linear moments.

    As scanpy: dispersion = variance / mean, log; mean log1p; genes binned into ``n_bins`` equal-width
    bins of mean; each dispersion z-scored within its bin (a bin with one gene: dispersion / itself,
    i.e. 1). NaN for genes without a dispersion.
    """
    import pandas as pd

    mean = np.array(mean, dtype=np.float64)
    mean[mean == 0] = 1e-12
    dispersion = np.asarray(var, dtype=np.float64) / mean
    dispersion[dispersion == 0] = np.nan
    dispersion = np.log(dispersion)
    frame = pd.DataFrame({"means": np.log1p(mean), "dispersions": dispersion})
    frame["bin"] = pd.cut(frame["means"], bins=n_bins)
    stats = frame.groupby("bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0.0
    per_gene = stats.loc[frame["bin"]].to_numpy(dtype=np.float64)
    return (frame["dispersions"].to_numpy() - per_gene[:, 0]) / per_gene[:, 1]


def seurat_dispersions(log_values: np.ndarray, n_bins: int = HVG_BINS) -> np.ndarray:
    """``seurat_from_moments`` of dense log values (spots x genes), one value per column."""
    return seurat_from_moments(*linear_moments(log_values), n_bins=n_bins)


def rank_genes(values: np.ndarray, method: str, spots=None) -> np.ndarray:
    """Scores (higher = chosen first) of every column of dense transformed values: the reference that
    ``gene_scores`` computes block by block."""
    if method == "hvg":
        return seurat_dispersions(values)
    if method == "svg":
        from expreg.data.spatial_genes import spatial_scores

        return spatial_scores(values, spots[0], spots[1])
    if method == "var":
        return values.var(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros(values.shape[1])
    return values.mean(axis=0)


def gene_scores(counts, columns, transform: str, method: str, spots=None, block_bytes: int = BLOCK_BYTES):
    """Scores of the count ``columns`` (transformed by ``transform``, library sizes over every gene); equal to
    ``rank_genes(transform_counts(counts, columns, transform), ...)``. ``counts``: a matrix or ``CountRows``.
    ``hvg``, ``var`` and ``mean`` work on the non-zeros only, streamed (``sparse_moments``); ``svg`` on
    ``block_bytes`` of dense values at a time, from the training rows' counts held in memory."""
    columns = np.asarray(columns, dtype=np.int64)
    if method in ("hvg", "var", "mean") and (sp.issparse(counts) or isinstance(counts, CountRows)):
        mean, var = sparse_moments(counts, transform, linear=method == "hvg")
        if method == "hvg":
            return seurat_from_moments(mean[columns], var[columns])
        return (var if method == "var" else mean)[columns]
    if isinstance(counts, CountRows):
        counts = counts.read()
    return _dense_blocks(counts, columns, transform, method, spots, block_bytes)


def sparse_moments(counts, transform: str, linear: bool = False, chunk_nnz: int | None = None):
    """Per gene mean and variance (ddof 1) of the transformed values (``linear``: of their ``expm1``, as
    scanpy's Seurat flavour), from the non-zeros alone, ``chunk_nnz`` at a time (a zero count transforms to
    0); ``counts`` a sparse matrix or ``CountRows`` (read twice, never whole). Each value is the target's
    own: float64 arithmetic rounded to float32, as ``transform_counts``. Two passes (the mean, then squared
    deviations) as the dense ``var``; the sums run in another order, so the results agree with the dense
    ones to rounding (1e-12 relative)."""
    rows = as_count_rows(counts)
    n, genes = rows.shape

    def values(block: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        x = block.data.astype(np.float64)
        if transform != "none":
            totals = np.asarray(block.sum(axis=1), dtype=np.float64).reshape(-1)
            scale = np.ones_like(totals)
            if transform == "log1p_cpm":
                scale = np.divide(CPM_TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
            x = np.log1p(x * np.repeat(scale, np.diff(block.indptr)))
        x = x.astype(np.float32).astype(np.float64)
        return block.indices, (np.expm1(x) if linear else x)

    total, stored = np.zeros(genes), np.zeros(genes)  # stored: entries per gene (bincount of all would copy)
    for _, block in rows.blocks(chunk_nnz):
        index, x = values(block)
        total += np.bincount(index, weights=x, minlength=genes)
        stored += np.bincount(index, minlength=genes)
    mean = total / max(n, 1)
    squares = (n - stored) * mean**2  # the zeros' deviations
    for _, block in rows.blocks(chunk_nnz):
        index, x = values(block)
        squares += np.bincount(index, weights=(x - mean[index]) ** 2, minlength=genes)
    return mean, (squares / (n - 1) if n > 1 else np.zeros(genes))


def _dense_blocks(counts, columns, transform: str, method: str, spots, block_bytes: int) -> np.ndarray:
    """``gene_scores`` on dense transformed values, ``block_bytes`` of them at a time (``svg``; dense input)."""
    from expreg.data.spatial_genes import section_weights, spatial_scores

    counts = sp.csc_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).reshape(-1)
    weights = section_weights(spots[0], spots[1]) if method == "svg" else None
    step = max(1, int(block_bytes // (8 * max(counts.shape[0], 1))))
    parts = []
    for start in range(0, len(columns), step):
        values = transform_counts(counts, columns[start : start + step], transform, totals).astype(np.float64)
        if method == "hvg":
            parts.append(np.stack(linear_moments(values)))
        elif method == "svg":
            parts.append(spatial_scores(values, spots[0], spots[1], weights)[None])
        else:
            parts.append(rank_genes(values, method)[None])
    joined = np.concatenate(parts, axis=1) if parts else np.zeros((2, 0))
    return seurat_from_moments(joined[0], joined[1]) if method == "hvg" else joined[0]

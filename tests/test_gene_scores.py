"""Gene scores from sparse counts in blocks of genes equal the dense computation (the same genes chosen)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from expreg.data.expression import top_k, transform_counts
from expreg.data.gene_scores import detection_rate, gene_scores, rank_genes


def _counts(seed: int = 0, spots: int = 300, genes: int = 120) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    rate = np.exp(rng.normal(-1.0, 1.2, genes))[None, :] * rng.uniform(0.3, 3.0, (spots, 1))  # depth varies
    counts = rng.poisson(rate).astype(np.float32)
    counts[:, 7] = 0  # a gene never detected
    return sp.csr_matrix(counts)


@pytest.mark.parametrize("method", ["hvg", "var", "mean", "svg"])
@pytest.mark.parametrize("transform", ["log1p_cpm", "log1p"])
def test_blocks_of_genes_give_the_dense_scores_and_the_same_genes(method, transform):
    counts = _counts()
    columns = np.flatnonzero(detection_rate(counts) >= 0.05)[::-1]  # any order of columns
    xy = np.random.default_rng(1).uniform(0, 1000, (counts.shape[0], 2))
    spots = (xy, np.repeat(["S1", "S2", "S3"], 100))
    dense = rank_genes(transform_counts(counts, columns, transform).astype(np.float64), method, spots)
    for block_bytes in (8 * 300 * 7, 8 * 300 * 1, 1 << 30):  # blocks of 7 genes, of one gene, all at once
        blocked = gene_scores(counts, columns, transform, method, spots, block_bytes=block_bytes)
        np.testing.assert_allclose(blocked, dense, rtol=1e-10, atol=1e-12, equal_nan=True)
        assert list(top_k(blocked, 20)) == list(top_k(dense, 20))


@pytest.mark.parametrize("transform", ["log1p_cpm", "log1p", "none"])
def test_moments_from_the_non_zeros_in_row_chunks_equal_the_dense_ones(transform):
    from expreg.data.gene_scores import linear_moments, sparse_moments

    counts = _counts(seed=3).toarray()
    counts[5] = 0  # a spot without counts (its library size is 0)
    counts = sp.csr_matrix(counts)
    counts.data[::17] = 0  # zeros stored in the sparse matrix
    dense = transform_counts(counts, np.arange(counts.shape[1]), transform).astype(np.float64)
    for chunk in (1 << 24, 97, 1):  # one chunk, a few hundred, one entry each
        mean, var = sparse_moments(counts, transform, chunk_nnz=chunk)
        np.testing.assert_allclose(mean, dense.mean(axis=0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(var, dense.var(axis=0, ddof=1), rtol=1e-11, atol=1e-15)
        if transform != "none":
            mean, var = sparse_moments(counts, transform, linear=True, chunk_nnz=chunk)
            expected = linear_moments(dense)
            np.testing.assert_allclose(mean, expected[0], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(var, expected[1], rtol=1e-11, atol=1e-15)


def test_detection_rate_counts_stored_zeros_as_not_detected():
    counts = sp.csr_matrix(np.array([[0, 2, 0], [1, 0, 0], [3, 4, 0]], dtype=np.float32))
    counts.data[0] = 0.0  # an explicit zero stored in the sparse matrix
    np.testing.assert_allclose(detection_rate(counts), [2 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(detection_rate(counts, chunk_nnz=1), [2 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(detection_rate(counts.toarray()), [2 / 3, 1 / 3, 0.0])

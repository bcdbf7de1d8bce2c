"""Spatially variable genes for ``data.genes=svg:K``: Moran's I of each gene on each section's spot lattice.

For one section (the spots of one ``sample_id``): each spot's ``SVG_NEIGHBOURS`` nearest spots of the
same section (Euclidean, in full-resolution pixels; the six of a hexagonal Visium lattice), weights
row-standardised, and per gene

    I = sum_i z_i * mean_{j in N(i)} z_j / sum_i z_i^2,     z = values - their mean over the section

on the transformed (log) values. Sections are never mixed: two sections' pixel coordinates are not
one space. Over the training sections, a gene's score is the mean of its per-section I weighted by
the sections' spot counts (sections where the gene is constant are left out of its mean). Genes
whose expression is patterned in tissue (I near 1) are chosen over genes whose variance is noise or
depth (I near 0). Sparse neighbour weights and gene blocks keep memory to spots x block per section.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

SVG_NEIGHBOURS = 6
GENE_BLOCK = 1024  # genes per block: memory is spots x block floats per section


def neighbour_weights(xy: np.ndarray, k: int = SVG_NEIGHBOURS) -> sp.csr_matrix:
    """Row-standardised weights of each spot's ``k`` nearest other spots (``xy``: ``(n, 2)`` positions)."""
    from scipy.spatial import cKDTree

    n = len(xy)
    k = min(k, n - 1)
    _, index = cKDTree(xy).query(xy, k=k + 1)
    neighbours = index[:, 1:] if k > 0 else np.zeros((n, 0), dtype=np.int64)
    rows = np.repeat(np.arange(n), k)
    return sp.csr_matrix((np.full(n * k, 1.0 / max(k, 1)), (rows, neighbours.reshape(-1))), shape=(n, n))


def morans_i(values: np.ndarray, xy: np.ndarray, k: int = SVG_NEIGHBOURS) -> np.ndarray:
    """Moran's I of every column of ``values`` (``(n, genes)``) over one section; NaN for a constant column
    (or fewer than 3 spots)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 3:
        return np.full(values.shape[1], np.nan)
    weights = neighbour_weights(np.asarray(xy, dtype=np.float64), k)
    scores = np.empty(values.shape[1])
    for start in range(0, values.shape[1], GENE_BLOCK):
        z = values[:, start : start + GENE_BLOCK]
        z = z - z.mean(axis=0)
        denominator = np.einsum("ij,ij->j", z, z)
        numerator = np.einsum("ij,ij->j", z, weights @ z)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores[start : start + GENE_BLOCK] = np.where(denominator > 0, numerator / denominator, np.nan)
    return scores


def spatial_scores(values: np.ndarray, xy: np.ndarray, sections: np.ndarray) -> np.ndarray:
    """Each column's Moran's I, per section, averaged over sections weighted by their spot counts."""
    total, weight = np.zeros(values.shape[1]), np.zeros(values.shape[1])
    for section in np.unique(sections):
        rows = np.flatnonzero(sections == section)
        scores = morans_i(values[rows], xy[rows])
        defined = ~np.isnan(scores)
        total[defined] += scores[defined] * len(rows)
        weight[defined] += len(rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan)

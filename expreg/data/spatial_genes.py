"""Spatially variable genes for ``data.genes=svg:K``: Moran's I of each gene on each section's spot lattice.

For one section (the spots of one ``sample_id``): each spot's ``SVG_NEIGHBOURS`` nearest spots of the
same section (Euclidean, in full-resolution pixels; the six of a hexagonal Visium lattice), weights
row-standardised, and per gene

    I = sum_i z_i * mean_{j in N(i)} z_j / sum_i z_i^2,     z = values - their mean over the section

on the transformed (log) values. Sections are never mixed: two sections' pixel coordinates are not
one space. Over the training sections, a gene's score is the mean of its per-section I weighted by
the sections' spot counts (sections where the gene is constant are left out of its mean). Genes
whose expression is patterned in tissue (I near 1) are chosen over genes whose variance is noise or
depth (I near 0; a gene that only follows depth still scores above 0, since depth itself is patterned
in tissue: read the depth-adjusted scores). Sparse neighbour weights and gene blocks keep the extra
memory to one section x one block of genes.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

SVG_NEIGHBOURS = 6
GENE_BLOCK = 1024  # genes per block: memory is spots x block floats per section


def neighbour_weights(xy: np.ndarray, k: int = SVG_NEIGHBOURS) -> sp.csr_matrix:
    """Row-standardised weights of each spot's ``k`` nearest *other* spots (``xy``: ``(n, 2)`` positions, at
    least ``k + 1`` of them). Ties at equal distance (a square ST grid's four diagonals) are broken by
    the KD-tree's order, the same for the same input."""
    from scipy.spatial import cKDTree

    n = len(xy)
    _, index = cKDTree(xy).query(xy, k=k + 1)
    neighbours = np.empty((n, k), dtype=np.int64)
    for i in range(n):  # itself is usually first, but not when two spots share a position
        others = index[i][index[i] != i]
        neighbours[i] = others[:k]
    rows = np.repeat(np.arange(n), k)
    return sp.csr_matrix((np.full(n * k, 1.0 / k), (rows, neighbours.reshape(-1))), shape=(n, n))


def morans_i(values: np.ndarray, xy: np.ndarray, k: int = SVG_NEIGHBOURS) -> np.ndarray:
    """Moran's I of every column of ``values`` (``(n, genes)``) over one section; NaN for a constant column,
    and for every column of a section with ``k`` spots or fewer (no neighbourhood to speak of)."""
    values = np.asarray(values, dtype=np.float64)
    xy = np.asarray(xy, dtype=np.float64)
    if len(values) <= k:
        return np.full(values.shape[1], np.nan)
    if not np.isfinite(xy).all():
        raise ValueError(f"spot positions are not finite ({int((~np.isfinite(xy)).any(axis=1).sum())} spot(s))")
    return _morans_i(values, neighbour_weights(xy, k))


def _morans_i(values: np.ndarray, weights: sp.csr_matrix) -> np.ndarray:
    z = values - values.mean(axis=0)
    denominator = np.einsum("ij,ij->j", z, z)
    numerator = np.einsum("ij,ij->j", z, weights @ z)
    size = np.abs(values).max(axis=0) ** 2 * len(values) if len(values) else np.zeros(values.shape[1])
    constant = denominator <= 1e-20 * np.maximum(size, np.finfo(np.float64).tiny)  # rounding is not variance
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(constant, np.nan, numerator / denominator)


def section_weights(xy: np.ndarray, sections: np.ndarray) -> list[tuple[np.ndarray, sp.csr_matrix]]:
    """``(rows, neighbour weights)`` of every section with more than ``SVG_NEIGHBOURS`` spots (computed once,
    reused for every block of genes)."""
    found = []
    for section in np.unique(sections):
        rows = np.flatnonzero(sections == section)
        if len(rows) <= SVG_NEIGHBOURS:
            continue
        position = np.asarray(xy, dtype=np.float64)[rows]
        if not np.isfinite(position).all():
            raise ValueError(f"section {section}: spot positions are not finite")
        found.append((rows, neighbour_weights(position)))
    return found


def spatial_scores(values: np.ndarray, xy: np.ndarray, sections: np.ndarray, weights=None) -> np.ndarray:
    """Each column's Moran's I, per section, averaged over sections weighted by their spot counts (sections
    too small or where the column is constant are left out of its mean). Memory: one section x one block of
    ``GENE_BLOCK`` genes at a time, beside ``values``. ``weights``: ``section_weights(xy, sections)``, when
    computed already."""
    total, weight = np.zeros(values.shape[1]), np.zeros(values.shape[1])
    for rows, section_w in weights if weights is not None else section_weights(xy, sections):
        for start in range(0, values.shape[1], GENE_BLOCK):
            block = slice(start, start + GENE_BLOCK)
            scores = _morans_i(np.asarray(values[rows, block], dtype=np.float64), section_w)
            defined = ~np.isnan(scores)
            total[block][defined] += scores[defined] * len(rows)
            weight[block][defined] += len(rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan)

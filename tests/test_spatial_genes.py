"""``data.genes=svg:K``: Moran's I on each training section's spot lattice (``expreg.data.spatial_genes``)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from expreg.data.expression import choose_genes
from expreg.data.spatial_genes import morans_i, spatial_scores


def _lattice(rng, rows=9, cols=11):
    """A jittered hexagonal lattice (no two distances equal, so the nearest neighbours are unambiguous)."""
    r, c = np.array([(i, j) for i in range(rows) for j in range(cols) if (i + j) % 2 == 0]).T
    return np.column_stack([c * 50.0, r * 86.6]) + rng.normal(0, 2.0, (len(r), 2))


def _morans_i_directly(values: np.ndarray, xy: np.ndarray, k: int = 6) -> np.ndarray:
    """The O(n^2) definition: full distance matrix, k nearest others, row-standardised weights."""
    n = len(xy)
    distance = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(axis=2))
    np.fill_diagonal(distance, np.inf)
    w = np.zeros((n, n))
    for i in range(n):
        w[i, np.argsort(distance[i])[:k]] = 1.0 / k
    z = values - values.mean(axis=0)
    return np.array([(n / w.sum()) * (z[:, g] @ w @ z[:, g]) / (z[:, g] @ z[:, g]) for g in range(values.shape[1])])


def test_morans_i_equals_the_direct_computation():
    rng = np.random.default_rng(0)
    xy = _lattice(rng)
    values = np.column_stack(
        [xy[:, 0] / 100 + rng.normal(size=len(xy)), rng.normal(size=len(xy)), np.sin(xy[:, 1] / 90)]
    )
    np.testing.assert_allclose(morans_i(values, xy), _morans_i_directly(values, xy), atol=1e-12)
    scores = morans_i(values, xy)
    assert scores[2] > 0.4 and abs(scores[1]) < 0.15  # a pattern vs noise
    assert np.isnan(morans_i(np.ones((len(xy), 1)), xy))[0]  # a constant gene: undefined
    assert np.isnan(morans_i(np.full((len(xy), 1), 0.1 + 0.2), xy))[0]  # ... also when rounding is not exact
    assert np.isnan(morans_i(values[:6], xy[:6])).all()  # 6 spots: no neighbourhood of 6 others
    twice = np.vstack([xy, xy[:1]])  # two spots at one position: neither is its own neighbour
    from expreg.data.spatial_genes import neighbour_weights

    assert neighbour_weights(twice).diagonal().sum() == 0


def test_sections_are_never_mixed_and_are_weighted_by_their_spots():
    rng = np.random.default_rng(1)
    a, b = _lattice(rng), _lattice(rng, rows=7, cols=9)  # the same pixel space: overlapping coordinates
    values_a = np.column_stack([a[:, 0] / 100, rng.normal(size=len(a))])
    values_b = np.column_stack([rng.normal(size=len(b)), rng.normal(size=len(b))])
    values, xy = np.vstack([values_a, values_b]), np.vstack([a, b])
    sections = np.array(["A"] * len(a) + ["B"] * len(b))
    expected = (len(a) * morans_i(values_a, a) + len(b) * morans_i(values_b, b)) / (len(a) + len(b))
    np.testing.assert_allclose(spatial_scores(values, xy, sections), expected, atol=1e-12)
    pooled = morans_i(values, xy)  # what mixing the sections' coordinates would give
    assert abs(pooled[0] - expected[0]) > 0.05


def test_svg_chooses_a_patterned_gene_over_a_noisier_one():
    rng = np.random.default_rng(2)
    xy = _lattice(rng, rows=14, cols=16)
    n = len(xy)
    patterned = rng.poisson(np.exp(1 + 1.5 * np.sin(xy[:, 0] / 150)))  # a tissue pattern
    noisy = rng.poisson(rng.gamma(0.3, 30, n))  # high variance, no pattern
    flat = rng.poisson(5, (n, 3))
    counts = sp.csr_matrix(np.column_stack([patterned, noisy, flat]))
    names = ["PATTERN", "NOISE", "F1", "F2", "F3"]
    common = {"min_detection": 0.1, "transform": "log1p", "train_groups": ["P"]}
    assert choose_genes(counts, names, "var:1", **common).genes == ["NOISE"]
    spots = (xy, np.array(["S1"] * n))
    assert choose_genes(counts, names, "svg:1", spots=spots, **common).genes == ["PATTERN"]
    with pytest.raises(ValueError, match="spatially variable genes need each spot's position"):
        choose_genes(counts, names, "svg:1", **common)

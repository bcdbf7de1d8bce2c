"""Metrics against scipy.stats, with ties and constant columns."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from expreg.evaluation.metrics import (
    compute_metrics,
    load_evaluate_metric,
    pearson_per_gene,
    rank_columns,
    spearman_per_gene,
)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    targets = rng.poisson(1.5, size=(301, 12)).astype(float)  # count-like: many ties
    predictions = targets + rng.normal(0, 1.5, size=targets.shape)
    predictions[:, 5] = np.round(predictions[:, 5])  # ties in predictions too
    targets[:, 2] = 3.0  # constant truth
    predictions[:, 7] = -1.0  # constant prediction
    return predictions, targets


def test_ranks_match_scipy_rankdata(arrays):
    predictions, targets = arrays
    for x in (predictions, targets):
        np.testing.assert_array_equal(rank_columns(x), scipy.stats.rankdata(x, axis=0))


def test_spearman_and_pearson_match_scipy_gene_by_gene(arrays):
    predictions, targets = arrays
    spearman = spearman_per_gene(predictions, targets)
    pearson = pearson_per_gene(predictions, targets)
    for j in range(targets.shape[1]):
        if j in (2, 7):
            assert np.isnan(spearman[j]) and np.isnan(pearson[j])
            continue
        assert abs(spearman[j] - scipy.stats.spearmanr(predictions[:, j], targets[:, j]).statistic) < 1e-9
        assert abs(pearson[j] - scipy.stats.pearsonr(predictions[:, j], targets[:, j]).statistic) < 1e-9


def test_summary_excludes_and_counts_undefined_genes(arrays):
    predictions, targets = arrays
    result = compute_metrics(predictions, targets)
    defined = [j for j in range(12) if j not in (2, 7)]
    expected = np.mean([scipy.stats.spearmanr(predictions[:, j], targets[:, j]).statistic for j in defined])
    assert result.summary["spearman_mean"] == pytest.approx(expected, abs=1e-9)
    assert result.summary["num_genes_undefined_spearman"] == 2
    assert result.summary["num_genes_undefined_pearson"] == 2
    assert result.summary["mse"] == pytest.approx(((predictions - targets) ** 2).mean(), abs=1e-12)
    per_gene_mse = ((predictions - targets) ** 2).mean(0)  # over samples, one value per gene
    assert np.asarray(result.mse).shape == (12,)
    np.testing.assert_allclose(result.mse, per_gene_mse, rtol=1e-12)
    rows = result.per_gene_rows()
    assert [r["mse"] for r in rows] == pytest.approx(list(per_gene_mse), rel=1e-12)
    assert rows[2]["spearman"] is None and rows[0]["gene"] == "y0"
    assert "2 of 12 genes undefined" in result.format()


def test_perfect_and_inverse_predictions():
    y = np.arange(20.0)[:, None] * np.ones((1, 3))
    assert compute_metrics(y * 2 + 1, y).spearman_mean == pytest.approx(1.0)
    assert compute_metrics(-y, y).pearson_mean == pytest.approx(-1.0)


def test_all_undefined_mean_is_nan():
    result = compute_metrics(np.ones((5, 2)), np.arange(10.0).reshape(5, 2))
    assert np.isnan(result.spearman_mean) and result.summary["num_genes_undefined_spearman"] == 2


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.zeros((4, 3)), np.zeros((4, 2)))
    bad = np.zeros((4, 2))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="sample 1, gene 1"):
        compute_metrics(bad, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="gene names"):
        compute_metrics(np.zeros((4, 2)), np.zeros((4, 2)), gene_names=["a"])


def test_evaluate_module_loads_offline_and_agrees(arrays):
    predictions, targets = arrays
    metric = load_evaluate_metric()
    result = metric.compute(predictions=predictions.tolist(), references=targets.tolist())
    direct = compute_metrics(predictions, targets)
    assert result["spearman_mean"] == pytest.approx(direct.spearman_mean, abs=1e-12)
    assert result["pearson_mean"] == pytest.approx(direct.pearson_mean, abs=1e-12)
    assert result["num_genes_undefined_spearman"] == 2
    assert len(result["per_gene"]) == 12

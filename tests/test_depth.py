"""Scores honest against sequencing depth (issue 27, part 1): the depth-adjusted (partial) Spearman and
Pearson and the depth oracle beside every score, checked against an independent computation and on
synthetic sets where expression is only depth, or carries a signal of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from expreg.data.metadata import MetadataError, read_metadata
from expreg.evaluation.metrics import compute_metrics, partial_correlation_columns

REPO = Path(__file__).resolve().parents[1]


def _partial_by_formula(a, b, c) -> float:
    """r_ab.c = (r_ab - r_ac r_bc) / sqrt((1 - r_ac^2)(1 - r_bc^2)), with scipy's Pearson."""
    r_ab, r_ac, r_bc = stats.pearsonr(a, b)[0], stats.pearsonr(a, c)[0], stats.pearsonr(b, c)[0]
    return (r_ab - r_ac * r_bc) / np.sqrt((1 - r_ac**2) * (1 - r_bc**2))


def test_the_partial_correlations_equal_an_independent_computation():
    rng = np.random.default_rng(0)
    n, k = 250, 6
    library = rng.lognormal(8, 1, n).round()
    z = np.log1p(library)
    truth = z[:, None] * rng.uniform(0, 1, k) + rng.normal(size=(n, k))
    predicted = 0.5 * truth + z[:, None] * rng.uniform(0, 1, k) + rng.normal(size=(n, k))
    predicted[:, 0] = np.round(predicted[:, 0])  # ties in the ranks too
    metrics = compute_metrics(predicted, truth, library_size=library)
    for j in range(k):
        assert metrics.pearson_adjusted[j] == pytest.approx(
            _partial_by_formula(predicted[:, j], truth[:, j], z), abs=1e-9
        )
        ranks = [stats.rankdata(v) for v in (predicted[:, j], truth[:, j], z)]
        assert metrics.spearman_adjusted[j] == pytest.approx(_partial_by_formula(*ranks), abs=1e-9)
        assert metrics.depth_oracle[j] == pytest.approx(stats.spearmanr(library, truth[:, j])[0], abs=1e-9)
    s = metrics.summary
    assert s["spearman_depth_adjusted_mean"] == pytest.approx(metrics.spearman_adjusted.mean(), abs=1e-12)
    assert s["depth_oracle_spearman_mean"] == pytest.approx(metrics.depth_oracle.mean(), abs=1e-12)
    np.testing.assert_allclose(partial_correlation_columns(predicted, truth, z), metrics.pearson_adjusted, atol=1e-12)


def test_expression_that_is_only_depth_scores_high_raw_and_zero_adjusted():
    rng = np.random.default_rng(1)
    n, k = 2000, 20
    library = rng.lognormal(8, 0.8, n).round()
    z = np.log1p(library)
    truth = z[:, None] + rng.normal(scale=0.4, size=(n, k))  # every gene: depth plus noise, nothing else
    predicted = z[:, None] + rng.normal(scale=0.4, size=(n, k))  # a model that learned depth (from cellularity)
    s = compute_metrics(predicted, truth, library_size=library).summary
    assert s["spearman_mean"] > 0.5 and s["depth_oracle_spearman_mean"] > 0.8
    assert abs(s["spearman_depth_adjusted_mean"]) < 0.05 and abs(s["pearson_depth_adjusted_mean"]) < 0.05


def test_a_gene_with_a_signal_of_its_own_keeps_its_adjusted_score():
    rng = np.random.default_rng(2)
    n = 2000
    library = rng.lognormal(8, 0.8, n).round()
    z = np.log1p(library)
    signal = rng.normal(size=n)  # e.g. a cell type the image shows, independent of depth
    truth = np.column_stack([signal + z, z + rng.normal(scale=0.4, size=n)])
    predicted = np.column_stack([signal + 0.3 * rng.normal(size=n) + z, z + rng.normal(scale=0.4, size=n)])
    metrics = compute_metrics(predicted, truth, ["SIGNAL", "DEPTH"], library_size=library)
    rows = {r["gene"]: r for r in metrics.per_gene_rows()}
    assert rows["SIGNAL"]["spearman_depth_adjusted"] > 0.9 and abs(rows["DEPTH"]["spearman_depth_adjusted"]) < 0.1
    assert rows["SIGNAL"]["spearman"] > 0.5 and rows["DEPTH"]["spearman"] > 0.5  # raw: both look good


def test_an_unknown_library_size_is_n_a_never_guessed():
    rng = np.random.default_rng(3)
    truth, predicted = rng.normal(size=(30, 2)), rng.normal(size=(30, 2))
    for library in (None, np.r_[np.full(29, 100.0), np.nan]):  # none, or one spot unknown
        metrics = compute_metrics(predicted, truth, library_size=library)
        assert metrics.summary["spearman_depth_adjusted_mean"] is None
        assert metrics.summary["depth_oracle_spearman_mean"] is None
        assert all(r["spearman_depth_adjusted"] is None for r in metrics.per_gene_rows())
        assert "depth-adjusted n/a (library size unknown)" in metrics.format()
    constant = np.column_stack([np.full(30, 2.3456789), predicted[:, 1]])  # e.g. the mean baseline's prediction
    depth_only = np.column_stack([np.log1p(np.linspace(100, 900, 30)).astype(np.float32), predicted[:, 1]])
    for p in (constant, depth_only):  # nothing left once depth is out: undefined, not rounding noise
        m = compute_metrics(p, truth, library_size=np.linspace(100, 900, 30))
        assert (
            np.isnan(m.spearman_adjusted[0]) and np.isnan(m.pearson_adjusted[0]) and np.isfinite(m.pearson_adjusted[1])
        )
    masked = truth.copy()
    masked[:10, 1] = np.nan  # a gene some spots did not measure: adjusted on its measured spots only
    library = rng.lognormal(8, 1, 30)
    m = compute_metrics(predicted, masked, allow_unmeasured=True, library_size=library)
    alone = compute_metrics(predicted[10:, 1:], truth[10:, 1:], library_size=library[10:])
    assert m.spearman_adjusted[1] == pytest.approx(alone.spearman_adjusted[0], abs=1e-12)


def test_a_library_size_column_is_checked_and_may_be_empty(dataset_csv):
    frame = pd.read_csv(dataset_csv)
    frame["library_size"] = [""] + [str(1000 + i) for i in range(len(frame) - 1)]
    frame.to_csv(dataset_csv, index=False)
    assert list(read_metadata(dataset_csv).frame["library_size"].iloc[:2]) == ["", "1000"]
    frame.loc[4, "library_size"] = "-5"
    frame.to_csv(dataset_csv, index=False)
    with pytest.raises(
        MetadataError, match=r"column 'library_size', line 6: not a non-negative number \(values '-5'\)"
    ):
        read_metadata(dataset_csv)


def test_the_depth_oracle_needs_library_sizes_and_says_so_before_writing(dataset_csv, tmp_path):
    from expreg.cv import main as cv_main

    out = tmp_path / "cv"
    args = ["--methods", "depth_oracle", "--out_dir", str(out), f"data.metadata_csv={dataset_csv}"]
    assert cv_main([str(REPO / "recipes" / "tiny.yaml"), *args]) == 2 and not out.exists()
    from expreg.config import ConfigError, load_recipe
    from expreg.evaluation.cv import check_config

    with pytest.raises(ConfigError, match="a HEST-Benchmark task gives no spot library sizes"):
        check_config(load_recipe(None, []), ["depth_from_image"], hest_task="bench_data/IDC")
    with pytest.raises(ConfigError, match="stop_after_steps"):
        check_config(load_recipe(None, ["train.stop_after_steps=3"]), ["depth_from_image"])


@pytest.mark.slow
def test_depth_from_image_trains_on_library_size_and_is_scored_on_the_genes(make_dataset, tmp_path):
    import json

    from expreg.cv import main as cv_main

    csv = make_dataset(num_groups=3, samples_per_group=8, num_genes=4)
    frame = pd.read_csv(csv)
    frame["library_size"] = np.round(np.exp(frame["y0"] + 6))  # depth follows gene 0 (as cellularity would)
    frame.to_csv(csv, index=False)
    out = tmp_path / "cv"
    args = ["--methods", "depth_from_image,depth_oracle,mean", "--out_dir", str(out), f"data.metadata_csv={csv}"]
    assert cv_main([str(REPO / "recipes" / "tiny.yaml"), *args, "train.epochs=1"]) == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    image = summary["methods"]["depth_from_image"]
    assert len(image["folds"]) == 3 and all(isinstance(f["depth_spearman"], float) for f in image["folds"])
    for k, fold in enumerate(image["folds"]):  # its own runs, one output: the log library size
        run = out / "depth_from_image" / "runs" / f"finetune__fold{k}"
        assert json.loads((run / "checkpoints" / "best" / "config.json").read_text())["gene_names"] == [
            "log_library_size"
        ]
        assert fold["test_groups"] == summary["methods"]["mean"]["folds"][k]["test_groups"]
        assert isinstance(fold["spearman_mean"], float)  # broadcast to the 4 genes, scored on them
    oracle = summary["methods"]["depth_oracle"]["folds"][0]
    assert oracle["spearman_mean"] == pytest.approx(oracle["depth_oracle_spearman_mean"], abs=1e-12)
    assert "depth_from_image" in (out / "cv_summary.md").read_text()

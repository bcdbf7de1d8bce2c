"""Targets from raw counts: the transforms, gene choice on training rows only (scanpy's HVG as the
reference), and the recipe keys data.expression_file / data.genes in a run and in cross-validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from expreg.config import ConfigError, load_recipe
from expreg.data.expression import choose_genes, detection_rate, expression_targets, transform_counts
from expreg.data.h5ad import read_h5ad, write_h5ad
from expreg.data.metadata import read_metadata

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def test_transforms_match_their_definitions():
    counts = sp.csr_matrix(np.array([[0, 3, 1], [4, 0, 0], [0, 0, 0]], dtype=np.int32))
    cpm = transform_counts(counts, [1, 0, -1], "log1p_cpm")
    np.testing.assert_allclose(cpm[0], np.log1p([3 / 4 * 1e4, 0, np.nan]), rtol=1e-6)
    np.testing.assert_allclose(cpm[1], np.log1p([0, 1e4, np.nan]), rtol=1e-6)
    assert (cpm[2, :2] == 0).all()  # an empty spot: zeros, not NaN
    assert np.isnan(cpm[:, 2]).all()  # a gene the sample did not measure (-1): NaN, never a measured zero
    np.testing.assert_allclose(transform_counts(counts, [1, 2], "log1p")[0], np.log1p([3, 1]), rtol=1e-6)
    np.testing.assert_array_equal(transform_counts(counts, [0, -1], "none"), [[0, np.nan], [4, np.nan], [0, np.nan]])


@pytest.mark.parametrize("case", ["log1p_cpm:10", "log1p_cpm:50", "log1p:10", "log1p:50"])
def test_highly_variable_genes_match_scanpy(case):
    """scanpy 1.11.5's highly_variable_genes(flavor="seurat") on the same counts (tests/data/make_hvg_reference.py)."""
    reference = json.loads((DATA / "hvg_scanpy_reference.json").read_text())["cases"][case]
    counts = sp.csr_matrix(np.load(DATA / "hvg_counts.npz")["counts"])
    names = [f"g{i}" for i in range(counts.shape[1])]
    transform, k = case.split(":")
    choice = choose_genes(counts, names, f"hvg:{k}", min_detection=0.1, transform=transform, train_groups=["a"])
    assert sorted(choice.genes) == reference["genes"]
    assert [names[i] for i in np.flatnonzero(detection_rate(counts) >= 0.1)] == reference["eligible"]


def test_var_and_mean_choose_the_top_genes_and_rare_genes_are_left_out():
    rng = np.random.default_rng(0)
    counts = rng.poisson([1, 5, 20, 5, 0.01], size=(200, 5)).astype(np.int32)
    counts[:, 3] *= rng.integers(0, 6, 200)  # gene 3: the most variable
    names = ["a", "b", "c", "d", "rare"]
    top_mean = choose_genes(
        sp.csr_matrix(counts), names, "mean:2", min_detection=0.1, transform="none", train_groups=["x"]
    )
    assert top_mean.genes == ["c", "d"] and top_mean.excluded_rare == 1
    top_var = choose_genes(
        sp.csr_matrix(counts), names, "var:1", min_detection=0.1, transform="none", train_groups=["x"]
    )
    assert top_var.genes == ["d"]
    with pytest.raises(ValueError, match="only 4 genes are detected"):
        choose_genes(sp.csr_matrix(counts), names, "var:5", min_detection=0.1, transform="none", train_groups=["x"])
    with pytest.raises(ValueError, match="log values"):
        choose_genes(sp.csr_matrix(counts), names, "hvg:2", min_detection=0.1, transform="none", train_groups=["x"])


def _expression_set(make_dataset, test_only_gene: bool = True) -> tuple[Path, Path]:
    """A prepared-style data set: metadata.csv without targets + expression.h5ad of raw counts.

    Counts follow the synthetic targets (so images predict them); "TESTONLY" varies wildly, but only
    in group P04, and is flat elsewhere.
    """
    csv = make_dataset(num_groups=5, samples_per_group=8, num_genes=12)
    frame = pd.read_csv(csv)
    targets = frame[[f"y{k}" for k in range(12)]].to_numpy()
    frame = frame.drop(columns=[f"y{k}" for k in range(12)])
    frame["sample_id"] = frame["group_id"]
    frame["barcode"] = [f"b{i}" for i in range(len(frame))]
    rng = np.random.default_rng(1)
    counts = rng.poisson(np.exp(np.clip(targets, -3, 3)) * 20).astype(np.int32)
    special = np.where(frame["group_id"] == "P04", rng.integers(0, 400, len(frame)), 5)[:, None]
    counts = np.hstack([counts, special if test_only_gene else np.full_like(special, 5)])
    genes = [f"GENE{k}" for k in range(12)] + ["TESTONLY"]
    (csv.parent / "genes.txt").unlink()
    frame.to_csv(csv, index=False)
    obs = frame[["sample_id", "barcode", "group_id", "path"]].copy()
    obs.index = [f"{s}:{b}" for s, b in zip(frame["sample_id"], frame["barcode"])]
    write_h5ad(csv.parent / "expression.h5ad", sp.csr_matrix(counts), obs, genes)
    return csv, csv.parent / "expression.h5ad"


def test_genes_are_chosen_on_training_rows_only(make_dataset):
    csv, h5ad = _expression_set(make_dataset)
    metadata = read_metadata(csv, targets_required=False)
    is_test = (metadata.frame["group_id"] == "P04").to_numpy()
    table, choice = expression_targets(metadata, h5ad, ~is_test, "var:3", min_detection=0.1, transform="log1p")
    assert "TESTONLY" not in choice.genes and choice.train_groups == ["P00", "P01", "P02", "P03"]
    assert table.gene_names == choice.genes and table.targets().shape == (len(metadata.frame), 3)
    everything = expression_targets(
        metadata, h5ad, np.ones(len(is_test), bool), "var:3", min_detection=0.1, transform="log1p"
    )
    assert "TESTONLY" in everything[1].genes  # the same call with the test group in training picks it


def test_rows_are_matched_by_sample_and_barcode_and_a_missing_one_is_named(make_dataset):
    csv, h5ad = _expression_set(make_dataset)
    frame = pd.read_csv(csv)
    shuffled = frame.sample(frac=1.0, random_state=0)
    shuffled.to_csv(csv, index=False)
    metadata = read_metadata(csv, targets_required=False)
    table, choice = expression_targets(
        metadata, h5ad, np.ones(len(frame), bool), "mean:2", min_detection=0.1, transform="none"
    )
    original = read_metadata(csv, targets_required=False)
    assert table.targets().shape[0] == len(original.frame)
    shuffled.loc[shuffled.index[3], "barcode"] = "nowhere"
    shuffled.to_csv(csv, index=False)
    with pytest.raises(Exception, match=r"line 5: no row with the same sample_id and barcode"):
        expression_targets(
            read_metadata(csv, targets_required=False),
            h5ad,
            np.ones(len(frame), bool),
            "mean:2",
            min_detection=0.1,
            transform="none",
        )


def test_recipe_keys_are_checked():
    with pytest.raises(ConfigError, match="go together"):
        load_recipe(None, ["data.expression_file=x.h5ad"])
    with pytest.raises(ConfigError, match="target_transform"):
        load_recipe(None, ["data.expression_file=x.h5ad", "data.genes=hvg:5", "data.target_transform=sqrt"])
    with pytest.raises(ConfigError, match="min_gene_detection"):
        load_recipe(None, ["data.expression_file=x.h5ad", "data.genes=hvg:5", "data.min_gene_detection=2"])


@pytest.mark.slow  # end to end (~25-50 s): moved out of the default run to keep it under 10 min
def test_a_run_chooses_genes_on_its_training_split_and_records_them(make_dataset, tmp_path):
    csv, h5ad = _expression_set(make_dataset)
    split = pd.DataFrame({"path": pd.read_csv(csv)["path"], "group_id": pd.read_csv(csv)["group_id"]})
    split["split"] = np.select(
        [split["group_id"] == "P04", split["group_id"] == "P03"], ["test", "validation"], "train"
    )
    split.to_csv(tmp_path / "split.csv", index=False)
    args = [
        f"data.metadata_csv={csv}",
        f"data.split_csv={tmp_path / 'split.csv'}",
        f"data.expression_file={h5ad}",
        "data.genes=var:4",
        "data.target_transform=log1p",
        f"logging.output_dir={tmp_path / 'runs'}",
        "logging.run_name=expr",
        "train.epochs=1",
    ]
    result = subprocess.run(
        [sys.executable, str(REPO / "run_regression.py"), str(REPO / "recipes" / "tiny.yaml"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "expr"
    genes = (run / "genes.txt").read_text().split()
    assert len(genes) == 4 and "TESTONLY" not in genes
    resolved = yaml.safe_load((run / "config_resolved.yaml").read_text())
    assert resolved["data"]["genes"] == str(run / "genes.txt")
    model_config = json.loads((run / "checkpoints" / "best" / "config.json").read_text())
    assert model_config["gene_names"] == genes
    card = (run / "checkpoints" / "best" / "README.md").read_text()
    n_train = int((split["split"] == "train").sum())
    chosen = f"genes chosen on the training split only: 4 genes by var:4 on {n_train} training spots of group(s) P00, P01, P02"
    assert chosen in card
    assert "held-out" in card.lower()
    assert list(pd.read_csv(run / "predictions_test.csv").columns[2:]) == genes
    # beside every score: depth-adjusted and the depth oracle, the library size coming from the raw counts
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("spearman_depth_adjusted_mean", "pearson_depth_adjusted_mean", "depth_oracle_spearman_mean"):
        assert isinstance(metrics[f"best_val_{key}"], float) and isinstance(metrics[f"test_{key}"], float), key
    assert isinstance(metrics["history"][0]["val_spearman_depth_adjusted_mean"], float)
    per_gene = pd.read_csv(run / "per_gene_metrics_test.csv")
    assert per_gene["spearman_depth_adjusted"].notna().all() and per_gene["depth_oracle_spearman"].notna().all()
    assert "depth-adjusted mean Spearman (library size regressed out)" in card


def test_cross_validation_folds_choose_their_own_genes(make_dataset, tmp_path, monkeypatch):
    import expreg.data.h5ad
    from expreg.cv import main as cv_main
    from expreg.data import expression

    csv, h5ad = _expression_set(make_dataset)
    out = tmp_path / "cv"
    reads, read = [], expreg.data.h5ad.read_h5ad_tables
    monkeypatch.setattr(expreg.data.h5ad, "read_h5ad_tables", lambda path: reads.append(path) or read(path))
    expression._EXPRESSION_CACHE.clear()
    code = cv_main(
        [
            str(REPO / "recipes" / "tiny.yaml"),
            "--n_folds",
            "5",
            "--methods",
            "ridge,mean,depth_oracle",
            "--out_dir",
            str(out),
            f"data.metadata_csv={csv}",
            f"data.expression_file={h5ad}",
            "data.genes=var:3",
            "data.target_transform=log1p",
        ]
    )
    assert code == 0
    assert len(reads) == 1  # obs, var and uns read once for the 5 folds; the counts are streamed (CountRows)
    summary = json.loads((out / "cv_summary.json").read_text())
    lists = {k: (out / f"genes_fold{k}.txt").read_text().split() for k in range(5)}
    test_fold_of_p04 = next(f["fold"] for f in summary["methods"]["mean"]["folds"] if f["test_groups"] == ["P04"])
    assert "TESTONLY" not in lists[test_fold_of_p04]  # held out: never chosen
    assert all("TESTONLY" in genes for k, genes in lists.items() if k != test_fold_of_p04)
    selection = summary["gene_selection"]
    assert selection["per_fold"] == {str(k): 3 for k in range(5)}
    common = set.intersection(*(set(g) for g in lists.values()))
    assert selection["in_every_fold"] == len(common)
    assert set(summary["methods"]["ridge"]["per_gene_spearman_mean"]) == common
    assert "chosen in every fold" in (out / "cv_summary.md").read_text()
    ridge = summary["methods"]["ridge"]  # the raw counts give each spot's library size: adjusted beside raw
    assert isinstance(ridge["spearman_depth_adjusted_mean"], float) and isinstance(
        ridge["depth_oracle_spearman_mean"], float
    )
    assert all(isinstance(f["spearman_depth_adjusted_mean"], float) for f in ridge["folds"])
    assert "The spot's library size alone (a diagnostic" in (out / "cv_summary.md").read_text()
    oracle = summary["methods"]["depth_oracle"]  # a row of its own: every gene predicted by the measured depth
    for fold, ridge_fold in zip(oracle["folds"], ridge["folds"]):
        assert fold["spearman_mean"] == pytest.approx(ridge_fold["depth_oracle_spearman_mean"], abs=1e-12)


def test_the_expression_file_is_read_again_when_it_changes(make_dataset):
    from expreg.data import expression

    csv, h5ad = _expression_set(make_dataset)
    metadata = read_metadata(csv, targets_required=False)
    rows = np.ones(len(metadata.frame), bool)
    first, _ = expression_targets(metadata, h5ad, rows, "var:3", min_detection=0.1, transform="log1p")
    again, _ = expression_targets(metadata, h5ad, rows, "var:3", min_detection=0.1, transform="log1p")
    cached = expression._EXPRESSION_CACHE["table"]
    table, counts = expression._read_expression(h5ad)
    assert table is cached and np.array_equal(first.targets(), again.targets())
    matrix = read_h5ad(h5ad).X
    assert (counts.read() != matrix).nnz == 0  # streamed by blocks: the file's rows, in order
    write_h5ad(h5ad, matrix * 2, table.obs, list(table.var_names))  # rewritten: a new size or time
    os.utime(h5ad, ns=(1, 1))
    assert expression._read_expression(h5ad)[0] is not cached
    np.testing.assert_allclose(expression._read_expression(h5ad)[1].read().toarray(), matrix.toarray() * 2)


def _given(metadata, h5ad, gene_file):
    """``expression_targets`` with a gene list file, every row a training row."""
    return expression_targets(
        metadata, h5ad, np.ones(len(metadata.frame), bool), gene_file, min_detection=0.1, transform="log1p"
    )


def test_a_given_list_is_said_to_be_given_and_resume_keeps_the_choice(make_dataset, tmp_path):
    csv, h5ad = _expression_set(make_dataset)
    (tmp_path / "list.txt").write_text("GENE1\n# a comment\nGENE2\n")
    metadata = read_metadata(csv, targets_required=False)
    _, choice = _given(metadata, h5ad, str(tmp_path / "list.txt"))
    assert choice.genes == ["GENE1", "GENE2"] and not choice.chosen_here
    assert "not checked for leakage" in choice.describe()
    (tmp_path / "list.json").write_text(json.dumps({"how": "2 genes by var:2 on 9 training spots"}))
    _, choice = _given(metadata, h5ad, str(tmp_path / "list.txt"))
    assert "chosen earlier: 2 genes by var:2 on 9 training spots" in choice.describe()
    (tmp_path / "twice.txt").write_text("GENE1\nGENE1\n")
    with pytest.raises(ConfigError, match="repeated gene name"):
        _given(metadata, h5ad, str(tmp_path / "twice.txt"))


def test_resume_refuses_another_gene_spec(tmp_path):
    from expreg.training.checkpoint import _genes_differ

    (tmp_path / "genes.json").write_text(json.dumps({"spec": "hvg:50"}))
    saved = str(tmp_path / "genes.txt")
    assert _genes_differ(tmp_path, saved, "hvg:50") == [] and _genes_differ(tmp_path, saved, saved) == []
    assert "run chose its genes by 'hvg:50', recipe has 'var:50'" in _genes_differ(tmp_path, saved, "var:50")[0]
    assert _genes_differ(tmp_path, None, None) == [] and _genes_differ(tmp_path, None, "hvg:5")


def test_gene_choice_divides_by_each_spots_total_over_all_genes():
    """log1p_cpm while choosing genes: library sizes over every gene, the rare ones left out of the choice included."""
    names = ["A", "B", "RARE"]
    counts = np.array([[10, 1, 100_000], [4, 6, 0], [4, 6, 0], [4, 6, 0]], dtype=np.int32)
    eligible = counts[:, :2].astype(np.float64)

    def top_mean(totals):  # the gene of highest mean log1p(counts per 10,000), by hand
        return names[int(np.argmax(np.log1p(eligible * 1e4 / totals[:, None]).mean(axis=0)))]

    by_hand = top_mean(counts.sum(axis=1).astype(np.float64))
    assert by_hand == "B" and top_mean(eligible.sum(axis=1)) == "A"  # the library size decides this choice
    for matrix in (counts, sp.csr_matrix(counts)):
        choice = choose_genes(matrix, names, "mean:1", min_detection=0.5, transform="log1p_cpm", train_groups=["x"])
        assert choice.genes == [by_hand] and choice.excluded_rare == 1  # RARE: in 1 of 4 spots, never chosen

"""Where samples meet: a gene a sample never measured is never a measured zero, genes are joined by
feature id, and the records that say so survive the h5ad layer (issue 22, items 2-4).

Two gene panels over five samples (one sample per group): ``ONLY_A`` is measured by P00-P02 only,
``ONLY_B`` by P03-P04 only; in ``expression.h5ad`` their other samples hold zeros, recorded in
``uns["genes_not_measured"]`` as ``expreg.prepare`` writes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from helpers.spaceranger import write_10x_h5
from PIL import Image

from expreg.config import ConfigError
from expreg.data.dataset import TargetStats
from expreg.data.expression import expression_targets
from expreg.data.h5ad import H5adError, read_h5ad, read_h5ad_tables, write_h5ad
from expreg.data.metadata import read_metadata
from expreg.evaluation.baselines import fit_ridge
from expreg.evaluation.metrics import compute_metrics
from expreg.modeling.model import masked_mse

REPO = Path(__file__).resolve().parents[1]
PANEL_A, PANEL_B = ("P00", "P01", "P02"), ("P03", "P04")


def _panels(make_dataset, record: bool = True) -> tuple[Path, Path]:
    """metadata.csv (no targets) + expression.h5ad: 6 shared genes, ONLY_A and ONLY_B on their panels."""
    csv = make_dataset(num_groups=5, samples_per_group=8, num_genes=6)
    frame = pd.read_csv(csv)
    targets = frame[[f"y{k}" for k in range(6)]].to_numpy()
    frame = frame.drop(columns=[f"y{k}" for k in range(6)])
    frame["sample_id"], frame["barcode"] = frame["group_id"], [f"b{i}" for i in range(len(frame))]
    rng = np.random.default_rng(0)
    shared = rng.poisson(np.exp(np.clip(targets, -2, 2)) * 10)
    in_a = frame["sample_id"].isin(PANEL_A).to_numpy()
    only_a = np.where(in_a, rng.poisson(300, len(frame)), 0)  # zeros where not measured: no data
    only_b = np.where(~in_a, rng.poisson(300, len(frame)), 0)
    counts = np.column_stack([shared, only_a, only_b]).astype(np.int32)
    genes = [f"GENE{k}" for k in range(6)] + ["ONLY_A", "ONLY_B"]
    (csv.parent / "genes.txt").unlink()
    frame.to_csv(csv, index=False)
    obs = frame[["sample_id", "barcode", "group_id", "path"]].copy()
    obs.index = [f"{s}:{b}" for s, b in zip(frame["sample_id"], frame["barcode"])]
    obs["x_px"], obs["y_px"] = rng.uniform(0, 1000, len(frame)), rng.uniform(0, 1000, len(frame))
    uns = {"genes_not_measured": {s: (["ONLY_B"] if s in PANEL_A else ["ONLY_A"]) for s in PANEL_A + PANEL_B}}
    write_h5ad(csv.parent / "expression.h5ad", sp.csr_matrix(counts), obs, genes, uns=uns if record else None)
    return csv, csv.parent / "expression.h5ad"


def test_genes_a_sample_never_measured_are_not_eligible(make_dataset):
    csv, h5ad = _panels(make_dataset)
    metadata = read_metadata(csv, targets_required=False)
    train = metadata.frame["group_id"].isin(["P00", "P01", "P02", "P03"]).to_numpy()
    # without the record, the two genes each panel lacks are exactly the two of highest variance
    old_csv, old_h5ad = _panels(make_dataset, record=False)
    old_metadata = read_metadata(old_csv, targets_required=False)
    old = expression_targets(old_metadata, old_h5ad, train, "var:2", min_detection=0.1, transform="log1p")[1]
    assert sorted(old.genes) == ["ONLY_A", "ONLY_B"]
    table, choice = expression_targets(metadata, h5ad, train, "var:2", min_detection=0.1, transform="log1p")
    assert not {"ONLY_A", "ONLY_B"} & set(choice.genes) and np.isfinite(table.targets()).all()
    every = {"P00": 1, "P01": 1, "P02": 1, "P03": 1, "P04": 1}  # each sample lacks one of the two
    assert choice.num_excluded_unmeasured == 2 and choice.excluded_unmeasured == every
    described = (
        "leaving out 2 gene(s) not measured by every sample of the run (P00: 1, P01: 1, P02: 1, P03: 1, P04: 1)"
    )
    assert described in choice.describe() and choice.record()["excluded_not_measured"] == 2  # genes.json says so
    # training on panel A alone: ONLY_A is measured by every training sample, but the held-out P03/P04 lack it
    panel_a = metadata.frame["group_id"].isin(PANEL_A).to_numpy()
    strict = expression_targets(metadata, h5ad, panel_a, "var:2", min_detection=0.1, transform="log1p")[1]
    assert strict.num_excluded_unmeasured == 2  # it could never be scored on P03/P04: not eligible
    masked = expression_targets(
        metadata, h5ad, panel_a, "var:7", min_detection=0.1, transform="log1p", allow_unmeasured=True
    )[1]
    assert masked.num_excluded_unmeasured == 1 and "ONLY_A" in masked.genes and "ONLY_B" not in masked.genes
    assert masked.masked_unmeasured == {"P03": ["ONLY_A"], "P04": ["ONLY_A"]}
    assert "not measured by every training sample (P00: 1, P01: 1, P02: 1)" in masked.describe()
    stats = masked.record()["per_gene_on_training_spots"]["ONLY_A"]  # on the spots whose sample measured it
    assert stats["detection"] == 1.0  # Poisson(300) everywhere it was measured, never counting the zeros of panel B


def test_a_listed_gene_a_sample_did_not_measure_is_an_error_or_masked_never_zero(make_dataset, tmp_path):
    csv, h5ad = _panels(make_dataset)
    metadata = read_metadata(csv, targets_required=False)
    train = metadata.frame["group_id"].isin(["P00", "P01", "P02", "P03"]).to_numpy()
    (tmp_path / "list.txt").write_text("GENE0\nONLY_A\n")
    with pytest.raises(
        ConfigError,
        match=r"sample P03 \(training rows\) did not measure ONLY_A; sample P04 "
        r"\(held-out rows\) did not measure ONLY_A.*data.allow_unmeasured_genes=true",
    ):
        expression_targets(metadata, h5ad, train, str(tmp_path / "list.txt"), min_detection=0.1, transform="log1p")
    table, choice = expression_targets(
        metadata, h5ad, train, str(tmp_path / "list.txt"), min_detection=0.1, transform="log1p", allow_unmeasured=True
    )
    targets, samples = table.targets(), metadata.frame["sample_id"].to_numpy()
    lacking = np.isin(samples, PANEL_B)
    assert np.isnan(targets[lacking, 1]).all() and np.isfinite(targets[~lacking, 1]).all()  # NaN, never 0
    assert np.isfinite(targets[:, 0]).all() and choice.masked_unmeasured == {"P03": ["ONLY_A"], "P04": ["ONLY_A"]}
    assert "not measured, left out of the loss and the metrics: P03: ONLY_A; P04: ONLY_A" in choice.describe()
    (tmp_path / "never.txt").write_text("ONLY_B\n")  # no training sample of P00-P02 measured it
    with pytest.raises(ConfigError, match="no training sample measured ONLY_B"):
        expression_targets(
            metadata,
            h5ad,
            np.isin(samples, PANEL_A),
            str(tmp_path / "never.txt"),
            min_detection=0.1,
            transform="log1p",
            allow_unmeasured=True,
        )


def test_the_loss_the_statistics_the_metrics_and_ridge_leave_unmeasured_targets_out():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(40, 3))
    predicted = truth + rng.normal(scale=0.5, size=truth.shape)
    masked = truth.copy()
    masked[:15, 1] = np.nan  # gene 1 not measured in the first 15 spots
    loss = masked_mse(torch.tensor(predicted), torch.tensor(masked))
    kept = ~np.isnan(masked)
    assert float(loss) == pytest.approx(((predicted - truth)[kept] ** 2).mean())
    assert float(masked_mse(torch.tensor(predicted), torch.tensor(truth))) == pytest.approx(
        ((predicted - truth) ** 2).mean()
    )
    p = torch.tensor(predicted, requires_grad=True)
    masked_mse(p, torch.tensor(masked)).backward()
    assert (p.grad[:15, 1] == 0).all() and (p.grad[15:, 1] != 0).all()  # no gradient from an unmeasured target
    stats = TargetStats.from_labels(masked)
    assert stats.mean[1] == pytest.approx(truth[15:, 1].mean()) and stats.std[1] == pytest.approx(truth[15:, 1].std())
    with pytest.raises(ValueError, match="targets contain NaN"):
        compute_metrics(predicted, masked)  # strict unless told: a NaN from a bug is never masked silently
    metrics = compute_metrics(predicted, masked, allow_unmeasured=True)
    alone = compute_metrics(predicted[15:, 1:2], truth[15:, 1:2])
    assert metrics.spearman[1] == pytest.approx(alone.spearman[0]) and metrics.pearson[1] == pytest.approx(
        alone.pearson[0]
    )
    assert metrics.spearman[0] == pytest.approx(compute_metrics(predicted[:, :1], truth[:, :1]).spearman[0])
    assert (
        metrics.summary["num_targets_not_measured"] == 15 and "15 targets not measured, left out" in metrics.format()
    )
    assert "num_targets_not_measured" not in compute_metrics(predicted, truth).summary
    with pytest.raises(ValueError, match="predictions contain NaN"):
        compute_metrics(masked, truth, allow_unmeasured=True)  # a NaN prediction is a bug, never "not measured"
    x = rng.normal(size=(40, 4))
    w, b = fit_ridge(x, masked, 1.0)
    w1, b1 = fit_ridge(x[15:], truth[15:, 1:2], 1.0)
    np.testing.assert_allclose(w[:, 1:2], w1) and np.testing.assert_allclose(b[1], b1[0])
    np.testing.assert_allclose(w[:, [0, 2]], fit_ridge(x, truth[:, [0, 2]], 1.0)[0])


@pytest.mark.slow
def test_a_run_with_unmeasured_genes_allowed_trains_and_scores_on_measured_targets(make_dataset, tmp_path):
    csv, h5ad = _panels(make_dataset)
    (tmp_path / "list.txt").write_text("GENE0\nGENE1\nONLY_A\n")
    frame = pd.read_csv(csv)
    split = frame[["path", "group_id"]].copy()
    split["split"] = np.select(
        [frame["group_id"] == "P04", frame["group_id"] == "P02"], ["test", "validation"], "train"
    )
    split.to_csv(tmp_path / "split.csv", index=False)
    args = [
        f"data.metadata_csv={csv}",
        f"data.split_csv={tmp_path / 'split.csv'}",
        f"data.expression_file={h5ad}",
        f"data.genes={tmp_path / 'list.txt'}",
        "data.allow_unmeasured_genes=true",
        f"logging.output_dir={tmp_path / 'runs'}",
        "logging.run_name=masked",
        "train.epochs=1",
    ]
    command = [sys.executable, str(REPO / "run_regression.py"), str(REPO / "recipes" / "tiny.yaml"), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "masked" / "metrics.json").read_text())
    assert np.isfinite(metrics["history"][0]["train_loss"])
    assert metrics["num_test_targets_not_measured"] == 8  # P04's 8 held-out spots never measured ONLY_A
    per_gene = pd.read_csv(tmp_path / "runs" / "masked" / "per_gene_metrics_test.csv").set_index("gene")
    assert np.isnan(per_gene.loc["ONLY_A", "spearman"]) and np.isfinite(per_gene.loc["GENE0", "spearman"])
    assert "num_val_targets_not_measured" not in metrics  # P02 measured all three
    refused = [a for a in command if "allow_unmeasured" not in a and "run_name" not in a] + ["logging.run_name=no"]
    result = subprocess.run(refused, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "sample P04 (held-out rows) did not measure ONLY_A" in result.stderr
    assert not (tmp_path / "runs" / "no").exists()


# ------------------------------------------------------------------------ the records in expression.h5ad


def test_a_12000_gene_record_and_unknown_items_are_never_dropped_silently(tmp_path, caplog):
    names = [f"G{i:05d}" for i in range(12_050)]
    obs = pd.DataFrame({"sample_id": ["WTA", "PANEL"]}, index=["a", "b"])
    uns = {"genes_not_measured": {"WTA": [], "PANEL": names[50:]}}
    write_h5ad(tmp_path / "e.h5ad", sp.csr_matrix((2, len(names))), obs, names, uns=uns)
    back = read_h5ad(tmp_path / "e.h5ad")
    assert list(back.uns["genes_not_measured"]["PANEL"]) == names[50:]
    assert len(back.uns["genes_not_measured"]["WTA"]) == 0
    import h5py

    with h5py.File(tmp_path / "e.h5ad", "a") as f:
        f["uns"].create_dataset("pairs", data=np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]))
    assert read_h5ad(tmp_path / "e.h5ad").uns["pairs"].dtype.names == ("a", "b")  # read, not dropped
    tables = read_h5ad_tables(tmp_path / "e.h5ad")  # what gene choice reads: the counts stay on disk
    assert tables.X is None and tables.shape == (2, len(names)) and tables.uns["pairs"].dtype.names == ("a", "b")
    with h5py.File(tmp_path / "e.h5ad", "a") as f:
        f["uns"].create_group("odd").attrs["encoding-type"] = "awkward-array"
    with caplog.at_level("WARNING", logger="expreg"):
        tables = read_h5ad_tables(tmp_path / "e.h5ad")  # read item by item, the unreadable one named
    assert (
        "pairs" in tables.uns
        and "odd" not in tables.uns
        and "left out what anndata cannot read: uns/odd" in caplog.text
    )
    with h5py.File(tmp_path / "e.h5ad", "a") as f:
        f["obs"].attrs["column-order"] = ["sample_id", "odd"]
        f["obs"].create_group("odd").attrs["encoding-type"] = "awkward-array"
    with pytest.raises(H5adError, match=r"e.h5ad: unreadable .h5ad .*awkward-array"):
        read_h5ad(tmp_path / "e.h5ad")  # an encoding anndata cannot read stops with the file named


HEADER = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"


def _sample(root: Path, name: str, ids: list[str], symbols: list[str], counts: np.ndarray) -> Path:
    """A Space Ranger folder: 20 spots on a square lattice 40 px apart, given features and counts."""
    outs = root / name / "outs"
    (outs / "spatial").mkdir(parents=True)
    barcodes = [f"{name}s{k}" for k in range(len(counts))]
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", sp.csr_matrix(counts), barcodes, symbols)
    import h5py

    with h5py.File(outs / "filtered_feature_bc_matrix.h5", "a") as f:
        del f["matrix/features/id"]
        f["matrix/features"].create_dataset("id", data=np.array([i.encode() for i in ids]))
    rows = [f"{b},1,{k // 5},{k % 5},{40 + 40 * (k // 5)},{40 + 40 * (k % 5)}" for k, b in enumerate(barcodes)]
    (outs / "spatial" / "tissue_positions.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps({"spot_diameter_fullres": 20.0}))
    Image.new("RGB", (240, 200), "white").save(root / name / f"{name}.png")
    return root / name


def test_genes_are_joined_by_feature_id_and_named_alike_in_every_sample(tmp_path):
    from expreg.ingest.prepare import Options, prepare

    # S1's reference names two ids "B" (a repeated symbol); S2's names only the second one "B"
    c1 = np.tile([1, 2, 3], (20, 1))
    c2 = np.tile([10, 30, 40], (20, 1))
    _sample(tmp_path, "S1", ["E1", "E2", "E3"], ["A", "B", "B"], c1)
    _sample(tmp_path, "S2", ["E1", "E3", "E4"], ["A", "B", "C"], c2)
    sheet = tmp_path / "s.csv"
    sheet.write_text("sample_id,group_id,path,spot_pitch_um\nS1,P1,S1,40\nS2,P2,S2,40\n")
    summary = prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=16))
    table = read_h5ad(tmp_path / "out" / "expression.h5ad")
    assert list(table.var_names) == ["A", "B", "B-1", "C"]
    assert list(table.var["gene_ids"]) == ["E1", "E2", "E3", "E4"] and list(table.var["gene_symbols"]) == [
        "A",
        "B",
        "B",
        "C",
    ]
    x = table.X.toarray()
    np.testing.assert_array_equal(x[:20], np.tile([1, 2, 3, 0], (20, 1)))
    np.testing.assert_array_equal(x[20:], np.tile([10, 0, 30, 40], (20, 1)))  # S2's "B" is E3, S1's "B-1"
    assert {s: list(g) for s, g in table.uns["genes_not_measured"].items()} == {"S1": ["C"], "S2": ["B"]}
    assert table.uns["genes_joined_by"].startswith("feature id") and summary["genes_joined_by"].startswith(
        "feature id"
    )
    assert "1 symbol(s) name several feature ids" in summary["gene_join_notes"][0]
    record = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert record["genes_joined_by"] == summary["genes_joined_by"]


def test_ids_join_across_versions_and_ids_that_join_nothing_are_said(tmp_path, caplog):
    from expreg.ingest.prepare import Options, prepare

    counts = np.tile([1, 2], (20, 1))
    _sample(tmp_path, "S1", ["ENSG00000141510.17", "ENSG00000111640.15"], ["TP53", "GAPDH"], counts)
    _sample(tmp_path, "S2", ["ENSG00000141510.18", "ENSG00000111640"], ["TP53", "GAPDH"], counts)  # other versions
    _sample(tmp_path, "S3", ["tp53", "gapdh"], ["TP53", "GAPDH"], counts)  # names in the id column
    sheet = tmp_path / "s.csv"
    sheet.write_text("sample_id,group_id,path,spot_pitch_um\nS1,P1,S1,40\nS2,P2,S2,40\n")
    prepare(sheet, tmp_path / "two", Options(patch_um=16, patch_px=16))
    table = read_h5ad(tmp_path / "two" / "expression.h5ad")
    assert list(table.var_names) == ["TP53", "GAPDH"]
    assert {s: list(g) for s, g in table.uns["genes_not_measured"].items()} == {"S1": [], "S2": []}
    assert list(table.var["gene_ids"]) == ["ENSG00000141510.17", "ENSG00000111640.15"]  # as the first sample has them
    sheet.write_text("sample_id,group_id,path,spot_pitch_um\nS1,P1,S1,40\nS3,P2,S3,40\n")
    with caplog.at_level("WARNING", logger="expreg"):
        summary = prepare(sheet, tmp_path / "three", Options(patch_um=16, patch_px=16))
    notes = " | ".join(summary["gene_join_notes"])
    assert "the feature ids join 0 genes across samples where the names would join 2" in notes
    assert "different id namespaces" in caplog.text


def test_cv_leaves_hests_probe_out_of_the_default_methods_when_targets_may_be_masked(tmp_path):
    from expreg.config import load_recipe
    from expreg.evaluation.cv import check_config, parse_methods

    masked = load_recipe(None, ["data.expression_file=e.h5ad", "data.genes=hvg:5", "data.allow_unmeasured_genes=true"])
    assert parse_methods("finetune,linear_probe", hest_probe=False) == ["finetune", "linear_probe"]
    assert parse_methods("linear_probe") == ["linear_probe", "linear_probe_hest"]
    check_config(masked, ["finetune", "linear_probe", "ridge"])
    with pytest.raises(ConfigError, match="HEST-Benchmark's probe fits every gene on every row"):
        check_config(masked, ["linear_probe_hest"])
    from expreg.cv import main as cv_main

    code = cv_main(
        [str(REPO / "recipes" / "tiny.yaml"), "--methods", "linear_probe_hest", "--out_dir", str(tmp_path / "x")]
        + ["data.expression_file=e.h5ad", "data.genes=hvg:5", "data.allow_unmeasured_genes=true"]
    )
    assert code == 2 and not (tmp_path / "x").exists()


def test_the_library_size_is_the_spots_total_over_every_gene_it_measured(make_dataset):
    csv, h5ad = _panels(make_dataset)
    metadata = read_metadata(csv, targets_required=False)
    table = expression_targets(
        metadata, h5ad, np.ones(len(metadata.frame), bool), "var:2", min_detection=0.1, transform="log1p"
    )[0]
    counts = read_h5ad(h5ad).X.toarray()  # rows in the same order (written from the same frame)
    np.testing.assert_array_equal(table.frame["library_size"].to_numpy(), counts.sum(axis=1))  # not the 2 chosen


def test_genes_json_gives_each_genes_detection_and_its_spearman_with_depth(make_dataset, caplog):
    from scipy import stats

    from expreg.data.expression import _gene_stats

    csv, h5ad = _panels(make_dataset)
    metadata = read_metadata(csv, targets_required=False)
    train = metadata.frame["group_id"].isin(["P00", "P01", "P02", "P03"]).to_numpy()
    table, choice = expression_targets(metadata, h5ad, train, "var:2", min_detection=0.1, transform="log1p")
    counts = read_h5ad(h5ad).X.toarray()[train]
    for k, gene in enumerate(choice.genes):
        column = read_h5ad(h5ad).var_names.get_loc(gene)
        record = choice.record()["per_gene_on_training_spots"][gene]
        assert record["detection"] == pytest.approx((counts[:, column] > 0).mean())
        expected = stats.spearmanr(table.targets()[train, k], counts.sum(axis=1))[0]
        assert record["spearman_with_library_size"] == pytest.approx(expected, abs=1e-9)
    rare = sp.csr_matrix(np.eye(10, 4) * 5 + np.eye(10, 4, -4) * 3)  # each gene detected in 2 of 10 spots
    with caplog.at_level("WARNING", logger="expreg"):
        _gene_stats(np.asarray(rare.sum(axis=1)).ravel(), np.log1p(rare.toarray()), ["A", "B", "C", "D"])
    assert "detected in a median 20 % of the training spots" in caplog.text


def test_svg_reads_positions_and_sections_from_the_expression_file(make_dataset):
    csv, h5ad = _panels(make_dataset)
    metadata = read_metadata(csv, targets_required=False)
    train = metadata.frame["group_id"].isin(["P00", "P01", "P02", "P03"]).to_numpy()
    table, choice = expression_targets(metadata, h5ad, train, "svg:3", min_detection=0.1, transform="log1p")
    assert len(choice.genes) == 3 and not {"ONLY_A", "ONLY_B"} & set(choice.genes)  # unmeasured: never eligible
    assert "3 genes by svg:3 on" in choice.describe() and table.targets().shape[1] == 3

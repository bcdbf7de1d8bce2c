"""HEST-Benchmark parity: HEST's own probe beside expreg's, and expreg.cv on a HEST-Benchmark task folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from expreg.cv import main as cv_main
from expreg.data.h5ad import write_h5ad
from expreg.evaluation.hest_probe import hest_alpha, hest_linear_probe
from expreg.ingest.hest_bench import materialise_task, read_task, sample_targets

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "tiny.yaml")
GENES = ["GENE_A", "GENE_B", "GENE_C", "GENE_D", "GENE_E", "GENE_F"]
SAMPLES = {"S1": 24, "S2": 20, "S3": 28}  # patches per sample
TESTS = [["S1", "S2"], ["S3"]]  # test_0.csv, test_1.csv


def _write_sample(root: Path, sid: str, n: int, rng) -> dict:
    """``patches/<sid>.h5`` and ``adata/<sid>.h5ad``; returns each patch barcode's raw counts of GENES."""
    z = rng.normal(size=n)
    pixels = np.clip(150 + 40 * z[:, None, None, None] + rng.normal(0, 10, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    barcodes = [f"{sid}-bc{i:03d}" for i in range(n)]
    with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
        f["img"] = pixels
        f["barcode"] = np.array([[b.encode()] for b in barcodes])  # HEST stores N x 1 bytes
        f["coords"] = rng.integers(0, 5000, size=(n, 2))
    var = ["OTHER1", *GENES[::-1], "OTHER2"]  # not in the gene list's order
    counts = rng.poisson(np.exp(1.0 + 0.8 * z[:, None] * rng.normal(size=len(var)))).astype(np.float32)
    extra = rng.poisson(2.0, size=(5, len(var))).astype(np.float32)  # spots without a patch
    order = rng.permutation(n + 5)  # the h5ad's rows in another order than the patches
    obs_names = np.array(barcodes + [f"{sid}-nopatch{i}" for i in range(5)])[order]
    X = np.vstack([counts, extra])[order]
    write_h5ad(root / "adata" / f"{sid}.h5ad", sp.csr_matrix(X), pd.DataFrame(index=obs_names), var)
    return {b: counts[i, [var.index(g) for g in GENES]] for i, b in enumerate(barcodes)}


@pytest.fixture
def hest_task(tmp_path):
    """A tiny HEST-Benchmark task folder (3 samples, 2 folds, 6 genes); returns (folder, raw counts by barcode)."""
    root = tmp_path / "bench_data" / "TOY"
    for sub in ("splits", "patches", "adata"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    counts = {}
    for sid, n in SAMPLES.items():
        counts.update(_write_sample(root, sid, n, rng))
    for i, test in enumerate(TESTS):
        for kind, ids in (("train", [s for s in SAMPLES if s not in test]), ("test", test)):
            rows = [{"sample_id": s, "patches_path": f"patches/{s}.h5", "expr_path": f"adata/{s}.h5ad"} for s in ids]
            pd.DataFrame(rows).to_csv(root / "splits" / f"{kind}_{i}.csv", index=False)
    (root / "var_50genes.json").write_text(json.dumps({"genes": GENES}))
    return root, counts


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EXPREG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hest_tasks"


def test_hest_probe_is_hests_sklearn_pipeline():
    """The probe equals HEST-Benchmark's code run on the same arrays (benchmark.py + trainer.py)."""
    import torch
    from scipy.stats import pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from expreg.evaluation.metrics import compute_metrics

    rng = np.random.default_rng(0)
    emb = (rng.normal(size=(340, 300)) * rng.uniform(0.5, 3, size=300)).astype(np.float32)
    y = np.log1p(rng.poisson(np.exp(1 + 0.3 * emb[:, :5] @ rng.normal(size=(5, 7)) / 3)))
    groups = np.repeat(np.array(["a", "b", "c", "d"], dtype=object), 75)
    predictions, info = hest_linear_probe(emb[:300], y[:300], groups, emb[300:], seed=1)
    # HEST-Benchmark, step by step
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=256, random_state=1))])
    x_train, x_test = torch.Tensor(pipe.fit_transform(emb[:300])), torch.Tensor(pipe.transform(emb[300:]))
    alpha = 100 / (x_train.shape[1] * y.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=1, fit_intercept=False, max_iter=1000)
    expected = reg.fit(x_train, y[:300]).predict(x_test)
    np.testing.assert_allclose(predictions, expected, rtol=1e-10, atol=1e-12)
    assert info["alpha"] == alpha == hest_alpha(256, 7) == 100 / (256 * 7) and info["pca_components"] == 256
    assert info["fit_groups"] == ["a", "b", "c", "d"] and info["num_fit_samples"] == 300
    hest_pearson = [pearsonr(y[300:, g], expected[:, g])[0] for g in range(7)]
    np.testing.assert_allclose(compute_metrics(predictions, y[300:]).pearson, hest_pearson, rtol=1e-9)
    # fewer training rows than 256: fewer components (HEST's PCA would stop), alpha follows them
    few, info = hest_linear_probe(emb[:60], y[:60], groups[:60], emb[300:], seed=1)
    assert info["pca_components"] == 60 and info["alpha"] == 100 / (60 * 7) and few.shape == (40, 7)
    with pytest.raises(ValueError, match="at least one feature"):
        hest_alpha(0, 7)


def test_task_reader_makes_hests_targets_and_folds(hest_task):
    root, counts = hest_task
    task = read_task(root)
    assert task.name == "TOY" and sorted(task.samples) == ["S1", "S2", "S3"]
    assert task.test_ids == [["S1", "S2"], ["S3"]]  # the folds are the split files'
    assert [(a.name, b.name) for a, b in task.splits] == [("train_0.csv", "test_0.csv"), ("train_1.csv", "test_1.csv")]
    assert task.group_of("S2") == "S1+S2" and task.fold_of("S3") == 1 and task.genes == GENES
    for sid, n in SAMPLES.items():
        barcodes, targets = sample_targets(task.samples[sid], task.genes)
        assert barcodes == [f"{sid}-bc{i:03d}" for i in range(n)]  # the patch file's order
        expected = np.log1p(np.stack([counts[b] for b in barcodes]).astype(np.float64))
        np.testing.assert_array_equal(targets, expected)  # log1p of the raw counts at those barcodes
        assert targets.dtype == np.float64


def test_materialised_task_is_reused_and_rebuilt_when_inputs_change(hest_task, cache):
    root, counts = hest_task
    first = materialise_task(root, progress=False)
    assert not first.reused and first.folder.parent == cache and first.folder.name.startswith("TOY-")
    meta = pd.read_csv(first.metadata_csv, float_precision="round_trip")  # exact, as expreg reads targets
    assert len(meta) == sum(SAMPLES.values()) and (first.folder / meta["path"].iloc[0]).is_file()
    targets = meta[[f"y{i}" for i in range(len(GENES))]].to_numpy(np.float64)
    expected = np.log1p(np.stack([counts[b] for b in meta["barcode"]]).astype(np.float64))
    np.testing.assert_array_equal(targets, expected)  # the CSV round-trips the float64 values exactly
    assert first.genes_file.read_text().split() == GENES
    stamp = first.metadata_csv.stat().st_mtime_ns
    again = materialise_task(root, progress=False)
    assert again.reused and again.folder == first.folder and first.metadata_csv.stat().st_mtime_ns == stamp
    (root / "var_50genes.json").write_text(json.dumps({"genes": GENES[:4]}))
    changed = materialise_task(root, progress=False)
    assert (
        not changed.reused and changed.folder != first.folder and changed.genes_file.read_text().split() == GENES[:4]
    )
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.folder.name, changed.folder.name])  # no leftovers


def test_a_task_file_rewritten_at_the_same_size_is_materialised_again(hest_task, cache):
    root, _ = hest_task
    first = materialise_task(root, progress=False)
    patches = root / "patches" / "S1.h5"
    size, mtime = patches.stat().st_size, patches.stat().st_mtime_ns
    with h5py.File(patches, "r+") as f:  # new pixels written in place: the same number of bytes
        new_pixels = 255 - f["img"][...]
        f["img"][...] = new_pixels
    os.utime(patches, ns=(mtime + 5_000_000_000, mtime + 5_000_000_000))
    assert patches.stat().st_size == size and patches.stat().st_mtime_ns != mtime
    again = materialise_task(root, progress=False)
    assert not again.reused and again.folder != first.folder  # a new build, not the old folder
    paths = pd.read_csv(again.metadata_csv).query("sample_id == 'S1'")["path"].tolist()
    assert len(paths) == SAMPLES["S1"]
    for row in (0, 3):
        with Image.open(again.folder / paths[row]) as image:
            np.testing.assert_array_equal(np.asarray(image), new_pixels[row])  # the patches as they are now


def _cv(root: Path, out: Path, *extra: str) -> int:
    return cv_main([RECIPE, "--hest_task", str(root), "--out_dir", str(out), *extra])


def test_cv_on_a_hest_task_uses_its_folds_targets_and_both_probes(hest_task, cache, tmp_path, capsys):
    from expreg.evaluation.baselines import embed_images
    from expreg.evaluation.metrics import compute_metrics
    from expreg.seeding import seed_everything

    root, _ = hest_task
    out = tmp_path / "cv"
    assert _cv(root, out, "--methods", "linear_probe,ridge,mean") == 0
    printed = capsys.readouterr().out
    assert "HEST-Benchmark chose them on all of the task's samples, the held-out ones included" in printed
    folds = pd.read_csv(out / "folds.csv")
    folder = next(cache.iterdir())
    meta = pd.read_csv(folder / "metadata.csv", float_precision="round_trip")  # exact, as expreg reads them
    by_path = meta.set_index("path")
    assert sorted(set(by_path.loc[folds.loc[folds["fold"] == 0, "path"], "sample_id"])) == ["S1", "S2"]
    assert set(by_path.loc[folds.loc[folds["fold"] == 1, "path"], "sample_id"]) == {"S3"}
    assert set(folds["group_id"]) == {"S1+S2", "S3"}
    summary = json.loads((out / "cv_summary.json").read_text())
    assert list(summary["methods"]) == ["linear_probe", "linear_probe_hest", "ridge", "mean"]
    hest, ours = summary["methods"]["linear_probe_hest"], summary["methods"]["linear_probe"]
    # HEST's probe, recomputed here on the same embeddings and the same folds
    seed_everything(0)
    files = [str(folder / p) for p in meta["path"]]
    emb = embed_images(files, "test_resnet", 32)
    y = meta[[f"y{i}" for i in range(len(GENES))]].to_numpy(np.float64)
    for k, fold in enumerate(hest["folds"]):
        test = (folds.set_index("path").loc[meta["path"], "fold"] == k).to_numpy()
        assert fold["test_groups"] == ["+".join(TESTS[k])] and fold["num_test_samples"] == test.sum()
        assert fold["fit_groups"] == ["+".join(TESTS[1 - k])] and fold["num_fit_samples"] == (~test).sum()
        predictions, info = hest_linear_probe(emb[~test], y[~test], meta["group_id"][~test], emb[test], seed=0)
        m = compute_metrics(predictions, y[test])
        assert fold["pearson_mean"] == pytest.approx(m.pearson_mean, abs=1e-6)
        assert fold["spearman_mean"] == pytest.approx(m.spearman_mean, abs=1e-6)
        assert fold["alpha"] == 100 / (fold["pca_components"] * len(GENES)) and fold["pca_components"] < 256
        assert ours["folds"][k]["test_groups"] == fold["test_groups"]  # beside expreg's probe, same folds
    assert hest["pearson_mean"] is not None and hest["pearson_std_ddof0"] >= 0
    assert summary["hest_task"]["genes"] == GENES and "log1p" in summary["hest_task"]["targets"]
    markdown = (out / "cv_summary.md").read_text()
    assert "**Gene leak:**" in markdown and "held-out ones included" in markdown
    assert "| linear_probe_hest | 0 | S1+S2 |" in markdown and "PCA kept fewer than 256 components" in markdown
    assert f"`linear_probe_hest` {hest['pearson_mean']:.4f} vs `linear_probe` {ours['pearson_mean']:.4f}" in markdown


@pytest.mark.slow
def test_cv_finetunes_on_a_hest_task_reusing_the_materialised_folder(hest_task, cache, tmp_path, capsys):
    root, _ = hest_task
    assert _cv(root, tmp_path / "a", "--methods", "mean") == 0
    folder = next(cache.iterdir())
    stamp = (folder / "metadata.csv").stat().st_mtime_ns
    assert f"built {folder}" in capsys.readouterr().out
    assert _cv(root, tmp_path / "b", "--methods", "finetune,mean", "train.epochs=1") == 0
    assert f"reusing {folder}" in capsys.readouterr().out
    assert list(cache.iterdir()) == [folder] and (folder / "metadata.csv").stat().st_mtime_ns == stamp
    summary = json.loads((tmp_path / "b" / "cv_summary.json").read_text())
    for fold in summary["methods"]["finetune"]["folds"]:  # trained on the other test split's samples only
        run = tmp_path / "b" / "runs" / f"finetune__fold{fold['fold']}"
        assert fold["test_groups"] == ["+".join(TESTS[fold["fold"]])]
        assert fold["fit_groups"] == ["+".join(TESTS[1 - fold["fold"]])]
        assert sorted(set(pd.read_csv(run / "predictions_test.csv")["group_id"])) == fold["test_groups"]


def _drop_splits(root: Path) -> str:
    for path in (root / "splits").iterdir():
        path.unlink()
    (root / "splits").rmdir()
    return "not a HEST-Benchmark task folder"


def _lose_test_split(root: Path) -> str:
    (root / "splits" / "test_1.csv").unlink()
    return "test_1.csv: missing"


def _lose_patch_file(root: Path) -> str:
    (root / "patches" / "S3.h5").unlink()
    return "train_0.csv: line 2, column 'patches_path'"


def _unknown_gene(root: Path) -> str:
    (root / "var_50genes.json").write_text(json.dumps({"genes": [*GENES, "NOT_A_GENE"]}))
    return "var_50genes.json: gene(s) NOT_A_GENE not in the var of"


def _patch_without_counts(root: Path) -> str:
    with h5py.File(root / "patches" / "S2.h5", "a") as f:
        f["barcode"][0] = [b"stranger"]
    return "S2.h5: 1 of 20 barcodes are not in"


def _overlapping_tests(root: Path) -> str:
    rows = pd.read_csv(root / "splits" / "test_0.csv")
    pd.concat([pd.read_csv(root / "splits" / "test_1.csv"), rows.iloc[:1]]).to_csv(
        root / "splits" / "test_1.csv", index=False
    )
    return "test splits share sample(s) S1"


def _no_sample_column(root: Path) -> str:
    pd.read_csv(root / "splits" / "train_1.csv").drop(columns="sample_id").to_csv(
        root / "splits" / "train_1.csv", index=False
    )
    return "train_1.csv: missing column(s) sample_id"


@pytest.mark.parametrize(
    "damage",
    [
        _drop_splits,
        _lose_test_split,
        _lose_patch_file,
        _unknown_gene,
        _patch_without_counts,
        _overlapping_tests,
        _no_sample_column,
    ],
)
def test_a_bad_task_folder_exits_2_naming_the_file(hest_task, cache, tmp_path, capsys, damage):
    root, _ = hest_task
    expected = damage(root)
    assert _cv(root, tmp_path / "cv", "--methods", "mean") == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "cv").exists() and not (cache.exists() and any(cache.iterdir()))  # nothing half-written


def test_hest_task_refuses_its_own_fold_count_and_expression_targets(hest_task, tmp_path, capsys):
    root, _ = hest_task
    assert _cv(root, tmp_path / "cv", "--n_folds", "2") == 2
    assert "a HEST-Benchmark task brings its own folds" in capsys.readouterr().err
    assert _cv(root, tmp_path / "cv", "data.expression_file=x.h5ad", "data.genes=hvg:5") == 2
    assert "the task gives the targets" in capsys.readouterr().err
    assert not (tmp_path / "cv").exists()

"""Cross-validation and baselines: same folds for every method, leakage-free, one summary."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from expreg.cv import main as cv_main
from expreg.evaluation.baselines import (
    choose_alpha,
    extract_features,
    fit_ridge,
    mean_baseline,
    patch_features,
    ridge_baseline,
)

REPO = Path(__file__).resolve().parent.parent


def test_patch_features_see_colour_and_texture():
    rng = np.random.default_rng(0)
    pink = Image.new("RGB", (64, 64), (236, 170, 200))
    purple = Image.new("RGB", (64, 64), (120, 70, 160))
    noisy = Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8))
    f_pink, f_purple, f_noisy = (patch_features(i) for i in (pink, purple, noisy))
    assert f_pink.shape == (62,) and np.isfinite(f_pink).all()
    assert not np.allclose(f_pink, f_purple)  # colour
    assert f_noisy[40] > f_pink[40] + 0.01  # Laplacian variance: texture


def test_ridge_recovers_a_linear_signal_and_chooses_alpha_on_training_groups_only():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 10))
    y = x[:, :3] @ rng.normal(size=(3, 4)) + 0.1 * rng.normal(size=(120, 4))
    groups = np.repeat(np.array([f"g{i}" for i in range(6)], dtype=object), 20)
    w, b = fit_ridge(x, y, 1e-6)
    np.testing.assert_allclose(x @ w + b, y, atol=0.5)
    alpha = choose_alpha(x[:100], y[:100], groups[:100])
    assert alpha <= 10.0  # little regularisation wins on clean linear data
    predictions, info = ridge_baseline(x[:100], y[:100], groups[:100], x[100:])
    assert info["alpha"] == alpha and predictions.shape == (20, 4)
    assert np.corrcoef(predictions[:, 0], y[100:, 0])[0, 1] > 0.9
    np.testing.assert_allclose(mean_baseline(y[:100], 3), np.repeat(y[:100].mean(0, keepdims=True), 3, axis=0))


def test_unreadable_image_in_features_is_named(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    from expreg.data import UnreadableImageError

    with pytest.raises(UnreadableImageError, match="bad.png: cannot read the image"):
        extract_features([str(bad)])


def test_cross_validation_runs_every_method_on_the_same_group_folds(make_dataset, tmp_path, capsys):
    csv = make_dataset(num_groups=4, samples_per_group=10)
    out = tmp_path / "cv"
    code = cv_main(
        [
            str(REPO / "recipes" / "tiny.yaml"),
            f"data.metadata_csv={csv}",
            "train.epochs=1",
            "logging.report_to=tensorboard",
            "--n_folds",
            "2",
            "--out_dir",
            str(out),
        ]
    )
    assert code == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for k in (0, 1):  # each fold's curves in its own run, none in another fold's
        values = []
        for event_file in (out / "runs" / f"finetune__fold{k}" / "tensorboard").rglob("events.out.tfevents.*"):
            acc = EventAccumulator(str(event_file))
            acc.Reload()
            if "val_spearman_mean" in acc.Tags()["scalars"]:
                values += [e.value for e in acc.Scalars("val_spearman_mean")]
        history = json.loads((out / "runs" / f"finetune__fold{k}" / "metrics.json").read_text())["history"]
        assert values == pytest.approx([h["val_spearman_mean"] for h in history], abs=1e-6)
    folds = pd.read_csv(out / "folds.csv")
    assert folds.groupby("group_id")["fold"].nunique().max() == 1 and set(folds["fold"]) == {0, 1}
    summary = json.loads((out / "cv_summary.json").read_text())
    assert list(summary["methods"]) == ["finetune", "linear_probe", "linear_probe_hest", "ridge", "mean"]
    assert summary["methods"]["linear_probe"]["folds"][0]["pca_components"] <= 256
    hest = summary["methods"]["linear_probe_hest"]  # HEST-Benchmark's probe beside ours, same folds
    for f in hest["folds"]:  # about 20 training rows < 256: PCA keeps one per row, alpha follows HEST's formula
        assert f["pca_components"] == f["num_fit_samples"] < 256 and f["alpha"] == 100 / (f["pca_components"] * 50)
    assert hest["pearson_std_ddof0"] == pytest.approx(np.std([f["pearson_mean"] for f in hest["folds"]]))
    for m in summary["methods"].values():
        assert [f["fold"] for f in m["folds"]] == [0, 1]
        for f in m["folds"]:  # the same held-out groups for every method
            held_out = sorted(folds.loc[folds["fold"] == f["fold"], "group_id"].unique())
            assert f["test_groups"] == held_out and f["num_test_samples"] == int((folds["fold"] == f["fold"]).sum())
        assert len(m["per_gene_spearman_mean"]) == 50
    assert summary["methods"]["mean"]["spearman_mean"] is None  # undefined, reported as such
    assert summary["methods"]["mean"]["folds"][0]["num_genes_undefined_spearman"] == 50
    meta = pd.read_csv(csv)
    all_groups = set(meta["group_id"])
    for method, m in summary["methods"].items():  # no method is ever fitted on its held-out groups
        for f in m["folds"]:
            assert f["fit_groups"] and not set(f["fit_groups"]) & set(f["test_groups"]), (method, f["fold"])
            if method == "finetune":  # training + validation: the other folds' groups
                assert set(f["fit_groups"]) <= all_groups - set(f["test_groups"])
            else:
                assert set(f["fit_groups"]) == all_groups - set(f["test_groups"])
                assert f["num_fit_samples"] == int((~meta["group_id"].isin(f["test_groups"])).sum())
    for k in (0, 1):  # the fold run's target statistics come from its training rows only
        run = out / "runs" / f"finetune__fold{k}"
        used = json.loads((run / "split_summary.json").read_text())
        train_rows = meta[meta["group_id"].isin(used["train"]["groups"])]
        assert len(train_rows) == used["train"]["samples"]
        expected = train_rows[[f"y{i}" for i in range(50)]].to_numpy(dtype=np.float64)
        stats = json.loads((run / "target_stats.json").read_text())
        np.testing.assert_allclose(stats["mean"], expected.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats["std"], expected.std(0), rtol=1e-6, atol=1e-9)
    ridge = summary["methods"]["ridge"]
    assert ridge["spearman_mean"] > 0.3  # the planted colour/texture signal
    for k in (0, 1):  # the fine-tuning run never saw its test fold, and selected its epoch on other groups
        run = out / "runs" / f"finetune__fold{k}"
        split = pd.read_csv(run / "predictions_val.csv")
        assert not set(split["group_id"]) & set(folds.loc[folds["fold"] == k, "group_id"])
    markdown = (out / "cv_summary.md").read_text()
    assert "| ridge | 0 |" in markdown and "| finetune |" in markdown and "±" in markdown
    assert "| linear_probe_hest | 0 |" in markdown and "`linear_probe_hest` is HEST-Benchmark's own probe" in markdown
    assert "undefined" in markdown and "Test-time augmentation" in markdown
    finetune = summary["methods"]["finetune"]
    tta = [f["tta_spearman_mean"] for f in finetune["folds"]]
    assert all(-1 <= v <= 1 for v in tta)  # (TTA itself: test_predict_tta_averages_the_eight_views_of_each_image)
    assert f"mean Spearman {np.mean(tta):.4f} vs {finetune['spearman_mean']:.4f} without" in markdown
    assert cv_main([str(REPO / "recipes" / "tiny.yaml"), f"data.metadata_csv={csv}", "--out_dir", str(out)]) == 2
    assert "never overwritten" in capsys.readouterr().err


def test_the_linear_probe_brings_hests_probe_along():
    from expreg.config import ConfigError
    from expreg.evaluation.cv import parse_methods

    assert parse_methods("ridge,linear_probe,mean") == ["ridge", "linear_probe", "linear_probe_hest", "mean"]
    assert parse_methods("linear_probe_hest, mean") == ["linear_probe_hest", "mean"]
    assert parse_methods("linear_probe,linear_probe") == ["linear_probe", "linear_probe_hest"]
    with pytest.raises(ConfigError, match="unknown probe"):
        parse_methods("probe")


def test_single_training_group_validates_on_its_own_samples(make_dataset, tmp_path):
    from expreg.data.dataset import load_expression_dataset
    from expreg.splits import main as splits_main

    csv = make_dataset(num_groups=2, samples_per_group=10)
    folds = tmp_path / "folds.csv"
    assert splits_main(["--metadata_csv", str(csv), "--out_csv", str(folds), "--n_folds", "2"]) == 0
    ds = load_expression_dataset(csv, folds, fold=0)
    test_group = set(ds["test"]["group_id"])
    assert len(test_group) == 1
    assert set(ds["train"]["group_id"]) == set(ds["validation"]["group_id"]) != test_group
    assert not set(ds["train"]["path"]) & set(ds["validation"]["path"])
    again = load_expression_dataset(csv, folds, fold=0)
    assert sorted(again["validation"]["path"]) == sorted(ds["validation"]["path"])  # seeded


def test_linear_probe_fits_pca_and_ridge_on_training_rows(tmp_path):
    from expreg.evaluation.baselines import embed_images, linear_probe

    rng = np.random.default_rng(2)
    emb = rng.normal(size=(80, 300))
    y = emb[:, :5] @ rng.normal(size=(5, 3))
    groups = np.repeat(np.array(["a", "b", "c", "d"], dtype=object), 20)
    predictions, info = linear_probe(emb[:60], y[:60], groups[:60], emb[60:])
    assert info["pca_components"] == 59  # fewer samples than 256: n_train - 1
    assert predictions.shape == (20, 3)
    paths = []
    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 100, 150)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    features = embed_images(paths, "test_resnet", 32)
    assert features.shape[0] == 3 and features.shape[1] > 8 and np.isfinite(features).all()


def test_tta_averages_the_eight_dihedral_views():
    import torch

    from expreg.modeling.model import ExpRegOutput
    from expreg.predict import dihedral_views, forward_tta

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = dihedral_views(x)
    assert len(views) == 8 and torch.equal(views[0], x)
    assert len({v.numpy().tobytes() for v in views}) == 8  # all distinct

    class Corner(torch.nn.Module):  # "predicts" the top-left pixel of each channel
        def forward(self, pixel_values):
            return ExpRegOutput(predictions=pixel_values[:, :, 0, 0])

    expected = torch.stack([v[:, :, 0, 0] for v in views]).mean(0)
    torch.testing.assert_close(forward_tta(Corner(), x, True), expected)
    torch.testing.assert_close(forward_tta(Corner(), x, False), x[:, :, 0, 0])


def test_linear_probe_affine_equals_the_step_by_step_pipeline():
    from expreg.evaluation.baselines import _standardise, choose_alpha, linear_probe_affine

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(50, 20)) * rng.uniform(0.5, 3, size=20) + 4
    y = emb[:, :2] @ rng.normal(size=(2, 3))
    groups = np.repeat(np.array(["a", "b", "c", "d", "e"], dtype=object), 10)
    weights, bias, info = linear_probe_affine(emb[:40], y[:40], groups[:40], max_components=8)
    z_train, z_test = _standardise(emb[:40], emb[40:])
    centre = z_train.mean(0)
    basis = np.linalg.svd(z_train - centre, full_matrices=False)[2][:8].T
    p_train, p_test = (z_train - centre) @ basis, (z_test - centre) @ basis
    assert info["alpha"] == choose_alpha(p_train, y[:40], groups[:40])
    s_train, s_test = _standardise(p_train, p_test)
    w, b = fit_ridge(s_train, y[:40], info["alpha"])
    np.testing.assert_allclose(emb[40:] @ weights + bias, s_test @ w + b, rtol=1e-8, atol=1e-8)


def test_linear_probe_mode_trains_a_usable_model(make_dataset, tmp_path):
    import subprocess
    import sys

    from expreg.modeling.model import ExpRegModel

    csv = make_dataset(num_groups=5, samples_per_group=10)
    cmd = [
        sys.executable,
        str(REPO / "run_regression.py"),
        str(REPO / "recipes" / "tiny.yaml"),
        f"data.metadata_csv={csv}",
        f"logging.output_dir={tmp_path}",
        "logging.run_name=probe",
        "train.mode=linear_probe",
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "probe"
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "finished" and m["epochs_done"] == 1 and m["history"][0]["step"] == 0
    assert "linear probe:" in (run / "log.txt").read_text()
    model = ExpRegModel.from_pretrained(run / "checkpoints" / "best")  # the probe is the saved head
    assert isinstance(model.head, __import__("torch").nn.Linear)
    assert "linear probe: frozen backbone embeddings" in (run / "checkpoints" / "best" / "README.md").read_text()
    assert len(pd.read_csv(run / "predictions_val.csv")) > 0


def _cv_numbers(summary: dict) -> dict:
    """Every number of a CV summary except the timings."""
    return {
        method: [{k: v for k, v in fold.items() if k != "seconds"} for fold in m["folds"]]
        for method, m in summary["methods"].items()
    }


def test_every_cv_method_gives_identical_numbers_twice(make_dataset, tmp_path):
    """Same recipe, seed and data -> the same numbers (the linear probe's random backbone included)."""
    csv = make_dataset(num_groups=4, samples_per_group=8)
    summaries = []
    for name in ("first", "second"):
        args = [
            str(REPO / "recipes" / "tiny.yaml"),
            "--methods",
            "linear_probe,ridge,mean",
            f"data.metadata_csv={csv}",
        ]
        assert cv_main([*args, "--n_folds", "2", "--out_dir", str(tmp_path / name)]) == 0
        summaries.append(json.loads((tmp_path / name / "cv_summary.json").read_text()))
        __import__("torch").rand(7)  # whatever ran before must not matter
    assert _cv_numbers(summaries[0]) == _cv_numbers(summaries[1])
    assert summaries[0]["methods"]["linear_probe"]["spearman_mean"] is not None


@pytest.mark.slow  # a fine-tuning CV end to end (~20 s)
def test_cv_without_tta_scores_the_folds_without_predicting_them_again(make_dataset, tmp_path, monkeypatch):
    """``--no_tta``: the 8-view score (8 more predictions of every held-out image) is left out, and said nowhere."""
    import expreg.training.folds as folds

    def no_tta(*args, **kwargs):
        raise AssertionError("the TTA score was computed under --no_tta")

    monkeypatch.setattr(folds, "_tta_metrics", no_tta)
    csv = make_dataset(num_groups=4, samples_per_group=6)
    out = tmp_path / "cv"
    args = [str(REPO / "recipes" / "tiny.yaml"), f"data.metadata_csv={csv}", "--methods", "finetune,mean"]
    assert cv_main([*args, "--n_folds", "2", "--no_tta", "train.epochs=1", "--out_dir", str(out)]) == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    assert [f["fold"] for f in summary["methods"]["finetune"]["folds"]] == [0, 1]
    assert all(
        "tta_spearman_mean" not in f and f["spearman_mean"] is not None
        for f in summary["methods"]["finetune"]["folds"]
    )
    assert "Test-time augmentation" not in (out / "cv_summary.md").read_text()


@pytest.mark.slow  # end to end (~25-50 s): moved out of the default run to keep it under 10 min
def test_cv_folds_train_like_run_regression_and_report_held_out_scores(make_dataset, tmp_path):
    """Accumulation and precision reach the fold runs; their metrics.json carries cv_summary's held-out scores."""
    import subprocess
    import sys

    import torch
    import yaml

    from expreg.data import ImageTransform
    from expreg.evaluation.metrics import compute_metrics
    from expreg.modeling.model import ExpRegModel

    csv = make_dataset(num_groups=4, samples_per_group=10)
    out = tmp_path / "cv"
    cmd = [sys.executable, "-m", "expreg.cv", str(REPO / "recipes" / "tiny.yaml"), "--n_folds", "2"]
    cmd += [f"data.metadata_csv={csv}", "--methods", "finetune,mean", "train.grad_accum_steps=3"]
    cmd += ["train.mixed_precision=bf16", "--out_dir", str(out)]  # options and overrides mixed freely
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "cv_summary.json").read_text())
    for fold in summary["methods"]["finetune"]["folds"]:
        run = out / "runs" / f"finetune__fold{fold['fold']}"
        cfg = yaml.safe_load((run / "config_resolved.yaml").read_text())
        assert cfg["train"]["mixed_precision"] == "bf16" and cfg["train"]["grad_accum_steps"] == 3
        state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
        val_rows = len(pd.read_csv(run / "predictions_val.csv"))
        folds = pd.read_csv(out / "folds.csv")
        n_train = int((folds["fold"] != fold["fold"]).sum()) - val_rows
        steps_per_epoch = math.ceil(math.ceil(n_train / 8) / 3)  # batches of 8, accumulation 3
        assert state["global_step"] == 2 * steps_per_epoch  # 2 epochs of optimizer steps, not of batches
        assert state["scheduler"]["last_epoch"] == state["global_step"]  # the schedule ended where it should
        m = json.loads((run / "metrics.json").read_text())
        log = (run / "log.txt").read_text()
        assert f"{2 * steps_per_epoch} optimizer steps in all" in log and "mixed_precision=bf16" in log
        # the held-out fold, scored once by the run with its best model: the numbers cv_summary reports
        assert m["test_spearman_mean"] == fold["spearman_mean"] and m["test_pearson_mean"] == fold["pearson_mean"]
        assert m["num_test_samples"] == fold["num_test_samples"] and m["test_groups"] == fold["test_groups"]
        assert fold["best_val_spearman_mean"] == m["best_val_spearman_mean"] != m["test_spearman_mean"]
        per_gene = pd.read_csv(run / "per_gene_metrics_test.csv")
        assert per_gene["spearman"].mean() == pytest.approx(fold["spearman_mean"], abs=1e-5)
        test_rows = pd.read_csv(run / "predictions_test.csv")
        assert sorted(set(test_rows["group_id"])) == fold["test_groups"]
        # recomputed here: the best model (checkpoints/best) on exactly the rows of the held-out fold
        held_out = folds.loc[folds["fold"] == fold["fold"], "path"]
        assert sorted(test_rows["path"]) == sorted(held_out)
        model = ExpRegModel.from_pretrained(run / "checkpoints" / "best").eval()
        transform = ImageTransform(32, model.config.image_mean, model.config.image_std)
        meta = pd.read_csv(csv).set_index("path").loc[test_rows["path"]]
        with torch.no_grad():
            x = torch.stack([transform(Image.open(csv.parent / p), p) for p in test_rows["path"]])
            mine = model.predict_expression(x).numpy()
        truth = meta[[f"y{i}" for i in range(50)]].to_numpy(dtype=np.float64)
        assert compute_metrics(mine, truth).spearman_mean == pytest.approx(m["test_spearman_mean"], abs=1e-6)
        assert fold["tta_spearman_mean"] != fold["spearman_mean"]  # TTA really averaged other views


def test_linear_probe_is_bounded_on_rank_deficient_embeddings():
    """Dead (constant) and near-constant features, rank below the PCA size: bounded weights and predictions."""
    from expreg.evaluation.baselines import linear_probe_affine

    rng = np.random.default_rng(0)
    n, dim = 80, 300
    latent = rng.normal(size=(n, 12))
    emb = latent @ rng.normal(size=(12, dim))  # rank 12 < PCA size 79
    emb[:, :40] = 0.0  # dead ReLU units
    emb[:, 40:50] = 3.0 + 3e-7 * rng.integers(0, 2, size=(n, 10))  # constant up to float32 rounding
    emb = emb.astype(np.float32).astype(np.float64)  # embeddings come as float32
    assert (emb[:, 40:50].std(0) > 0).all()  # really near-constant, not constant
    y = latent[:, :4] + 0.1 * rng.normal(size=(n, 4))
    groups = np.repeat(np.array(["a", "b", "c", "d"], dtype=object), 20)
    weights, bias, info = linear_probe_affine(emb[:60], y[:60], groups[:60])
    assert info["pca_components"] <= 13  # cut at the numerical rank
    assert np.isfinite(weights).all() and np.abs(weights).max() < 10
    assert np.abs(weights[:50]).max() == 0.0  # constant and near-constant features: zero weight
    test = emb[60:]
    predictions = test @ weights + bias
    nudged = test.copy()
    nudged[0, 45] += 1e-3  # one near-constant feature of one test image
    nudged[1, 100] += 1e-3  # one informative feature
    assert np.abs(nudged @ weights + bias - predictions).max() < 1e-2
    assert np.corrcoef(predictions[:, 0], y[60:, 0])[0, 1] > 0.9  # and it still predicts
    # the degenerate columns change nothing: the same probe as without them
    w_clean, b_clean, _ = linear_probe_affine(emb[:60, 50:], y[:60], groups[:60])
    np.testing.assert_allclose(test[:, 50:] @ w_clean + b_clean, predictions, atol=1e-8)
    # nothing varies (all features constant), or a single training row: the training mean, no NaN
    for x_train, y_train, g in ((np.ones((20, dim)), y[:20], groups[:20]), (emb[:1], y[:1], groups[:1])):
        w, b, info = linear_probe_affine(x_train, y_train, g)
        assert info["pca_components"] == 0 and np.isfinite(w).all() and np.isfinite(b).all()
        np.testing.assert_allclose(test @ w + b, np.repeat(y_train.mean(0, keepdims=True), len(test), 0))


def test_features_in_other_units_are_not_taken_for_constant():
    from expreg.evaluation.baselines import constant_columns

    rng = np.random.default_rng(1)
    x = np.stack([1e4 * rng.normal(size=50), 1e-3 * rng.normal(size=50), np.full(50, 7.0)], axis=1)
    x[:, 2] += 7.0 * 1e-9 * rng.normal(size=50)  # rounding noise on a constant
    assert constant_columns(x).tolist() == [False, False, True]


@pytest.mark.parametrize("method", ["ridge", "linear_probe"])
def test_a_test_rows_prediction_depends_on_nothing_else_held_out(method):
    """No statistic of the held-out rows leaks into a baseline: changing the other test rows changes nothing."""
    from expreg.evaluation.baselines import linear_probe

    fit = {"ridge": ridge_baseline, "linear_probe": linear_probe}[method]
    rng = np.random.default_rng(4)
    x = rng.normal(size=(70, 20))
    y = x[:, :3] @ rng.normal(size=(3, 5)) + 0.2 * rng.normal(size=(70, 5))
    groups = np.repeat(np.array(["a", "b", "c", "d", "e"], dtype=object), 10)
    x_test = rng.normal(size=(20, 20))
    first, info = fit(x[:50], y[:50], groups, x_test, seed=0)
    other = x_test.copy()
    other[1:] = 100 * rng.normal(size=(19, 20)) + 50  # every other held-out row, wildly different
    second, info_again = fit(x[:50], y[:50], groups, other, seed=0)
    np.testing.assert_allclose(first[0], second[0], rtol=1e-12, atol=1e-12)
    assert info == info_again and info["fit_groups"] == ["a", "b", "c", "d", "e"] and info["num_fit_samples"] == 50


def test_cv_stops_cleanly_on_bad_input(make_dataset, tmp_path, capsys):
    csv = make_dataset(num_groups=4, samples_per_group=8)
    recipe = str(REPO / "recipes" / "tiny.yaml")
    args = [recipe, f"data.metadata_csv={csv}", "--n_folds", "2"]
    assert cv_main([*args, "train.stop_after_steps=3", "--out_dir", str(tmp_path / "a")]) == 2
    assert "train.stop_after_steps: every fold of expreg.cv trains to the end" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    victim = pd.read_csv(csv)["path"].iloc[2]
    (csv.parent / victim).write_bytes(b"broken")  # passes the default existence check
    assert cv_main([*args, "--methods", "ridge", "--out_dir", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert f"{victim}: cannot read the image" in err and "no cv_summary.json" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_whole_cross_validation_is_reproducible(make_dataset, tmp_path):
    """Every method, fine-tuning with accumulation included, twice in fresh processes: identical numbers."""
    import os
    import subprocess
    import sys

    csv = make_dataset(num_groups=3, samples_per_group=12)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    summaries = []
    for name in ("first", "second"):
        cmd = [sys.executable, "-m", "expreg.cv", str(REPO / "recipes" / "tiny.yaml"), "--n_folds", "3"]
        cmd += ["--methods", "finetune,linear_probe,ridge,mean", "train.grad_accum_steps=2", "data.num_workers=2"]
        cmd += [f"data.metadata_csv={csv}", "data.hed_jitter=0.05", "--out_dir", str(tmp_path / name)]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        summaries.append(json.loads((tmp_path / name / "cv_summary.json").read_text()))
    assert _cv_numbers(summaries[0]) == _cv_numbers(summaries[1])
    for fold in summaries[0]["methods"]["finetune"]["folds"]:
        m = json.loads((tmp_path / "first" / "runs" / f"finetune__fold{fold['fold']}" / "metrics.json").read_text())
        assert (m["test_spearman_mean"], m["test_pearson_mean"]) == (fold["spearman_mean"], fold["pearson_mean"])


def test_frozen_heads_and_both_probes_share_one_embedding_store(make_dataset, tmp_path, capsys):
    """``--methods frozen,linear_probe``: every fold's frozen-head run and both probes read the same store."""
    csv = make_dataset(num_groups=4, samples_per_group=10)
    out, cache = tmp_path / "cv", tmp_path / "cache"
    common = [str(REPO / "recipes" / "tiny.yaml"), f"data.metadata_csv={csv}", f"data.image_cache_dir={cache}"]
    settings = [*common, "train.epochs=2", "data.augment_dihedral=false", "data.hed_jitter=0.1"]
    assert cv_main([*settings, "--n_folds", "2", "--methods", "frozen,linear_probe", "--out_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(list((cache / "embeddings").iterdir())) == 1  # built once, by the probes, then read by both folds' runs
    assert len(re.findall(r"embedded [\d,]+ images", printed)) == 1
    summary = json.loads((out / "cv_summary.json").read_text())
    assert list(summary["methods"]) == ["frozen", "linear_probe", "linear_probe_hest"]
    for k, fold in enumerate(summary["methods"]["frozen"]["folds"]):
        run = json.loads((out / "runs" / f"frozen__fold{k}" / "metrics.json").read_text())
        assert fold["spearman_mean"] == run["test_spearman_mean"] and "tta_spearman_mean" not in fold
        resolved = (out / "runs" / f"frozen__fold{k}" / "config_resolved.yaml").read_text()
        assert "mode: frozen" in resolved and "hed_jitter: 0.0" in resolved  # jitter cannot apply to cached embeddings


def _report(genes: list[str], in_every_fold: int | None = None, per_fold: int = 50) -> str:
    from expreg.evaluation.cv_report import render_markdown, summarise

    folds = [
        {
            "fold": k,
            "test_groups": [f"P{k}"],
            "num_test_samples": 10,
            "spearman_mean": 0.1 * (k + 1),
            "pearson_mean": 0.1,
            "seconds": 1.0,
            "per_gene_spearman": {g: 0.01 * i + 0.002 * k for i, g in enumerate(genes)},
        }
        for k in range(2)
    ]
    summary = summarise({"ridge": folds}, genes, "r.yaml", __file__, seed=0)
    if in_every_fold is not None:
        summary["gene_selection"] = {
            "genes": "hvg:50",
            "target_transform": "log1p",
            "min_gene_detection": 0.1,
            "per_fold": {"0": per_fold, "1": per_fold},
            "in_every_fold": in_every_fold,
        }
    return render_markdown(summary)


def test_the_cv_report_names_best_and_worst_genes_or_every_gene_when_few():
    many = _report([f"G{i}" for i in range(11)])
    assert "best G10 0.101, G9 0.091, G8 0.081, G7 0.071, G6 0.061; worst G4 0.041, G3 0.031" in many
    assert "all 11" not in many
    ten = _report([f"G{i}" for i in range(10)])  # 5 best and 5 worst would be every gene: listed once instead
    assert (
        "averaged over folds, all 10: G9 0.091, G8 0.081" in ten and "best" not in ten.split("**ridge**, per-gene")[1]
    )
    few = _report(["A", "B", "C"], in_every_fold=3)
    assert "**ridge**, per-gene Spearman averaged over folds, all 3: C 0.021, B 0.011, A 0.001." in few
    assert "Only 3 genes were chosen in every fold" in few
    assert "data.genes=recipes/genes/her2_breast_panel.txt" in few
    assert Path(REPO / "recipes" / "genes" / "her2_breast_panel.txt").is_file()  # the advice names a real file
    assert "Only 1 gene was chosen in every fold" in _report(["A"], in_every_fold=1)
    assert "Only 4 genes" in _report(["A", "B", "C", "D"], in_every_fold=4)
    assert "Only" not in _report([f"G{i}" for i in range(5)], in_every_fold=5)
    assert "Only" not in _report(["A", "B", "C"], in_every_fold=3, per_fold=3)  # a list of 3 genes: every fold agrees

"""Using a trained run: predict, model card, push offline, TensorBoard, plots, aggregate, notebook example."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from expreg.aggregate import main as aggregate_main
from expreg.predict import main as predict_main

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from test_train import TWO_PROCESSES, _env, metrics, train  # noqa: E402


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    from expreg.data.demo import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("share_data"), 5, 12, 16, 50, seed=4)


@pytest.fixture(scope="module")
def run(data_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("share_runs")
    train(out, "shared", f"data.metadata_csv={data_csv}", "train.epochs=3", "logging.report_to=tensorboard")
    return out / "shared"


def test_predict_csv_matches_the_runs_validation_predictions(run, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    assert (
        predict_main(
            [
                "--model",
                str(run / "checkpoints" / "best"),
                "--metadata_csv",
                str(_val_csv(run, tmp_path)),
                "--out_csv",
                str(out),
                "--num_workers",
                "0",
            ]
        )
        == 0
    )
    predicted = pd.read_csv(out).set_index("path")
    reference = pd.read_csv(run / "predictions_val.csv").set_index("path").drop(columns=["group_id"])
    assert list(predicted.columns) == list(reference.columns)  # gene names, in order
    np.testing.assert_allclose(predicted.loc[reference.index].to_numpy(), reference.to_numpy(), rtol=1e-4, atol=1e-4)
    printed = capsys.readouterr().out
    assert "mean Spearman" in printed and "GENE" in printed
    summary = json.loads(out.with_suffix(".metrics.json").read_text())
    assert summary["spearman_mean"] == pytest.approx(metrics(run)["best_val_spearman_mean"], abs=1e-4)
    per_gene = pd.read_csv(out.with_suffix(".per_gene.csv"))
    depth = ["spearman_depth_adjusted", "pearson_depth_adjusted", "depth_oracle_spearman"]
    assert list(per_gene.columns) == ["gene", "spearman", "pearson", "mse", *depth] and len(per_gene) == 50
    assert per_gene[depth].isna().all().all() and summary["spearman_depth_adjusted_mean"] is None  # no library size


def test_predict_tta_averages_the_eight_views_of_each_image(run, tmp_path):
    """``expreg.predict --tta`` against a hand-made average over the 8 flipped/rotated inputs."""
    import torch
    from PIL import Image

    from expreg.data import ImageTransform
    from expreg.modeling.model import ExpRegModel

    val_csv = _val_csv(run, tmp_path)
    out = tmp_path / "tta.csv"
    args = ["--model", str(run), "--metadata_csv", str(val_csv), "--num_workers", "0"]
    assert predict_main([*args, "--out_csv", str(out), "--tta"]) == 0
    assert predict_main([*args, "--out_csv", str(tmp_path / "plain.csv")]) == 0
    tta = pd.read_csv(out).set_index("path")
    plain = pd.read_csv(tmp_path / "plain.csv").set_index("path")
    model = ExpRegModel.from_pretrained(run / "checkpoints" / "best").eval()
    transform = ImageTransform(model.config.image_size, model.config.image_mean, model.config.image_std)
    paths = list(tta.index[:6])
    expected = []
    for path in paths:  # the 8 views made with numpy on the model's input: 4 rotations, each also mirrored
        with Image.open(val_csv.parent / path) as image:
            x = transform(image.convert("RGB"), path).numpy()
        views = [np.rot90(x, k, axes=(1, 2)) for k in range(4)]
        views += [v[:, :, ::-1] for v in views]
        batch = torch.from_numpy(np.ascontiguousarray(np.stack(views)))
        assert len({v.tobytes() for v in batch.numpy()}) == 8
        expected.append(model.predict_expression(batch).numpy().mean(0))
    np.testing.assert_allclose(tta.loc[paths].to_numpy(), np.stack(expected), rtol=1e-4, atol=1e-4)
    assert not np.allclose(tta.loc[paths].to_numpy(), plain.loc[paths].to_numpy(), atol=1e-3)  # it did something


def test_hub_and_plots_commands(run, tmp_path):
    """``python -m expreg.hub`` (retry a push: offline, a clear error and exit 3) and ``python -m expreg.plots``."""
    env = {**_env(), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "expreg.hub", str(run), "--hub_model_id", "someone/expreg-test"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 3 and "pushing" in result.stderr and "The run is complete and kept" in result.stderr
    assert "Traceback" not in result.stderr
    cmd = [sys.executable, "-m", "expreg.hub", str(tmp_path), "--hub_model_id", "someone/expreg-test"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 3 and "no saved best model to push" in result.stderr
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*.png", "checkpoints", "tensorboard"))
    result = subprocess.run(
        [sys.executable, "-m", "expreg.plots", str(copy)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    drawn = sorted(p.name for p in copy.glob("*.png"))
    assert drawn == ["plot_learning_curves.png", "plot_per_gene_spearman.png", "plot_pred_vs_true.png"]
    for name in drawn:
        assert f"wrote {copy / name}" in result.stdout


def _val_csv(run: Path, tmp_path: Path) -> Path:
    """The run's validation rows as a metadata CSV beside the original (relative image paths kept)."""
    import yaml

    cfg = yaml.safe_load((run / "config_resolved.yaml").read_text())
    meta = pd.read_csv(cfg["data"]["metadata_csv"], dtype=str, keep_default_na=False)
    val = set(pd.read_csv(run / "split.csv").query("split == 'validation'")["path"])
    path = Path(cfg["data"]["metadata_csv"]).parent / f"val_{tmp_path.name}.csv"
    meta[meta["path"].isin(val)].to_csv(path, index=False)
    return path


def test_predict_image_folder_without_targets(run, data_csv, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((data_csv.parent / "images").iterdir())[:7]:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "pred.csv"
    assert (
        predict_main(["--model", str(run), "--image_dir", str(folder), "--out_csv", str(out), "--num_workers", "0"])
        == 0
    )
    predicted = pd.read_csv(out)
    assert len(predicted) == 7 and predicted.columns[0] == "path" and predicted.shape[1] == 51
    assert not out.with_suffix(".metrics.json").exists()  # no targets, no metrics
    assert predict_main(["--model", str(run), "--image_dir", str(folder), "--out_csv", str(out)]) == 2  # no overwrite


def test_predict_hub_id_offline_fails_fast(tmp_path, capsys):
    start = time.perf_counter()
    code = predict_main(
        ["--model", "some-org/not-here", "--image_dir", str(tmp_path), "--out_csv", str(tmp_path / "p.csv")]
    )
    assert code == 2 and time.perf_counter() - start < 30
    assert "could not load model 'some-org/not-here'" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_with_two_processes_has_no_duplicate_or_missing_rows(run, data_csv, tmp_path):
    out = tmp_path / "pred2.csv"
    cmd = [
        *TWO_PROCESSES,
        "-m",
        "expreg.predict",
        "--model",
        str(run),
        "--metadata_csv",
        str(data_csv),
        "--out_csv",
        str(out),
        "--batch_size",
        "7",
        "--num_workers",
        "0",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    predicted = pd.read_csv(out)
    meta = pd.read_csv(data_csv)
    assert list(predicted["path"]) == list(meta["path"])  # every row once, in order
    one = tmp_path / "pred1.csv"
    assert (
        predict_main(
            ["--model", str(run), "--metadata_csv", str(data_csv), "--out_csv", str(one), "--batch_size", "7"]
        )
        == 0
    )
    np.testing.assert_allclose(
        predicted.iloc[:, 1:].to_numpy(), pd.read_csv(one).iloc[:, 1:].to_numpy(), rtol=1e-4, atol=1e-5
    )


def test_model_card_is_written_and_informative(run):
    card = (run / "checkpoints" / "best" / "README.md").read_text()
    m = metrics(run)
    assert card.startswith("---\nlibrary_name: transformers")
    assert "test_resnet" in card and "50 genes" in card
    assert f"{m['best_val_spearman_mean']:.4f}" in card and f"{m['best_val_pearson_mean']:.4f}" in card
    assert "Patient-level (group-aware) split" in card and "training split only" in card
    assert "AutoModel.from_pretrained" in card and "python -m expreg.predict" in card
    assert "not for clinical" in card
    per_gene = pd.read_csv(run / "per_gene_metrics.csv").sort_values("spearman", ascending=False)
    assert f"| 1 | {per_gene['gene'].iloc[0]} |" in card  # best gene first
    assert f"| 50 | {per_gene['gene'].iloc[-1]} |" in card  # worst gene last


@pytest.mark.slow  # end-to-end; moved to the slow tier to keep the fast tier under 10 minutes
def test_push_to_hub_offline_fails_fast_and_keeps_the_run(data_csv, tmp_path):
    start = time.perf_counter()
    result = train(
        tmp_path,
        "pushed",
        f"data.metadata_csv={data_csv}",
        "train.epochs=1",
        "--push_to_hub",
        "train.hub_model_id=someone/expreg-test",
        expect_ok=False,
    )
    assert result.returncode == 3 and time.perf_counter() - start < 120
    assert "pushing" in result.stderr and "python -m expreg.hub" in result.stderr
    m = metrics(tmp_path / "pushed")
    assert m["status"] == "finished" and m["push_to_hub"]["ok"] is False
    assert (tmp_path / "pushed" / "checkpoints" / "best" / "model.safetensors").is_file()
    result = train(tmp_path, "nohub", f"data.metadata_csv={data_csv}", "--push_to_hub", expect_ok=False)
    assert result.returncode == 2 and "train.push_to_hub needs train.hub_model_id" in result.stderr


def test_tensorboard_logs_offline(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train_loss", "val_loss", "val_spearman_mean", "val_pearson_mean"} <= tags


def test_plots_are_written(run):
    from PIL import Image

    for name in ("plot_per_gene_spearman.png", "plot_pred_vs_true.png", "plot_learning_curves.png"):
        with Image.open(run / name) as image:
            assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 300


def test_aggregate_sorts_runs_lists_broken_ones_and_summarises_folds(run, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    for name, spearman, fold, test in (("a", 0.2, 0, 0.1), ("b", 0.5, 1, 0.3), ("c", 0.3, None, None)):
        shutil.copytree(run, results / name, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "*.png"))
        m = metrics(results / name)
        m["best_val_spearman_mean"] = spearman
        if test is not None:  # fold runs score their held-out fold
            m["test_spearman_mean"], m["test_pearson_mean"] = test, test + 0.01
            m["test_spearman_depth_adjusted_mean"] = test - 0.05  # library size regressed out
        (results / name / "metrics.json").write_text(json.dumps(m))
        cfg = (results / name / "config_resolved.yaml").read_text()
        (results / name / "config_resolved.yaml").write_text(
            cfg.replace("fold: null", f"fold: {fold if fold is not None else 'null'}")
        )
    (results / "empty").mkdir()
    shutil.copytree(results / "c", results / "stopped")
    m = metrics(results / "stopped")
    m["status"] = "stopped"
    (results / "stopped" / "metrics.json").write_text(json.dumps(m))
    (results / "garbled").mkdir()
    (results / "garbled" / "metrics.json").write_text("{not json")
    shutil.copytree(results / "c", results / "null_json")
    (results / "null_json" / "metrics.json").write_text("null")
    shutil.copytree(results / "c", results / "text_config")
    (results / "text_config" / "config_resolved.yaml").write_text("just text")
    shutil.copytree(results / "c", results / "no_lr")
    cfg = (results / "no_lr" / "config_resolved.yaml").read_text()
    (results / "no_lr" / "config_resolved.yaml").write_text(cfg.replace("  lr: 0.001\n", ""))
    out_md = tmp_path / "summary.md"
    assert aggregate_main(["--results_dir", str(results), "--out_md", str(out_md)]) == 0
    table = out_md.read_text()
    assert table == capsys.readouterr().out.split("\nwrote")[0]
    main_rows = [
        line.split("|")[1].strip()
        for line in table.split("## ")[0].splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    assert main_rows[1:4] == ["b", "c", "a"] or main_rows[1:] == ["b", "c", "no_lr", "a"]
    assert "| b | test_resnet | 8 | 0.001 | 0 | 3 |" in table
    # the cross-validation summary is of held-out scores; validation (model selection) only labelled as such
    assert "Cross-validation (mean ± std over folds)" in table
    assert "| 0, 1 | 0.2000 ± 0.1414 | 0.2100 ± 0.1414 | 0.1500 ± 0.1414 | 0.3500 ± 0.2121 |" in table
    assert (
        "| folds | held-out test mean Spearman | held-out test mean Pearson | held-out test depth-adjusted Spearman "
        "| validation mean Spearman |" in table
    )
    assert "| 0.3000 | 0.3100 | 0.2500 |" in table  # b's held-out scores, depth-adjusted beside them
    assert "| n/a | n/a | n/a | n/a |" in table  # c: no test split, and its CSV data had no library size
    assert (
        "| a | test_resnet | 8 | 0.001 | 0 | 3 |" in table and "| 0.2000 |" in table and "| 0.1000 | 0.1100 |" in table
    )
    assert "| empty | no metrics.json" in table and "| garbled | unreadable metrics.json" in table
    assert "| stopped | status 'stopped'" in table
    assert "| null_json | metrics.json is not a JSON object |" in table
    assert "| text_config | config_resolved.yaml is not a mapping |" in table
    assert "| no_lr | test_resnet | 8 | n/a |" in table  # a missing setting is n/a, not a crash


def test_notebook_example_runs(run):
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "notebook_quickstart.py"), str(run)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ExpRegModel test_resnet 50 genes" in result.stdout
    assert "predictions: (" in result.stdout and "mean Spearman" in result.stdout


def test_predict_refuses_other_genes_and_reports_unreadable_images(run, data_csv, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_csv.parent, data)
    (data / "genes.txt").write_text("\n".join(f"OTHER{i}" for i in range(50)) + "\n")
    out = tmp_path / "p.csv"
    assert (
        predict_main(["--model", str(run), "--metadata_csv", str(data / "metadata.csv"), "--out_csv", str(out)]) == 2
    )
    assert "gene names differ from the model's (y0: OTHER0 vs GENE00" in capsys.readouterr().err
    (data / "genes.txt").unlink()
    first = pd.read_csv(data / "metadata.csv")["path"].iloc[0]
    (data / first).write_bytes(b"broken")
    code = predict_main(
        [
            "--model",
            str(run),
            "--metadata_csv",
            str(data / "metadata.csv"),
            "--out_csv",
            str(out),
            "--num_workers",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and first in err and "cannot read the image" in err and "Traceback" not in err
    assert not out.exists()

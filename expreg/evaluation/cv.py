"""Patient-level cross-validation in one command: every method on the same group folds, one summary.

    python -m expreg.cv recipes/her2st.yaml data.metadata_csv=../shared/data/her2st_dev/metadata.csv
    python -m expreg.cv recipes/demo.yaml --n_folds 4 --methods finetune,ridge,mean

For each fold k (a group k-fold from ``expreg.splits``; leave-one-group-out by default when
there are at most 10 groups) and each method:

- ``finetune``: the recipe's training run with fold k held out as test (validation, for the
  best epoch, comes from the other folds' groups, or from a seeded part of the samples when
  only one group is left for training); the run scores fold k with its best model (its
  ``metrics.json``'s ``test_*``, the numbers reported here), then the 8-view TTA is added;
- ``linear_probe``: as in HEST-Benchmark, frozen embeddings of the recipe's backbone (its
  pretrained or local weights when the recipe asks for them, else random init) -> standardise ->
  PCA (256 or fewer components) -> ridge, all fitted on the training groups;
- ``ridge``: ridge regression on 62 colour/texture features per patch, the ridge strength
  chosen by an inner group k-fold on the training groups;
- ``mean``: the training mean (its correlations are undefined, reported as such).

Written to ``--out_dir`` (default ``<logging.output_dir>/cv__<recipe>__<timestamp>``):
``folds.csv``, the fine-tuning run directories under ``runs/``, and ``cv_summary.json`` /
``cv_summary.md`` (per fold, mean ± std of mean Spearman and mean Pearson per method, the time
each took, and per-gene mean Spearman across folds).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np

from expreg.config import DEMO_DATA, ConfigError
from expreg.data.metadata import read_metadata
from expreg.data.splits import make_fold_table, write_table
from expreg.run_dir import SPLIT_SUMMARY_FILE

METHODS = ("finetune", "linear_probe", "ridge", "mean")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return None, None
    mean = float(np.mean(finite))
    return mean, float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def _fold_result(summary: dict, per_gene_spearman: dict, seconds: float, extra: dict | None = None) -> dict:
    """One method's held-out result on one fold (``summary``: a ``Metrics.summary`` or the same keys)."""
    return {
        "spearman_mean": summary["spearman_mean"],
        "pearson_mean": summary["pearson_mean"],
        "num_genes_undefined_spearman": summary["num_genes_undefined_spearman"],
        "num_test_samples": summary["num_samples"],
        "seconds": round(seconds, 1),
        "per_gene_spearman": per_gene_spearman,
        **(extra or {}),
    }


def run_finetune_fold(cfg, folds_csv: Path, fold: int, runs_dir: Path, accelerator, test_files, genes):
    """Train with ``fold`` held out; the run scores its best model on the fold (``metrics.json``'s ``test_*``).

    Returns:
        ``(summary, per-gene Spearman of the held-out fold, extra)``, taken from what the fold run
        returns, so ``cv_summary.json`` and the run's ``metrics.json`` hold the same numbers.
    """
    from expreg.evaluation.metrics import compute_metrics
    from expreg.inference import predict_files
    from expreg.modeling.model import ExpRegModel
    from expreg.training.trainer import TrainingError, run

    fold_cfg = copy.deepcopy(cfg)
    fold_cfg.data.split_csv, fold_cfg.data.fold = str(folds_csv), fold
    fold_cfg.logging.output_dir, fold_cfg.logging.run_name = str(runs_dir), f"finetune__fold{fold}"
    result = run(fold_cfg, accelerator)
    accelerator.free_memory()
    run_dir = runs_dir / f"finetune__fold{fold}"
    if result["status"] != "finished" or "test_spearman_mean" not in result:
        raise TrainingError(f"{run_dir}: the fold run ended with status {result['status']!r}, without held-out scores")
    per_gene_spearman = result["test_per_gene_spearman"]
    summary = {
        "spearman_mean": result["test_spearman_mean"],
        "pearson_mean": result["test_pearson_mean"],
        "num_genes_undefined_spearman": result["num_genes_undefined_test_spearman"],
        "num_samples": result["num_test_samples"],
    }
    model = ExpRegModel.from_pretrained(run_dir / "checkpoints" / "best")
    batch_size = cfg.data.eval_batch_size or cfg.data.batch_size
    files, targets = test_files
    with_tta = predict_files(model, files, accelerator, batch_size, cfg.data.num_workers, tta=True)
    accelerator.free_memory()
    tta = compute_metrics(with_tta, targets, genes)
    used = json.loads((run_dir / SPLIT_SUMMARY_FILE).read_text())
    fit_groups = sorted(set(used["train"]["groups"]) | set(used["validation"]["groups"]))
    extra = {
        "fit_groups": fit_groups,  # training and model selection (validation)
        "num_fit_samples": used["train"]["samples"] + used["validation"]["samples"],
        "best_epoch": result["best_epoch"],
        "best_val_spearman_mean": result["best_val_spearman_mean"],  # model selection, not a held-out score
        "tta_spearman_mean": tta.spearman_mean,  # the same model, averaged over the 8 dihedral views
        "tta_pearson_mean": tta.pearson_mean,
    }
    return summary, per_gene_spearman, extra


def cross_validate(cfg, recipe_name: str, n_folds: int | None, methods: list[str], out_dir: Path) -> dict:
    """Run every method on every fold; returns the summary (also written to ``out_dir``).

    Deterministic: the same recipe, seed and data give the same numbers (every random step is
    seeded from ``cfg.seed``, the randomly initialised backbone of the linear probe included).
    """
    from expreg.evaluation.metrics import compute_metrics

    if cfg.data.metadata_csv == DEMO_DATA:
        from expreg.data.demo import ensure_demo_dataset

        cfg.data.metadata_csv = str(ensure_demo_dataset())
    metadata = read_metadata(
        cfg.data.metadata_csv, cfg.data.gene_names_file, cfg.data.num_genes, cfg.data.check_images
    )
    groups = metadata.frame["group_id"].to_numpy()
    n_groups = len(set(groups.tolist()))
    n_folds = n_folds or (n_groups if n_groups <= 10 else 5)
    table, fold_summary = make_fold_table(metadata, n_folds, cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=False)
    folds_csv = write_table(table, out_dir / "folds.csv")
    print(
        f"{n_folds} group folds of {len(groups)} samples in {n_groups} groups -> {folds_csv}\n{fold_summary.format()}"
    )
    fold_of = table.set_index("path").loc[metadata.frame["path"], "fold"].to_numpy()
    targets, files, genes = (
        metadata.targets().astype(np.float64),
        np.array(metadata.image_paths()),
        metadata.gene_names,
    )
    inputs = _shared_inputs(cfg, methods, list(files))
    accelerator = None
    if "finetune" in methods:
        from expreg.training.launch import build_accelerator, unconnected_launch_error

        accelerator = build_accelerator(cfg)  # the recipe's precision, accumulation and trackers
        problem = unconnected_launch_error(accelerator)
        if problem:
            raise ConfigError(problem)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for k in range(n_folds):
        test, train = fold_of == k, fold_of != k
        test_groups = sorted(set(groups[test].tolist()))
        for method in methods:
            start = time.perf_counter()
            extra: dict = {}
            if method == "finetune":
                test_files = (list(files[test]), targets[test])
                summary, per_gene, extra = run_finetune_fold(
                    cfg, folds_csv, k, out_dir / "runs", accelerator, test_files, genes
                )
            else:
                x, fit = inputs[method]
                predictions, extra = fit(x[train], targets[train], groups[train], x[test], seed=cfg.seed)
                metrics = compute_metrics(predictions, targets[test], genes)
                summary = metrics.summary
                per_gene = {r["gene"]: r["spearman"] for r in metrics.per_gene_rows()}
            shared = inputs.get(f"{method}_seconds", 0.0)
            seconds = time.perf_counter() - start + shared * test.mean()  # this fold's share of the extraction
            results[method].append(
                {"fold": k, "test_groups": test_groups, **_fold_result(summary, per_gene, seconds, extra)}
            )
            print(f"fold {k} ({', '.join(test_groups)}) {method}: {_describe(summary)} [{seconds:.0f} s]")
    if accelerator is not None:
        accelerator.end_training()
    summary = summarise(results, genes, recipe_name, str(folds_csv), cfg.seed)
    from expreg.run_dir import atomic_write_text, write_json

    write_json(out_dir / "cv_summary.json", summary)
    atomic_write_text(out_dir / "cv_summary.md", render_markdown(summary))
    return summary


def _shared_inputs(cfg, methods: list[str], files: list[str]) -> dict:
    """Per-image inputs computed once for all folds (colour/texture features, frozen embeddings), and
    the fit function of each baseline: ``fit(x_train, y_train, groups_train, x_test, seed)``."""
    from expreg.evaluation.baselines import embed_images, extract_features, linear_probe, mean_fit, ridge_baseline
    from expreg.seeding import seed_everything

    inputs: dict = {"mean": (np.zeros((len(files), 0)), mean_fit)}  # the mean needs no input
    if "ridge" in methods:
        start = time.perf_counter()
        inputs["ridge"] = (extract_features(files), ridge_baseline)
        inputs["ridge_seconds"] = time.perf_counter() - start
    if "linear_probe" in methods:
        start = time.perf_counter()
        seed_everything(cfg.seed)  # a randomly initialised backbone must be the same one every time
        m = cfg.model
        embeddings = embed_images(
            files,
            m.backbone,
            cfg.data.image_size,
            pretrained=m.pretrained,
            pretrained_path=m.pretrained_path,
            num_workers=cfg.data.num_workers,
        )
        inputs["linear_probe"] = (embeddings, linear_probe)
        inputs["linear_probe_seconds"] = time.perf_counter() - start
    return inputs


def _describe(summary: dict) -> str:
    return (
        f"held-out mean Spearman {_fmt(summary['spearman_mean'])} | mean Pearson {_fmt(summary['pearson_mean'])} "
        f"| {summary['num_samples']} samples"
    )


def summarise(results: dict[str, list[dict]], genes: list[str], recipe: str, folds_csv: str, seed: int) -> dict:
    methods = {}
    for method, folds in results.items():
        s_mean, s_std = _mean_std([f["spearman_mean"] for f in folds])
        p_mean, p_std = _mean_std([f["pearson_mean"] for f in folds])
        per_gene = {g: _mean_std([f["per_gene_spearman"][g] for f in folds])[0] for g in genes}
        methods[method] = {
            "spearman_mean": s_mean,
            "spearman_std": s_std,
            "pearson_mean": p_mean,
            "pearson_std": p_std,
            "seconds_total": round(sum(f["seconds"] for f in folds), 1),
            "per_gene_spearman_mean": per_gene,
            "folds": folds,
        }
    from expreg.run_dir import file_sha256

    return {
        "recipe": recipe,
        "folds_csv": folds_csv,
        "folds_csv_sha256": file_sha256(folds_csv),
        "seed": seed,
        "methods": methods,
    }


def _fmt(value) -> str:
    return "undefined" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def render_markdown(summary: dict) -> str:
    methods = summary["methods"]
    lines = [
        f"# Cross-validation: {summary['recipe']}",
        "",
        f"Folds: `{summary['folds_csv']}` (seed {summary['seed']}).",
        "",
    ]
    lines += [
        "| method | fold | test groups | test samples | mean Spearman | mean Pearson | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, m in methods.items():
        for f in m["folds"]:
            lines.append(
                f"| {method} | {f['fold']} | {', '.join(f['test_groups'])} | {f['num_test_samples']} "
                f"| {_fmt(f['spearman_mean'])} | {_fmt(f['pearson_mean'])} | {f['seconds']:.0f} |"
            )
    lines += [
        "",
        "| method | mean Spearman (mean ± std over folds) | mean Pearson | total time (s) |",
        "|---|---|---|---|",
    ]
    for method, m in methods.items():
        spearman = "undefined" if m["spearman_mean"] is None else f"{m['spearman_mean']:.4f} ± {m['spearman_std']:.4f}"
        pearson = "undefined" if m["pearson_mean"] is None else f"{m['pearson_mean']:.4f} ± {m['pearson_std']:.4f}"
        lines.append(f"| {method} | {spearman} | {pearson} | {m['seconds_total']:.0f} |")
    if "finetune" in methods:
        tta = _mean_std([f["tta_spearman_mean"] for f in methods["finetune"]["folds"]])[0]
        plain = methods["finetune"]["spearman_mean"]
        if tta is not None and plain is not None:
            lines += [
                "",
                f"Test-time augmentation (mean over the 8 dihedral views) for `finetune`: mean Spearman "
                f"{tta:.4f} vs {plain:.4f} without ({tta - plain:+.4f}).",
            ]
    if "mean" in methods:
        lines += ["", "The `mean` predictor is constant, so its correlations are undefined for every gene."]
    for method, m in methods.items():
        ranked = sorted(((g, v) for g, v in m["per_gene_spearman_mean"].items() if v is not None), key=lambda x: -x[1])
        if ranked:
            best = ", ".join(f"{g} {v:.3f}" for g, v in ranked[:5])
            worst = ", ".join(f"{g} {v:.3f}" for g, v in ranked[-5:])
            lines += ["", f"**{method}**, per-gene Spearman averaged over folds: best {best}; worst {worst}."]
    return "\n".join(lines) + "\n"

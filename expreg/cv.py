"""Patient-level cross-validation in one command: every method on the same group folds, one summary.

    python -m expreg.cv recipes/her2st.yaml data.metadata_csv=../shared/data/her2st_dev/metadata.csv
    python -m expreg.cv recipes/demo.yaml --n_folds 4 --methods finetune,ridge,mean

For each fold k (a group k-fold from ``expreg.splits``; leave-one-group-out by default when
there are at most 10 groups) and each method:

- ``finetune``: the recipe's training run with fold k held out as test (validation, for the
  best epoch, comes from the other folds' groups), then its best model predicts fold k;
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

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np

from expreg.config import DEMO_DATA, ConfigError, load_recipe
from expreg.metadata import MetadataError, read_metadata
from expreg.splits import make_fold_table, write_table

METHODS = ("finetune", "linear_probe", "ridge", "mean")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return None, None
    mean = float(np.mean(finite))
    return mean, float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def _fold_result(metrics, seconds: float, extra: dict | None = None) -> dict:
    return {
        "spearman_mean": metrics.summary["spearman_mean"],
        "pearson_mean": metrics.summary["pearson_mean"],
        "num_genes_undefined_spearman": metrics.summary["num_genes_undefined_spearman"],
        "num_test_samples": metrics.summary["num_samples"],
        "seconds": round(seconds, 1),
        "per_gene_spearman": {r["gene"]: r["spearman"] for r in metrics.per_gene_rows()},
        **(extra or {}),
    }


def run_finetune_fold(cfg, folds_csv: Path, fold: int, runs_dir: Path, accelerator, test_files, test_targets, genes):
    """Train with ``fold`` held out, then predict it with the best model."""
    from expreg.metrics import compute_metrics
    from expreg.model import ExpRegModel
    from expreg.predict import predict_files
    from expreg.train import run

    fold_cfg = copy.deepcopy(cfg)
    fold_cfg.data.split_csv, fold_cfg.data.fold = str(folds_csv), fold
    fold_cfg.logging.output_dir, fold_cfg.logging.run_name = str(runs_dir), f"finetune__fold{fold}"
    result = run(fold_cfg, accelerator)
    accelerator.free_memory()
    model = ExpRegModel.from_pretrained(runs_dir / f"finetune__fold{fold}" / "checkpoints" / "best").eval()
    batch_size = cfg.data.eval_batch_size or cfg.data.batch_size
    expression = predict_files(model, test_files, accelerator, batch_size, cfg.data.num_workers)
    with_tta = predict_files(model, test_files, accelerator, batch_size, cfg.data.num_workers, tta=True)
    accelerator.free_memory()
    tta = compute_metrics(with_tta, test_targets, genes)
    extra = {
        "best_epoch": result["best_epoch"],
        "best_val_spearman_mean": result["best_val_spearman_mean"],
        "tta_spearman_mean": tta.spearman_mean,  # the same model, averaged over the 8 dihedral views
        "tta_pearson_mean": tta.pearson_mean,
    }
    return compute_metrics(expression, test_targets, genes), extra


def cross_validate(cfg, recipe_name: str, n_folds: int | None, methods: list[str], out_dir: Path) -> dict:
    """Run every method on every fold; returns the summary (also written to ``out_dir``)."""
    from accelerate import Accelerator

    from expreg.baselines import embed_images, extract_features, linear_probe, mean_baseline, ridge_baseline
    from expreg.metrics import compute_metrics

    if cfg.data.metadata_csv == DEMO_DATA:
        from expreg.demo import ensure_demo_dataset

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
    features = feature_seconds = None
    if "ridge" in methods:
        start = time.perf_counter()
        features = extract_features(list(files))
        feature_seconds = time.perf_counter() - start
    embeddings = embed_seconds = None
    if "linear_probe" in methods:
        start = time.perf_counter()
        m = cfg.model
        embeddings = embed_images(
            list(files),
            m.backbone,
            cfg.data.image_size,
            pretrained=m.pretrained,
            pretrained_path=m.pretrained_path,
            num_workers=cfg.data.num_workers,
        )
        embed_seconds = time.perf_counter() - start
    accelerator = Accelerator() if "finetune" in methods else None
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for k in range(n_folds):
        test, train = fold_of == k, fold_of != k
        test_groups = sorted(set(groups[test].tolist()))
        for method in methods:
            start = time.perf_counter()
            extra: dict = {}
            if method == "mean":
                metrics = compute_metrics(mean_baseline(targets[train], int(test.sum())), targets[test], genes)
            elif method == "linear_probe":
                predictions, extra = linear_probe(
                    embeddings[train], targets[train], groups[train], embeddings[test], seed=cfg.seed
                )
                metrics = compute_metrics(predictions, targets[test], genes)
            elif method == "ridge":
                predictions, extra = ridge_baseline(
                    features[train], targets[train], groups[train], features[test], cfg.seed
                )
                metrics = compute_metrics(predictions, targets[test], genes)
            else:
                metrics, extra = run_finetune_fold(
                    cfg, folds_csv, k, out_dir / "runs", accelerator, list(files[test]), targets[test], genes
                )
            shared = {"ridge": feature_seconds, "linear_probe": embed_seconds}.get(method) or 0.0
            seconds = time.perf_counter() - start + shared * test.mean()  # this fold's share of the extraction
            results[method].append({"fold": k, "test_groups": test_groups, **_fold_result(metrics, seconds, extra)})
            print(f"fold {k} ({', '.join(test_groups)}) {method}: {metrics.format()} [{seconds:.0f} s]")
    summary = summarise(results, genes, recipe_name, str(folds_csv), cfg.seed)
    from expreg.io import atomic_write_text, write_json

    write_json(out_dir / "cv_summary.json", summary)
    atomic_write_text(out_dir / "cv_summary.md", render_markdown(summary))
    return summary


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
    from expreg.io import file_sha256

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expreg.cv", description="Patient-level cross-validation.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/her2st.yaml")
    parser.add_argument(
        "--n_folds", type=int, help="group folds (default: leave-one-group-out up to 10 groups, else 5)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--out_dir", help="where to write (default <logging.output_dir>/cv__<recipe>__<timestamp>)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for run_regression.py")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(
                f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}"
            )
        cfg = load_recipe(args.recipe, args.overrides)
        if cfg.data.split_csv is not None or cfg.data.fold is not None:
            raise ConfigError("expreg.cv makes its own group folds: do not set data.split_csv or data.fold")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out_dir = Path(args.out_dir or Path(cfg.logging.output_dir) / f"cv__{Path(args.recipe).stem}__{stamp}")
        if out_dir.exists():
            raise ConfigError(f"--out_dir {out_dir} exists; cross-validation results are never overwritten")
        summary = cross_validate(cfg, Path(args.recipe).name, args.n_folds, methods, out_dir)
    except (ConfigError, MetadataError) as err:
        print(f"expreg.cv: error: {err}", file=sys.stderr)
        return 2
    print()
    print(render_markdown(summary))
    print(f"wrote {out_dir / 'cv_summary.json'} and {out_dir / 'cv_summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

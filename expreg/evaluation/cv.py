"""Patient-level cross-validation in one command: every method on the same group folds, one summary.

    python -m expreg.cv recipes/her2st.yaml data.metadata_csv=../shared/data/her2st_dev/metadata.csv
    python -m expreg.cv recipes/demo.yaml --n_folds 4 --methods finetune,ridge,mean

For each fold k (a group k-fold from ``expreg.splits``; leave-one-group-out by default when
there are at most 10 groups) and each method:

- ``finetune``: the recipe's training run with fold k held out as test (validation, for the
  best epoch, comes from the other folds' groups, or from a seeded part of the samples when
  only one group is left for training); the run scores fold k with its best model (its
  ``metrics.json``'s ``test_*``, the numbers reported here), then the 8-view TTA is added.
  Training is not done here: ``cross_validate`` is given it as ``finetune`` (the command binds
  ``expreg.training.folds.finetune_fold`` to its accelerator);
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

With ``data.expression_file`` (targets from raw counts), each fold chooses its genes on its own
training groups (``genes_fold<k>.txt``, with ``.json`` saying how), every method of the fold
predicts that list, and the per-gene means cover the genes chosen in every fold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from expreg.config import ConfigError, RunConfig
from expreg.data import read_metadata, resolve_metadata_csv
from expreg.data.splits import make_fold_table, write_table
from expreg.evaluation.metrics import compute_metrics
from expreg.formatting import fmt_float, fmt_mean_std, mean_std
from expreg.run_dir import atomic_write_text, file_sha256, write_json

METHODS = ("finetune", "linear_probe", "ridge", "mean")
UNDEFINED = "undefined"  # how a missing (undefined) correlation is written

# finetune(cfg, folds_csv, fold, runs_dir, (test files, test targets), genes) -> (summary, per-gene Spearman, extra)
FineTune = Callable[..., tuple[dict, dict, dict]]


def parse_methods(text: str) -> list[str]:
    """``"finetune,ridge"`` -> ``["finetune", "ridge"]``; ``ConfigError`` for an unknown method or none."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(
            f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}"
        )
    return methods


def check_config(cfg, methods: list[str]) -> None:
    """``ConfigError`` when the recipe sets what cross-validation decides itself."""
    if cfg.data.split_csv is not None or cfg.data.fold is not None:
        raise ConfigError("expreg.cv makes its own group folds: do not set data.split_csv or data.fold")
    if cfg.train.stop_after_steps is not None and "finetune" in methods:
        raise ConfigError("train.stop_after_steps: every fold of expreg.cv trains to the end; unset it")


def output_dir(cfg, recipe: str, out_dir: str | None) -> Path:
    """``out_dir``, or ``<logging.output_dir>/cv__<recipe>__<timestamp>``; ``ConfigError`` when it exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(out_dir or Path(cfg.logging.output_dir) / f"cv__{Path(recipe).stem}__{stamp}")
    if path.exists():
        raise ConfigError(f"--out_dir {path} exists; cross-validation results are never overwritten")
    return path


@dataclass
class _Folds:
    """What every fold uses: the samples (in metadata order), the fold holding each out, the shared inputs."""

    cfg: RunConfig
    files: np.ndarray
    targets: np.ndarray
    groups: np.ndarray
    genes: list[str]
    fold_of: np.ndarray
    folds_csv: Path
    runs_dir: Path
    inputs: dict = field(default_factory=dict)
    finetune: FineTune | None = None
    metadata: object = None  # with data.expression_file: the table without targets; each fold computes its own
    fold_genes: dict = field(default_factory=dict)  # fold -> genes chosen on its training groups (expression file)


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


def cross_validate(
    cfg, recipe_name: str, n_folds: int | None, methods: list[str], out_dir: Path, finetune: FineTune | None = None
) -> dict:
    """Run every method on every fold; returns the summary (also written to ``out_dir``).

    ``finetune`` trains and scores one fold (``expreg.training.folds.finetune_fold`` bound to an
    accelerator); it is needed when ``methods`` holds ``"finetune"``. Deterministic: the same
    recipe, seed and data give the same numbers (every random step is seeded from ``cfg.seed``,
    the randomly initialised backbone of the linear probe included).
    """
    if "finetune" in methods and finetune is None:
        raise ConfigError("cross_validate: method finetune needs finetune= (expreg.training.folds.finetune_fold)")
    metadata_csv = resolve_metadata_csv(cfg.data.metadata_csv)
    cfg = replace(cfg, data=replace(cfg.data, metadata_csv=metadata_csv))
    d = cfg.data
    metadata = read_metadata(
        d.metadata_csv, d.gene_names_file, d.num_genes, d.check_images, targets_required=not d.expression_file
    )
    if d.expression_file:  # bad expression input fails here, before out_dir exists (the choice is discarded)
        from expreg.data import expression_targets

        expression_targets(
            metadata,
            d.expression_file,
            np.ones(len(metadata.frame), bool),
            d.genes,
            min_detection=d.min_gene_detection,
            transform=d.target_transform,
        )
    n_folds, folds_csv, fold_of = _write_folds(metadata, n_folds, cfg.seed, out_dir)
    folds = _Folds(
        cfg=cfg,
        files=np.array(metadata.image_paths()),
        targets=metadata.targets().astype(np.float64),
        groups=metadata.frame["group_id"].to_numpy(),
        genes=metadata.gene_names,
        fold_of=fold_of,
        folds_csv=folds_csv,
        runs_dir=out_dir / "runs",
        finetune=finetune,
        metadata=metadata if d.expression_file else None,
    )
    folds.inputs = _shared_inputs(cfg, methods, list(folds.files))
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for k in range(n_folds):
        _score_fold(folds, k, methods, results)
    genes = folds.genes if folds.metadata is None else _genes_in_every_fold(folds.fold_genes)
    summary = summarise(results, genes, recipe_name, str(folds_csv), cfg.seed)
    if folds.metadata is not None:
        summary["gene_selection"] = _gene_selection(cfg, folds.fold_genes, genes)
    write_json(out_dir / "cv_summary.json", summary)
    atomic_write_text(out_dir / "cv_summary.md", render_markdown(summary))
    return summary


def _write_folds(metadata, n_folds: int | None, seed: int, out_dir: Path) -> tuple[int, Path, np.ndarray]:
    """Group k-fold (leave-one-group-out up to 10 groups by default) -> ``out_dir/folds.csv``.

    Returns:
        ``(n_folds, folds.csv path, the fold of each metadata row)``.
    """
    groups = metadata.frame["group_id"].to_numpy()
    n_groups = len(set(groups.tolist()))
    n_folds = n_folds or (n_groups if n_groups <= 10 else 5)
    table, fold_summary = make_fold_table(metadata, n_folds, seed)
    out_dir.mkdir(parents=True, exist_ok=False)
    folds_csv = write_table(table, out_dir / "folds.csv")
    print(
        f"{n_folds} group folds of {len(groups)} samples in {n_groups} groups -> {folds_csv}\n{fold_summary.format()}"
    )
    return n_folds, folds_csv, table.set_index("path").loc[metadata.frame["path"], "fold"].to_numpy()


def _score_fold(folds: _Folds, k: int, methods: list[str], results: dict[str, list[dict]]) -> None:
    """Every method with fold ``k`` held out: appended to ``results[method]``, one printed line each."""
    test, train = folds.fold_of == k, folds.fold_of != k
    test_groups = sorted(set(folds.groups[test].tolist()))
    cfg, targets, genes = _fold_targets(folds, k, train)
    for method in methods:
        start = time.perf_counter()
        if method == "finetune":
            test_files = (list(folds.files[test]), targets[test])
            summary, per_gene, extra = folds.finetune(cfg, folds.folds_csv, k, folds.runs_dir, test_files, genes)
        else:
            summary, per_gene, extra = _fit_baseline(folds, method, train, test, targets, genes)
        shared = folds.inputs.get(f"{method}_seconds", 0.0)
        seconds = time.perf_counter() - start + shared * test.mean()  # this fold's share of the extraction
        results[method].append(
            {"fold": k, "test_groups": test_groups, **_fold_result(summary, per_gene, seconds, extra)}
        )
        print(f"fold {k} ({', '.join(test_groups)}) {method}: {_describe(summary)} [{seconds:.0f} s]")


def _fit_baseline(folds: _Folds, method: str, train, test, targets: np.ndarray, genes: list[str]):
    """Fit a baseline on the training rows, score it on the test rows: ``(summary, per-gene Spearman, extra)``."""
    x, fit = folds.inputs[method]
    cfg, groups = folds.cfg, folds.groups
    predictions, extra = fit(x[train], targets[train], groups[train], x[test], seed=cfg.seed)
    metrics = compute_metrics(predictions, targets[test], genes)
    return metrics.summary, {r["gene"]: r["spearman"] for r in metrics.per_gene_rows()}, extra


def _fold_targets(folds: _Folds, k: int, fit: np.ndarray) -> tuple[RunConfig, np.ndarray, list[str]]:
    """The recipe, targets and genes of fold ``k``: the shared ones, or (``data.expression_file``) genes
    chosen on the fold's fit rows only (never its held-out groups), written to ``genes_fold<k>.txt``
    and given to every method of the fold (the fine-tuning run reads that list)."""
    if folds.metadata is None:
        return folds.cfg, folds.targets, folds.genes
    from expreg.data import expression_targets

    d = folds.cfg.data
    table, choice = expression_targets(
        folds.metadata,
        d.expression_file,
        fit,
        d.genes,
        min_detection=d.min_gene_detection,
        transform=d.target_transform,
    )
    genes_file = folds.folds_csv.parent / f"genes_fold{k}.txt"
    atomic_write_text(genes_file, "\n".join(choice.genes) + "\n")
    write_json(genes_file.with_suffix(".json"), {**choice.record(), "fold": k})
    folds.fold_genes[k] = list(choice.genes)
    print(f"fold {k}: {choice.describe()} -> {genes_file.name}")
    cfg = replace(folds.cfg, data=replace(d, genes=str(genes_file)))
    return cfg, table.targets().astype(np.float64), list(choice.genes)


def _genes_in_every_fold(fold_genes: dict) -> list[str]:
    """The genes chosen in every fold, in the first fold's order (the per-gene summaries cover these)."""
    lists = list(fold_genes.values())
    common = set(lists[0]).intersection(*lists[1:]) if lists else set()
    return [g for g in (lists[0] if lists else []) if g in common]


def _gene_selection(cfg, fold_genes: dict, common: list[str]) -> dict:
    d = cfg.data
    return {
        "expression_file": d.expression_file,
        "genes": d.genes,
        "target_transform": d.target_transform,
        "min_gene_detection": d.min_gene_detection,
        "per_fold": {str(k): len(g) for k, g in fold_genes.items()},
        "in_every_fold": len(common),
    }


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
    spearman, pearson = (fmt_float(summary[k], missing=UNDEFINED) for k in ("spearman_mean", "pearson_mean"))
    return f"held-out mean Spearman {spearman} | mean Pearson {pearson} | {summary['num_samples']} samples"


def summarise(results: dict[str, list[dict]], genes: list[str], recipe: str, folds_csv: str, seed: int) -> dict:
    methods = {}
    for method, folds in results.items():
        s_mean, s_std = mean_std([f["spearman_mean"] for f in folds])
        p_mean, p_std = mean_std([f["pearson_mean"] for f in folds])
        per_gene = {g: mean_std([f["per_gene_spearman"][g] for f in folds])[0] for g in genes}
        methods[method] = {
            "spearman_mean": s_mean,
            "spearman_std": s_std,
            "pearson_mean": p_mean,
            "pearson_std": p_std,
            "seconds_total": round(sum(f["seconds"] for f in folds), 1),
            "per_gene_spearman_mean": per_gene,
            "folds": folds,
        }
    return {
        "recipe": recipe,
        "folds_csv": folds_csv,
        "folds_csv_sha256": file_sha256(folds_csv),
        "seed": seed,
        "methods": methods,
    }


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
                f"| {fmt_float(f['spearman_mean'], missing=UNDEFINED)} | {fmt_float(f['pearson_mean'], missing=UNDEFINED)} | {f['seconds']:.0f} |"
            )
    lines += [
        "",
        "| method | mean Spearman (mean ± std over folds) | mean Pearson | total time (s) |",
        "|---|---|---|---|",
    ]
    for method, m in methods.items():
        spearman = fmt_mean_std(m["spearman_mean"], m["spearman_std"], UNDEFINED)
        pearson = fmt_mean_std(m["pearson_mean"], m["pearson_std"], UNDEFINED)
        lines.append(f"| {method} | {spearman} | {pearson} | {m['seconds_total']:.0f} |")
    if "finetune" in methods:
        tta = mean_std([f["tta_spearman_mean"] for f in methods["finetune"]["folds"]])[0]
        plain = methods["finetune"]["spearman_mean"]
        if tta is not None and plain is not None:
            lines += [
                "",
                f"Test-time augmentation (mean over the 8 dihedral views) for `finetune`: mean Spearman "
                f"{tta:.4f} vs {plain:.4f} without ({tta - plain:+.4f}).",
            ]
    if "mean" in methods:
        lines += ["", "The `mean` predictor is constant, so its correlations are undefined for every gene."]
    if "gene_selection" in summary:
        g = summary["gene_selection"]
        lines += [
            "",
            f"Genes: chosen in each fold on its training groups only ({g['genes']}, {g['target_transform']} values, "
            f"detected in >= {g['min_gene_detection']:g} of the training spots; lists in genes_fold<k>.txt); "
            f"{g['in_every_fold']} genes were chosen in every fold: the per-gene means cover those.",
        ]
    for method, m in methods.items():
        ranked = sorted(((g, v) for g, v in m["per_gene_spearman_mean"].items() if v is not None), key=lambda x: -x[1])
        if ranked:
            best = ", ".join(f"{g} {v:.3f}" for g, v in ranked[:5])
            worst = ", ".join(f"{g} {v:.3f}" for g, v in ranked[-5:])
            lines += ["", f"**{method}**, per-gene Spearman averaged over folds: best {best}; worst {worst}."]
    return "\n".join(lines) + "\n"

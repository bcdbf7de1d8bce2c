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
- ``frozen`` (asked for by name; not in the default list): the same training run with
  ``train.mode=frozen`` (the head trained on cached embeddings of the recipe's encoder; colour and
  stain jitter are turned off for it, since cached embeddings cannot be jittered); no TTA. With a
  ``model.context=neighbourhood`` recipe (and ``train.mode=frozen``) the head reads each spot beside
  its neighbourhood's mean embedding;
- ``linear_probe``: as in HEST-Benchmark, frozen embeddings of the recipe's backbone (its
  pretrained or local weights when the recipe asks for them, else random init) -> standardise ->
  PCA (256 or fewer components) -> ridge (strength by an inner group k-fold), all fitted on the
  training groups;
- ``linear_probe_hest`` (added whenever ``linear_probe`` is asked for, or alone): HEST-Benchmark's
  own probe (``expreg.evaluation.hest_probe``: StandardScaler -> PCA(256) -> ``Ridge(alpha=100 /
  (components x genes), fit_intercept=False, solver="lsqr")``) on the same embeddings and folds,
  so HEST's numbers can be reproduced beside expreg's probe (the embedding time counts in both);
- ``linear_probe_neighbourhood`` (asked for by name): ``linear_probe`` on each spot's embedding beside
  the mean embedding of the spots of its own section within ``data.neighbourhood_um`` (default: one
  ring of the spot lattice), itself included (``expreg.data.neighbours``). Images only, never
  targets; a section belongs to one patient, so a neighbourhood never reaches into another fold;
- ``ridge``: ridge regression on 62 colour/texture features per patch, the ridge strength
  chosen by an inner group k-fold on the training groups;
- ``mean``: the training mean (its correlations are undefined, reported as such);
- ``depth_oracle`` (asked for by name; needs each spot's library size: ``data.expression_file`` or a
  ``library_size`` column): every gene predicted by the held-out spot's measured log library size.
  A diagnostic that uses measured data, never a competitor: a method that does not beat it on
  the raw score has learned depth, not genes. Every method's depth-adjusted score and the oracle
  are in the summary anyway;
- ``depth_from_image`` (asked for by name; needs the library sizes too): the recipe trained to
  predict only each spot's log library size from its image (one output, its own run directories
  under ``depth_from_image/runs/``), broadcast to every gene. A gene-level method that does not
  beat it has learned depth, not genes (``expreg.evaluation.depth``).

Written to ``--out_dir`` (default ``<logging.output_dir>/cv__<recipe>__<timestamp>``):
``folds.csv``, the fine-tuning run directories under ``runs/``, and ``cv_summary.json`` /
``cv_summary.md`` (per fold, mean ± std of mean Spearman and mean Pearson per method, the time
each took, and per-gene mean Spearman across folds).

With ``hest_task`` (``--hest_task bench_data/IDC``), the data, the folds and the targets are a
HEST-Benchmark task's (``expreg.ingest.hest_bench``: materialised once into the cache; fold k
holds out ``splits/test_<k>.csv``; the group of a row is its test split's samples joined with
``+``); its genes were chosen by HEST-Benchmark on all samples, held-out ones included, which the
summary and the printed output say.

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
from expreg.data import read_recipe_metadata, resolve_metadata_csv
from expreg.data.dataset import require_context_paths
from expreg.data.metadata import CONTEXT_COLUMN
from expreg.data.neighbours import spot_positions
from expreg.data.splits import make_fold_table, write_table
from expreg.evaluation.cv_inputs import NEIGHBOURHOOD_PROBE, PROBES, probe_embeddings, shared_inputs  # noqa: F401 - re-exported
from expreg.evaluation.cv_report import UNDEFINED, describe, render_markdown, summarise  # noqa: F401 - re-exported
from expreg.evaluation.depth import (
    DEPTH_FROM_IMAGE,
    DEPTH_ORACLE,
    depth_from_image_fold,
    frame_library_size,
)
from expreg.evaluation.hest_probe import PROBE_NAME, std_ddof0
from expreg.evaluation.metrics import compute_metrics
from expreg.run_dir import atomic_write_text, write_json

METHODS = (
    "finetune",
    "frozen",
    "linear_probe",
    "linear_probe_hest",
    "linear_probe_neighbourhood",
    "ridge",
    "mean",
    "depth_oracle",
    "depth_from_image",
)
DEFAULT_METHODS = ("finetune", "linear_probe", "linear_probe_hest", "ridge", "mean")
TRAINED = ("finetune", "frozen")  # methods that are training runs (expreg.training.folds.finetune_fold)
HEST_PROBE = PROBE_NAME

# finetune(cfg, folds_csv, fold, runs_dir, (test files, test targets), genes, mode=...) -> (summary, per-gene
# Spearman, extra); mode is "finetune" or "frozen" (train.mode of the fold run)
FineTune = Callable[..., tuple[dict, dict, dict]]


def parse_methods(text: str, hest_probe: bool = True) -> list[str]:
    """``"finetune,ridge"`` -> ``["finetune", "ridge"]``; ``ConfigError`` for an unknown method or none.

    ``linear_probe`` brings ``linear_probe_hest`` with it (HEST-Benchmark's probe on the same embeddings),
    unless ``hest_probe`` is False (``data.allow_unmeasured_genes``: HEST's probe cannot leave targets out).
    """
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(
            f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}"
        )
    if hest_probe and "linear_probe" in methods and HEST_PROBE not in methods:
        methods.insert(methods.index("linear_probe") + 1, HEST_PROBE)
    return methods


def check_config(cfg, methods: list[str], hest_task: str | None = None, n_folds: int | None = None) -> None:
    """``ConfigError`` when the recipe (or ``--n_folds``) sets what cross-validation (or the HEST task) decides."""
    if cfg.data.split_csv is not None or cfg.data.fold is not None:
        raise ConfigError("expreg.cv makes its own group folds: do not set data.split_csv or data.fold")
    if cfg.train.stop_after_steps is not None and {*TRAINED, DEPTH_FROM_IMAGE} & set(methods):
        raise ConfigError("train.stop_after_steps: every fold of expreg.cv trains to the end; unset it")
    if hest_task is not None and n_folds is not None:
        raise ConfigError("--n_folds: a HEST-Benchmark task brings its own folds (splits/test_<i>.csv); drop it")
    if hest_task is not None and cfg.data.expression_file is not None:
        raise ConfigError(
            "--hest_task: the task gives the targets (log1p of its counts for its genes); "
            "unset data.expression_file and data.genes (data.prepared=null for a recipe that names a prepared folder)"
        )
    if cfg.data.allow_unmeasured_genes and HEST_PROBE in methods:
        raise ConfigError(
            f"--methods {HEST_PROBE}: HEST-Benchmark's probe fits every gene on every row and cannot leave out the "
            "targets data.allow_unmeasured_genes masks; use linear_probe (expreg's probe, which does)"
        )
    if hest_task is not None and {DEPTH_ORACLE, DEPTH_FROM_IMAGE} & set(methods):
        raise ConfigError(
            "--hest_task: a HEST-Benchmark task gives no spot library sizes, which depth_oracle and depth_from_image "
            "need; run them on an expreg.prepare output of the same samples"
        )
    if cfg.model.context == "multiscale" and {"frozen", DEPTH_FROM_IMAGE} & set(methods):
        raise ConfigError(
            "model.context=multiscale: frozen and depth_from_image train on single patches; run them in a second "
            "expreg.cv with model.context=none (the same seed and groups give the same folds)"
        )
    if cfg.model.context == "neighbourhood" and {"finetune", DEPTH_FROM_IMAGE} & set(methods):
        raise ConfigError(
            "model.context=neighbourhood trains heads on cached embeddings (--methods frozen); finetune and "
            "depth_from_image train encoders on single patches: run them in a second expreg.cv with model.context=none "
            "(the same seed and groups give the same folds)"
        )
    _check_encoder_folder(cfg)


def _check_encoder_folder(cfg) -> None:
    """A local encoder folder that is not one fails now, before anything is written (``ModelError``)."""
    from expreg.modeling.encoders import check_local_encoder

    check_local_encoder(cfg.model.backbone, cfg.model.pretrained_path)


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
    library_size: np.ndarray | None = None  # each row's total raw count, when known (depth-adjusted scores)
    contexts: np.ndarray | None = None  # model.context=multiscale: each row's context patch (the TTA reads both)
    n_folds: int = 0


def _check_depth_methods(cfg, methods: list[str], metadata) -> None:
    """The depth baselines need each spot's library size."""
    asked = [m for m in (DEPTH_ORACLE, DEPTH_FROM_IMAGE) if m in methods]
    if asked and not cfg.data.expression_file and _unknown_depth(metadata.frame):
        raise ConfigError(
            f"--methods {','.join(asked)}: needs each spot's library size: data.expression_file (raw counts) or a "
            f"library_size column in {metadata.csv_path} with a value in every row"
        )


def _unknown_depth(frame) -> bool:
    sizes = frame_library_size(frame)
    return sizes is None or not np.isfinite(sizes).all()


def _fold_result(summary: dict, per_gene_spearman: dict, seconds: float, extra: dict | None = None) -> dict:
    """One method's held-out result on one fold (``summary``: a ``Metrics.summary`` or the same keys)."""
    return {
        "spearman_mean": summary["spearman_mean"],
        "pearson_mean": summary["pearson_mean"],
        "spearman_depth_adjusted_mean": summary.get("spearman_depth_adjusted_mean"),
        "pearson_depth_adjusted_mean": summary.get("pearson_depth_adjusted_mean"),
        "depth_oracle_spearman_mean": summary.get("depth_oracle_spearman_mean"),
        "num_genes_undefined_spearman": summary["num_genes_undefined_spearman"],
        "num_test_samples": summary["num_samples"],
        "seconds": round(seconds, 1),
        "per_gene_spearman": per_gene_spearman,
        **(extra or {}),
    }


def cross_validate(
    cfg,
    recipe_name: str,
    n_folds: int | None,
    methods: list[str],
    out_dir: Path,
    finetune: FineTune | None = None,
    hest_task: str | None = None,
    accelerator=None,
) -> dict:
    """Run every method on every fold; returns the summary (also written to ``out_dir``).

    ``finetune`` trains and scores one fold (``expreg.training.folds.finetune_fold`` bound to an
    accelerator); it is needed when ``methods`` holds ``"finetune"``. ``hest_task``: a
    HEST-Benchmark task folder whose samples, folds and targets replace the recipe's data (see the
    module docstring). Deterministic: the same recipe, seed and data give the same numbers (every
    random step is seeded from ``cfg.seed``, the randomly initialised backbone of the linear probe
    included).
    """
    if {*TRAINED, DEPTH_FROM_IMAGE} & set(methods) and finetune is None:
        raise ConfigError(
            "cross_validate: methods finetune, frozen and depth_from_image need finetune= "
            "(expreg.training.folds.finetune_fold)"
        )
    cfg, folds, task = _prepare_folds(cfg, hest_task, n_folds, methods, out_dir, finetune, accelerator)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for k in range(folds.n_folds):
        _score_fold(folds, k, methods, results)
    genes = folds.genes if folds.metadata is None else _genes_in_every_fold(folds.fold_genes)
    summary = summarise(results, genes, recipe_name, str(folds.folds_csv), cfg.seed)
    if folds.metadata is not None:
        summary["gene_selection"] = _gene_selection(cfg, folds.fold_genes, genes)
    if task is not None:
        summary["hest_task"] = task.record()
    _add_hest_spread(summary)
    write_json(out_dir / "cv_summary.json", summary)
    atomic_write_text(out_dir / "cv_summary.md", render_markdown(summary))
    return summary


def _prepare_folds(cfg, hest_task, n_folds, methods, out_dir: Path, finetune, accelerator):
    """``(cfg, folds, task)``: the data read and checked (bad input fails before ``out_dir`` exists), the folds
    written, the shared inputs computed. What is kept of the table holds no Python object per row: the paths
    as a ``RowPaths`` view of the memory-mapped CSV (each fold run maps the same table again for free), one
    string per group (``benchmarks/bench_cohort.py --parts rss``)."""
    cfg, metadata, task = _read_data(cfg, hest_task)
    _check_depth_methods(cfg, methods, metadata)
    if cfg.model.context == "multiscale":  # errors now, before out_dir exists
        require_context_paths(metadata)
    if NEIGHBOURHOOD_PROBE in methods:  # before out_dir exists
        spot_positions(metadata)
    if task is None:
        n_folds, folds_csv, fold_of = _write_folds(metadata, n_folds, cfg.seed, out_dir)
        targets = metadata.targets()  # float32, as the CSV's numbers reach training; float64 fold by fold
    else:
        n_folds, folds_csv, fold_of = _write_task_folds(metadata, task, out_dir)
        # the float64 values as written (log1p of the counts, as HEST computes them), not Metadata's float32
        targets = metadata.frame[metadata.target_columns].to_numpy(dtype=np.float64)
    import pandas as pd

    codes, names = pd.factorize(metadata.frame["group_id"], sort=True)
    folds = _Folds(
        cfg=cfg,
        files=metadata.path_rows(),  # made when read: no Python string per row held through the folds
        targets=targets,
        groups=np.asarray(names, dtype=object)[codes],  # one string per group, referred to from each row
        genes=metadata.gene_names,
        fold_of=fold_of,
        folds_csv=folds_csv,
        runs_dir=out_dir / "runs",
        finetune=finetune,
        metadata=metadata if cfg.data.expression_file else None,
        library_size=frame_library_size(metadata.frame),
        contexts=metadata.path_rows(CONTEXT_COLUMN) if cfg.model.context == "multiscale" else None,
        n_folds=n_folds,
    )
    folds.inputs = shared_inputs(cfg, methods, folds.files, accelerator, metadata)
    return cfg, folds, task


def _add_hest_spread(summary: dict) -> None:
    """HEST-Benchmark's own spread beside its probe: np.std over splits (ddof=0)."""
    if HEST_PROBE in summary["methods"]:
        hest = summary["methods"][HEST_PROBE]
        hest["pearson_std_ddof0"] = std_ddof0([f["pearson_mean"] for f in hest["folds"]])


def _read_data(cfg, hest_task: str | None):
    """``(cfg, metadata, materialised task or None)``: the recipe's data, or the HEST task's in its place.

    Bad input (metadata, expression file, task folder) fails here, before ``out_dir`` exists.
    """
    task = None
    if hest_task is not None:
        from expreg.ingest.hest_bench import materialise_task

        task = materialise_task(hest_task)
        t = task.task
        print(
            f"HEST-Benchmark task {t.name}: {len(t.samples)} samples, {len(t.splits)} folds (splits/test_<i>.csv), "
            f"{len(t.genes)} genes ({t.gene_file.name}); {'reusing' if task.reused else 'built'} {task.folder}\n"
            f"NOTE: {task.record()['gene_leak']}"
        )
        data = replace(cfg.data, metadata_csv=str(task.metadata_csv), gene_names_file=str(task.genes_file))
        cfg = replace(cfg, data=replace(data, num_genes=None))
    cfg = replace(cfg, data=replace(cfg.data, metadata_csv=resolve_metadata_csv(cfg.data.metadata_csv)))
    d = cfg.data
    metadata = read_recipe_metadata(d)
    if d.expression_file:  # bad expression input fails here, before out_dir exists (the choice is discarded)
        from expreg.data import expression_targets

        expression_targets(
            metadata,
            d.expression_file,
            np.ones(len(metadata.frame), bool),
            d.genes,
            min_detection=d.min_gene_detection,
            transform=d.target_transform,
            allow_unmeasured=d.allow_unmeasured_genes,
        )
    return cfg, metadata, task


def _write_task_folds(metadata, task, out_dir: Path) -> tuple[int, Path, np.ndarray]:
    """The HEST task's folds (fold k holds out ``splits/test_<k>.csv``) -> ``out_dir/folds.csv``."""
    import pandas as pd

    table = pd.read_csv(task.folds_csv, dtype=str, keep_default_na=False)
    table["fold"] = table["fold"].astype(int)
    out_dir.mkdir(parents=True, exist_ok=False)
    folds_csv = write_table(table, out_dir / "folds.csv")
    lines = [f"{len(task.task.splits)} folds of HEST-Benchmark task {task.task.name} -> {folds_csv}"]
    for k, (_, test_csv) in enumerate(task.task.splits):
        rows = table["fold"] == k
        lines.append(
            f"  fold {k}: held out {table.loc[rows, 'group_id'].iloc[0]} ({int(rows.sum())} patches, {test_csv.name})"
        )
    print("\n".join(lines))
    return len(task.task.splits), folds_csv, table.set_index("path").loc[metadata.frame["path"], "fold"].to_numpy()


def _write_folds(metadata, n_folds: int | None, seed: int, out_dir: Path) -> tuple[int, Path, np.ndarray]:
    """Group k-fold (leave-one-group-out up to 10 groups by default) -> ``out_dir/folds.csv``.

    Returns:
        ``(n_folds, folds.csv path, the fold of each metadata row)``.
    """
    n_groups = metadata.frame["group_id"].nunique()
    n_folds = n_folds or (n_groups if n_groups <= 10 else 5)
    table, fold_summary = make_fold_table(metadata, n_folds, seed)
    out_dir.mkdir(parents=True, exist_ok=False)
    folds_csv = write_table(table, out_dir / "folds.csv")
    print(
        f"{n_folds} group folds of {len(metadata.frame)} samples in {n_groups} groups -> {folds_csv}\n"
        f"{fold_summary.format()}"
    )
    fold_of_group = table.drop_duplicates("group_id").set_index("group_id")["fold"]  # whole groups are folded
    return n_folds, folds_csv, metadata.frame["group_id"].map(fold_of_group).to_numpy(dtype=np.int64)


def _score_fold(folds: _Folds, k: int, methods: list[str], results: dict[str, list[dict]]) -> None:
    """Every method with fold ``k`` held out: appended to ``results[method]``, one printed line each."""
    test, train = folds.fold_of == k, folds.fold_of != k
    test_groups = sorted(set(folds.groups[test].tolist()))
    cfg, targets, genes = _fold_targets(folds, k, train)
    for method in methods:
        start = time.perf_counter()
        if method in TRAINED:
            summary, per_gene, extra = folds.finetune(
                cfg, folds.folds_csv, k, folds.runs_dir, _held_out(folds, test, targets), genes, mode=method
            )
        elif method == DEPTH_FROM_IMAGE:
            rows = (folds.files, folds.groups, folds.fold_of)
            work = folds.runs_dir.parent / DEPTH_FROM_IMAGE
            summary, per_gene, extra = depth_from_image_fold(
                folds.finetune, cfg, k, work, rows, test, targets[test].astype(np.float64), genes, folds.library_size
            )
        else:
            summary, per_gene, extra = _fit_baseline(folds, method, train, test, targets, genes)
        shared = folds.inputs.get(f"{method}_seconds", 0.0)
        seconds = time.perf_counter() - start + shared * test.mean()  # this fold's share of the extraction
        results[method].append(
            {"fold": k, "test_groups": test_groups, **_fold_result(summary, per_gene, seconds, extra)}
        )
        print(f"fold {k} ({', '.join(test_groups)}) {method}: {describe(summary)} [{seconds:.0f} s]")


def _held_out(folds: _Folds, test: np.ndarray, targets: np.ndarray):
    """A function giving ``(image paths, float64 targets)`` of the held-out rows, for the 8-view TTA score: made
    only when that score is computed (a cohort's held-out fold is 200,000 paths, each a Python string)."""

    def made() -> tuple[list, np.ndarray]:
        files = folds.files[test] if folds.contexts is None else zip(folds.files[test], folds.contexts[test])
        return list(files), targets[test].astype(np.float64)

    return made


def _fit_baseline(folds: _Folds, method: str, train, test, targets: np.ndarray, genes: list[str]):
    """Fit a baseline on the training rows, score it on the test rows: ``(summary, per-gene Spearman, extra)``."""
    x, fit = folds.inputs[method]
    cfg, groups = folds.cfg, folds.groups
    if method == DEPTH_ORACLE:  # the input is each spot's measured library size, known once the fold's table is
        x = folds.library_size[:, None]
    y_train = np.asarray(targets[train], dtype=np.float64)
    predictions, extra = fit(x[train], y_train, groups[train], x[test], seed=cfg.seed)
    del y_train  # rows x genes float64: not held while the test rows are scored
    # float32 or float64 as the targets are: compute_metrics converts a block of genes at a time
    y_test = targets[test]
    depth = folds.library_size[test] if folds.library_size is not None else None
    metrics = compute_metrics(predictions, y_test, genes, cfg.data.allow_unmeasured_genes, depth)
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
        allow_unmeasured=d.allow_unmeasured_genes,
    )
    genes_file = folds.folds_csv.parent / f"genes_fold{k}.txt"
    atomic_write_text(genes_file, "\n".join(choice.genes) + "\n")
    write_json(genes_file.with_suffix(".json"), {**choice.record(), "fold": k})
    folds.fold_genes[k] = list(choice.genes)
    print(f"fold {k}: {choice.describe()} -> {genes_file.name}")
    cfg = replace(folds.cfg, data=replace(d, genes=str(genes_file)))
    folds.library_size = frame_library_size(table.frame)  # each spot's total over all its measured genes
    return cfg, table.targets(), list(choice.genes)


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

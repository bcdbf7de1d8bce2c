"""The two depth baselines of ``expreg.cv``: what a gene-level score must beat to be about genes.

- ``depth_oracle``: every gene "predicted" by the held-out spot's measured log library size. It
  uses measured data: a diagnostic, never a competitor.
- ``depth_from_image``: the recipe (same backbone, same training) trained to predict only the
  spot's log library size from its image, one output, its held-out predictions broadcast to every
  gene. A gene-level model that does not beat it has learned depth (cellularity), not genes.

The library size of a spot is its total raw count over all the genes it measured: from the
expression file (``data.expression_file``) or a ``library_size`` column of the metadata CSV.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np

from expreg.evaluation.metrics import compute_metrics

DEPTH_ORACLE = "depth_oracle"
DEPTH_FROM_IMAGE = "depth_from_image"
DEPTH_GENE = "log_library_size"  # the one "gene" of the depth_from_image runs


def depth_oracle_fit(x_train, y_train, groups_train, x_test, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Every gene "predicted" by the test spot's measured log library size (``x``: library sizes, one column):
    a diagnostic with the signature of the baselines; nothing is fitted."""
    predictions = np.repeat(np.log1p(np.asarray(x_test, dtype=np.float64)[:, :1]), y_train.shape[1], axis=1)
    return predictions, {"uses": "the held-out spots' measured library sizes (a diagnostic, not a model)"}


def frame_library_size(frame) -> np.ndarray | None:
    """The ``library_size`` column of a metadata table as floats (NaN where empty), or None without one."""
    import pandas as pd

    from expreg.data.metadata import library_size_values

    if "library_size" not in frame.columns:
        return None
    fast = library_size_values(frame)  # Arrow: no Python object per cell
    if fast is not None:
        return fast
    return pd.to_numeric(frame["library_size"].replace("", "nan"), errors="coerce").to_numpy(dtype=np.float64)


def depth_tables(folder: Path, files, groups, fold_of, library_size) -> tuple[Path, Path]:
    """``metadata.csv`` (absolute image paths, ``y0`` = log1p library size), ``genes.txt`` and ``folds.csv``
    of the depth-from-image runs, written once into ``folder``."""
    import pandas as pd

    metadata_csv, folds_csv = folder / "metadata.csv", folder / "folds.csv"
    if metadata_csv.is_file():
        return metadata_csv, folds_csv
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"path": list(files), "group_id": list(groups), "y0": np.log1p(library_size)})
    frame.to_csv(metadata_csv, index=False)
    (folder / "genes.txt").write_text(DEPTH_GENE + "\n")
    frame[["path", "group_id"]].assign(fold=np.asarray(fold_of, dtype=int)).to_csv(folds_csv, index=False)
    return metadata_csv, folds_csv


def depth_from_image_fold(finetune, cfg, k: int, work: Path, rows, test, targets_test, genes, library_size):
    """Train the recipe on log library size with fold ``k`` held out; score its held-out predictions, broadcast
    to every gene, against the genes' targets: ``(summary, per-gene Spearman, extra)`` as the other methods.

    Args:
        finetune: ``expreg.training.folds.finetune_fold`` bound to the accelerator.
        cfg: The recipe.
        work: ``<out_dir>/depth_from_image``: its tables and ``runs/finetune__fold<k>``.
        rows: ``(image paths (absolute; a sequence indexed by a row mask), groups, fold of each row)`` of every row.
        test: Which rows fold ``k`` holds out.
        targets_test, genes: The held-out rows' gene targets and their names.
        library_size: Every row's library size.
    """
    import pandas as pd

    files, groups, fold_of = rows
    metadata_csv, folds_csv = depth_tables(work, files, groups, fold_of, library_size)
    data = replace(
        copy.deepcopy(cfg.data),
        metadata_csv=str(metadata_csv),
        gene_names_file=str(work / "genes.txt"),
        num_genes=None,
        expression_file=None,
        genes=None,
        allow_unmeasured_genes=False,
    )
    test_files = list(files[test])
    depth_cfg = replace(cfg, data=data)  # the recipe's own training (its train.mode), no 8-view TTA
    mode = cfg.train.mode if cfg.train.mode in ("finetune", "frozen") else "finetune"
    depth_summary, _, extra = finetune(
        depth_cfg,
        folds_csv,
        k,
        work / "runs",
        lambda: (test_files, np.log1p(library_size[test])[:, None]),
        [DEPTH_GENE],
        mode=mode,
        tta=False,
    )
    predictions_csv = work / "runs" / f"{mode}__fold{k}" / "predictions_test.csv"
    predicted = pd.read_csv(predictions_csv, float_precision="round_trip").set_index("path")
    column = predicted.loc[test_files, DEPTH_GENE].to_numpy(dtype=np.float64)
    predictions = np.repeat(column[:, None], len(genes), axis=1)
    allow = cfg.data.allow_unmeasured_genes
    metrics = compute_metrics(predictions, targets_test, genes, allow, library_size[test])
    extra = {
        "depth_spearman": depth_summary["spearman_mean"],  # how well the image predicts the held-out depth
        **{key: extra[key] for key in ("fit_groups", "num_fit_samples", "best_epoch") if key in extra},
    }
    return metrics.summary, {r["gene"]: r["spearman"] for r in metrics.per_gene_rows()}, extra

"""The ``finetune`` method of cross-validation: one training run per fold, scored on its held-out fold.

``expreg.evaluation.cv.cross_validate`` is given it bound to the command's accelerator,
``functools.partial(finetune_fold, accelerator=accelerator)``, so evaluation never imports training.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from expreg.evaluation.metrics import compute_metrics
from expreg.inference import predict_files
from expreg.modeling.model import ExpRegModel
from expreg.run_dir import SPLIT_SUMMARY_FILE
from expreg.training.interrupts import TrainingError
from expreg.training.trainer import run


def finetune_fold(
    cfg, folds_csv: Path, fold: int, runs_dir: Path, held_out, genes, *, accelerator, mode="finetune", tta=True
):
    """Train with ``fold`` held out; the run scores its best model on the fold (``metrics.json``'s ``test_*``).

    ``mode="frozen"``: the run trains only the head on cached embeddings (``train.mode=frozen``; the
    recipe's colour and stain jitter, which cannot apply to cached embeddings, are turned off for it),
    and the 8-view TTA score is left out (it would run the whole encoder 8 times per image).

    Args:
        cfg: The recipe (not changed: the fold run gets a copy pointing at ``folds_csv`` and ``fold``).
        held_out: A function giving ``(image paths, targets)`` of the held-out fold, for the 8-view TTA score
            (called only for that score).
        genes: The gene names (columns of the targets).
        accelerator: The recipe's ``Accelerator`` (``expreg.training.launch.build_accelerator``).

    Returns:
        ``(summary, per-gene Spearman of the held-out fold, extra)``, taken from what the fold run
        returns, so ``cv_summary.json`` and the run's ``metrics.json`` hold the same numbers.
    """
    fold_cfg = copy.deepcopy(cfg)
    fold_cfg.data.split_csv, fold_cfg.data.fold = str(folds_csv), fold
    fold_cfg.logging.output_dir, fold_cfg.logging.run_name = str(runs_dir), f"{mode}__fold{fold}"
    fold_cfg.train.mode = mode
    if mode == "frozen":
        fold_cfg.data.color_jitter = fold_cfg.data.hed_jitter = 0.0
    result = run(fold_cfg, accelerator)
    accelerator.free_memory()
    run_dir = runs_dir / f"{mode}__fold{fold}"
    if result["status"] != "finished" or "test_spearman_mean" not in result:
        raise TrainingError(f"{run_dir}: the fold run ended with status {result['status']!r}, without held-out scores")
    summary = {
        "spearman_mean": result["test_spearman_mean"],
        "pearson_mean": result["test_pearson_mean"],
        "spearman_depth_adjusted_mean": result.get("test_spearman_depth_adjusted_mean"),
        "pearson_depth_adjusted_mean": result.get("test_pearson_depth_adjusted_mean"),
        "depth_oracle_spearman_mean": result.get("test_depth_oracle_spearman_mean"),
        "num_genes_undefined_spearman": result["num_genes_undefined_test_spearman"],
        "num_samples": result["num_test_samples"],
    }
    tta = _tta_metrics(cfg, run_dir, held_out(), genes, accelerator) if mode == "finetune" and tta else None
    used = json.loads((run_dir / SPLIT_SUMMARY_FILE).read_text())
    extra = {
        "fit_groups": sorted(set(used["train"]["groups"]) | set(used["validation"]["groups"])),  # training + selection
        "num_fit_samples": used["train"]["samples"] + used["validation"]["samples"],
        "best_epoch": result["best_epoch"],
        "best_val_spearman_mean": result["best_val_spearman_mean"],  # model selection, not a held-out score
    }
    if tta is not None:  # the same model, averaged over the 8 dihedral views
        extra.update(tta_spearman_mean=tta.spearman_mean, tta_pearson_mean=tta.pearson_mean)
    return summary, result["test_per_gene_spearman"], extra


def _tta_metrics(cfg, run_dir: Path, test_files, genes, accelerator):
    """The fold run's best model on the held-out fold, each prediction averaged over the 8 dihedral views."""
    model = ExpRegModel.from_pretrained(run_dir / "checkpoints" / "best")
    batch_size = cfg.data.eval_batch_size or cfg.data.batch_size
    files, targets = test_files
    with_tta = predict_files(model, files, accelerator, batch_size, cfg.data.num_workers, tta=True)
    accelerator.free_memory()
    return compute_metrics(with_tta, targets, genes, cfg.data.allow_unmeasured_genes)

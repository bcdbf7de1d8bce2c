"""The end of a run: ``metrics.json`` at every stage, the saved best model reloaded and scored in fp32 on
validation and any test split (through ``expreg.inference``), the final prediction files, model card,
plots and the optional Hub push.

Functions here take the ``Trainer`` (``expreg.training.trainer``) whose run they report on and read
its ``cfg``, ``accelerator``, ``run_dir``, ``data`` and ``state``; they change only ``state``-free
outputs (files, the returned result).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from expreg.data.dataset import group_names, iter_strings, labels_array, library_sizes
from expreg.evaluation.metrics import compute_metrics
from expreg.evaluation.plots import write_run_plots
from expreg.inference import predict_loader
from expreg.modeling.hub import push_and_record
from expreg.modeling.model import ExpRegModel
from expreg.modeling.model_card import render_model_card
from expreg.run_dir import (
    METRICS_FILE,
    atomic_write_text,
    file_sha256,
    write_json,
    write_per_gene_metrics,
    write_predictions,
)
from expreg.training.interrupts import TrainingError

logger = logging.getLogger("expreg")
_RETURNED_ONLY = {"test_per_gene_spearman"}  # returned by run() (for expreg.cv), not in metrics.json
# beside every score: the depth-adjusted means and the depth oracle (None: the library size is unknown,
# or, for the adjusted ones, no gene has a defined partial correlation)
DEPTH_FIELDS = ("spearman_depth_adjusted_mean", "pearson_depth_adjusted_mean", "depth_oracle_spearman_mean")


def split_summary(datasets) -> dict:
    """The groups and sample counts of every split the run uses (what it was fitted and selected on)."""
    return {name: {"samples": len(part), "groups": group_names(part)} for name, part in datasets.items()}


def metrics_json(t, status: str) -> dict:
    """The content of ``metrics.json`` for ``status`` (``running``, ``stopped``, ``finished``, ...)."""
    cfg, accelerator, run_dir, state = t.cfg, t.accelerator, t.run_dir, t.state
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), None)
    return {
        "status": status,
        "run_name": run_dir.name,
        "split_csv": cfg.data.split_csv,
        "split_csv_sha256": file_sha256(cfg.data.split_csv),
        "fold": cfg.data.fold,
        "num_processes": accelerator.num_processes,
        "effective_batch_size": cfg.data.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes,
        "epochs_done": len(state.history),
        "best_epoch": state.best_epoch,
        "best_val_spearman_mean": best["val_spearman_mean"] if best else None,
        "best_val_pearson_mean": best["val_pearson_mean"] if best else None,
        "history": state.history,
    }


def write_status(t, status: str, error: str | None = None) -> None:
    """Record why a run ended early in ``metrics.json`` (never presented as finished)."""
    accelerator, run_dir = t.accelerator, t.run_dir
    if not accelerator.is_main_process:
        return
    result = metrics_json(t, status)
    if error:
        result["error"] = error
    try:
        write_json(run_dir / METRICS_FILE, result)
    except OSError as err:  # e.g. the disk is full: the original error matters more
        logger.error(f"could not write {run_dir / METRICS_FILE}: {err}")


def stopped(t) -> dict:
    """``train.stop_after_steps`` reached: ``metrics.json`` says ``stopped`` and how to continue."""
    accelerator, run_dir, state = t.accelerator, t.run_dir, t.state
    result = metrics_json(t, "stopped")
    if accelerator.is_main_process:
        write_json(run_dir / METRICS_FILE, result)
        logger.info(
            f"stopped after {state.global_step} optimizer steps (train.stop_after_steps); continue with: "
            f"accelerate launch run_regression.py --resume {run_dir / 'checkpoints' / 'last'}"
        )
    accelerator.wait_for_everyone()
    return result


def finish(t) -> dict:
    """Score the saved best model, plots, optional push to the Hub, then ``metrics.json`` (``finished``, last)."""
    accelerator, cfg, run_dir = t.accelerator, t.cfg, t.run_dir
    result = metrics_json(t, "finished")
    result["dry_run"] = t.dry_run
    scores = score_best(t, max_batches=2 if t.dry_run else None) if t.state.best_epoch else {}
    result.update(score_fields(scores, t.data.datasets))  # on every process: each returns the same numbers
    push_error = None
    if accelerator.is_main_process:
        if scores:
            record_scores(t, scores, result)
        if cfg.train.push_to_hub:
            push_error = push_and_record(run_dir, cfg.train.hub_model_id, result)
        write_json(run_dir / METRICS_FILE, {k: v for k, v in result.items() if k not in _RETURNED_ONLY})
        logger.info(f"run finished: {run_dir}")
    finish_trackers(accelerator)
    accelerator.wait_for_everyone()  # every process gets here before the main one reports a failed push
    if push_error is not None:
        raise push_error
    return result


def score_fields(scores: dict, datasets) -> dict:
    """The final scores as result fields: ``best_val_*`` and, with a test split, ``test_*``."""
    fields = {}
    if "validation" in scores:
        val = scores["validation"][1]
        fields.update(best_val_spearman_mean=val.spearman_mean, best_val_pearson_mean=val.pearson_mean)
        fields.update({f"best_val_{k}": val.summary[k] for k in DEPTH_FIELDS})
        if val.num_not_measured:  # data.allow_unmeasured_genes: targets left out of the scores
            fields["num_val_targets_not_measured"] = val.num_not_measured
    if "test" in scores:
        test = scores["test"][1]
        fields.update(
            test_spearman_mean=test.spearman_mean,
            test_pearson_mean=test.pearson_mean,
            num_test_samples=test.summary["num_samples"],
            num_genes_undefined_test_spearman=test.summary["num_genes_undefined_spearman"],
            test_groups=group_names(datasets["test"]),
            test_per_gene_spearman={r["gene"]: r["spearman"] for r in test.per_gene_rows()},
        )
        fields.update({f"test_{k}": test.summary[k] for k in DEPTH_FIELDS})
        if test.num_not_measured:
            fields["num_test_targets_not_measured"] = test.num_not_measured
    return fields


def finish_trackers(accelerator) -> None:
    """Close this run's trackers (``accelerator.end_training`` would also end the process group, which
    a CV's next fold still needs: the commands call it once at the very end)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def score_best(t, max_batches: int | None) -> dict:
    """The saved best model, reloaded and scored in fp32 on validation and (when present) the test split.

    These are the numbers of ``metrics.json``, ``predictions_*.csv`` and the model card: what
    ``expreg.predict`` gives for the same images, whatever precision the run trained in.

    Returns:
        ``{split: (expression, metrics)}`` on every process.
    """
    accelerator, data = t.accelerator, t.data
    accelerator.wait_for_everyone()  # the main process wrote checkpoints/best
    model = ExpRegModel.from_pretrained(t.run_dir / "checkpoints" / "best")
    if t.cfg.train.mode == "frozen":  # its loaders hold the embeddings its saved encoder made
        from expreg.training.frozen import FrozenHead

        model = FrozenHead(model)
    scores = {}
    for split in ("validation", "test"):
        if split not in data.datasets:
            continue
        normalised = predict_loader(
            model, data.loaders[split], accelerator, max_batches=max_batches, desc=f"score {split}"
        )
        expression = model.to_expression(normalised)
        del normalised  # float32 rows x genes: not held beside its float64 expression while the split is scored
        truth = targets(data.datasets[split], len(expression), truncate=max_batches is not None)
        allow, depth = t.cfg.data.allow_unmeasured_genes, library_sizes(data.datasets[split], len(expression))
        scores[split] = (expression, compute_metrics(expression, truth, data.gene_names, allow, depth))
    accelerator.free_memory()
    return scores


def targets(dataset, num_predictions: int, truncate: bool) -> np.ndarray:
    """The split's targets in dataset order; a count other than the predictions' is an error (not a silent cut)."""
    truth = labels_array(dataset)  # float32 as stored; the scores convert it to float64 a block of genes at a time
    if truncate:
        return truth[:num_predictions]
    if len(truth) != num_predictions:
        raise TrainingError(
            f"evaluation returned {num_predictions} predictions for {len(truth)} samples; every evaluation "
            "image must be read (metrics on misaligned rows would be wrong)"
        )
    return truth


def record_scores(t, scores: dict, result: dict) -> None:
    """Write the final predictions, per-gene metrics, model card and plots (main process)."""
    run_dir, data, state = t.run_dir, t.data, t.state
    val = scores["validation"][1]
    files = {"validation": ("predictions_val.csv", "per_gene_metrics.csv")}
    files["test"] = ("predictions_test.csv", "per_gene_metrics_test.csv")
    for split, (expression, metrics) in scores.items():
        part, n = data.datasets[split], len(expression)
        write_predictions(
            run_dir / files[split][0],
            iter_strings(part, "path", n),
            iter_strings(part, "group_id", n),
            data.gene_names,
            expression,
        )
        write_per_gene_metrics(run_dir / files[split][1], metrics.per_gene_rows())
    test = (
        {k: v for k, v in result.items() if k.startswith("test_") or k == "num_test_samples"}
        if "test" in scores
        else None
    )
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    card = model_card(t, best, val, test)
    atomic_write_text(run_dir / "checkpoints" / "best" / "README.md", card)
    write_run_plots(run_dir, labels_array(data.datasets["validation"], dtype=np.float64), metrics=result)
    logger.info(
        f"best epoch {result['best_epoch']} (checkpoints/best, scored in fp32): validation mean Spearman "
        f"{val.spearman_mean:.4f}, mean Pearson {val.pearson_mean:.4f}; {val.format_depth()}"
    )
    if test:
        logger.info(
            f"held-out test ({test['num_test_samples']} samples, groups {', '.join(test['test_groups'])}): "
            f"mean Spearman {test['test_spearman_mean']:.4f}, mean Pearson {test['test_pearson_mean']:.4f}; "
            f"{scores['test'][1].format_depth()}"
        )


def model_card(t, entry: dict, metrics, test=None) -> str:
    """The model card of the best model (its validation scores; the held-out ones once known)."""
    cfg, accelerator, run_dir, data = t.cfg, t.accelerator, t.run_dir, t.data
    best = {
        "run_name": run_dir.name,
        "best_epoch": entry["epoch"],
        "best_val_spearman_mean": metrics.spearman_mean,
        "best_val_pearson_mean": metrics.pearson_mean,
        **{f"best_val_{k}": metrics.summary[k] for k in DEPTH_FIELDS},
        "val_loss": entry["val_loss"],
        "num_processes": accelerator.num_processes,
        "effective_batch_size": cfg.data.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes,
    }
    used = split_summary(data.datasets)
    group_sets = {name: set(part["groups"]) for name, part in used.items()}
    splits = {name: {"samples": part["samples"], "groups": len(part["groups"])} for name, part in used.items()}
    shared = {
        f"{a}/{b}": sorted(group_sets[a] & group_sets[b])
        for i, a in enumerate(group_sets)
        for b in list(group_sets)[i + 1 :]
        if group_sets[a] & group_sets[b]
    }
    summary = {
        "metadata_csv": Path(cfg.data.metadata_csv).name,
        "split_file": Path(cfg.data.split_csv).name,
        "split_made_by_run": Path(cfg.data.split_csv).parent == run_dir,
        "num_genes": len(data.gene_names),
        "splits": splits,
        "shared_groups": shared,  # splits that share groups (a single training group gives up part of it)
    }
    if data.gene_choice is not None:
        how = "genes chosen on the training split only" if data.gene_choice.chosen_here else "genes given as a list"
        summary["gene_choice"] = f"{how}: {data.gene_choice.describe()}"
    return render_model_card(cfg.to_dict(), best, metrics.per_gene_rows(), summary, test=test)

"""Compare runs: one Markdown table of every run under a results folder, best first.

    python -m expreg.aggregate --results_dir results [--out_md results/summary.md]

Columns: run, backbone, effective batch, lr, seed, epochs done, best epoch, then the best
model's *validation* mean Spearman / Pearson (the split that chose the best epoch: optimistic)
and its *held-out test* mean Spearman / Pearson (runs with a test split, e.g. the folds of
``expreg.cv``; n/a otherwise), each followed by its depth-adjusted mean Spearman (the spot's
library size regressed out; n/a where the library size was unknown). Runs of a k-fold cross-validation (``data.fold`` set) are also
summarised as mean ± std of the held-out scores per configuration, with the validation scores
beside them, labelled as such. Folders that are not finished runs (running, stopped, broken)
are listed separately with the reason; they never break the table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from expreg.config import flatten
from expreg.formatting import fmt_cell, fmt_mean_std_of_all

# Keys that differ between the folds of one cross-validation, or between identical reruns.
_NOT_CONFIGURATION = {"data.fold", "logging.run_name", "logging.output_dir"}


@dataclass
class RunRow:
    name: str
    backbone: str = ""
    effective_batch: int | None = None
    lr: float | None = None
    seed: int | None = None
    epochs_done: int | None = None
    best_epoch: int | None = None
    spearman: float | None = None  # validation (model selection) of the best model
    pearson: float | None = None
    test_spearman: float | None = None  # held-out test split, when the run has one
    test_pearson: float | None = None
    spearman_adjusted: float | None = None  # depth-adjusted (library size regressed out), validation
    test_spearman_adjusted: float | None = None
    fold: int | None = None
    configuration: str = ""
    problem: str | None = None


def read_run(run_dir: Path) -> RunRow:
    """One row for a run folder; ``problem`` says why it is not a usable finished run. Never raises."""
    try:
        return _read_run(run_dir)
    except Exception as err:  # noqa: BLE001 - a broken folder is listed, it never breaks the table
        return RunRow(name=run_dir.name, problem=f"unexpected content ({type(err).__name__}: {err})")


def _read_run(run_dir: Path) -> RunRow:
    row = RunRow(name=run_dir.name)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError:
        row.problem = "no metrics.json (never finished an epoch, or not a run)"
        return row
    except (OSError, ValueError) as err:
        row.problem = f"unreadable metrics.json ({type(err).__name__})"
        return row
    if not isinstance(metrics, dict):
        row.problem = "metrics.json is not a JSON object"
        return row
    try:
        raw = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    except (OSError, yaml.YAMLError) as err:
        row.problem = f"unreadable config_resolved.yaml ({type(err).__name__})"
        return row
    if not isinstance(raw, dict):
        row.problem = "config_resolved.yaml is not a mapping"
        return row
    cfg = flatten(raw)
    row.backbone = str(cfg.get("model.backbone", ""))
    row.effective_batch = metrics.get("effective_batch_size")
    row.lr, row.seed, row.fold = cfg.get("train.lr"), cfg.get("seed"), cfg.get("data.fold")
    row.epochs_done, row.best_epoch = metrics.get("epochs_done"), metrics.get("best_epoch")
    row.spearman, row.pearson = metrics.get("best_val_spearman_mean"), metrics.get("best_val_pearson_mean")
    row.test_spearman, row.test_pearson = metrics.get("test_spearman_mean"), metrics.get("test_pearson_mean")
    row.spearman_adjusted = metrics.get("best_val_spearman_depth_adjusted_mean")
    row.test_spearman_adjusted = metrics.get("test_spearman_depth_adjusted_mean")
    row.configuration = json.dumps(
        {k: v for k, v in sorted(cfg.items()) if k not in _NOT_CONFIGURATION}, sort_keys=True, default=str
    )
    status = metrics.get("status")
    if status != "finished":
        row.problem = f"status {status!r}" + (" (resume it with --resume .../checkpoints/last)" if status else "")
    elif not isinstance(row.spearman, (int, float)):
        row.problem = "finished without a defined validation mean Spearman"
    return row


def collect(results_dir: Path) -> list[RunRow]:
    if not results_dir.is_dir():
        raise FileNotFoundError(f"--results_dir {results_dir}: not a folder")
    return [read_run(p) for p in sorted(results_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def render(rows: list[RunRow], results_dir: Path) -> str:
    good = sorted((r for r in rows if r.problem is None), key=lambda r: -r.spearman)
    lines = [f"# Runs in {results_dir}", ""]
    lines += [
        "Sorted by validation mean Spearman. Validation chose the best epoch, so its scores are optimistic; "
        "held-out test scores (runs with a test split) are the ones to report.",
        "",
        "| run | backbone | effective batch | lr | seed | epochs done | best epoch | validation mean Spearman "
        "| validation mean Pearson | validation depth-adjusted Spearman | held-out test mean Spearman "
        "| held-out test mean Pearson | held-out test depth-adjusted Spearman |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in good:
        lines.append(
            f"| {r.name} | {r.backbone} | {fmt_cell(r.effective_batch)} | {fmt_cell(r.lr, 'g')} | {fmt_cell(r.seed)} "
            f"| {fmt_cell(r.epochs_done)} | {fmt_cell(r.best_epoch)} | {fmt_cell(r.spearman)} | {fmt_cell(r.pearson)} "
            f"| {fmt_cell(r.spearman_adjusted)} | {fmt_cell(r.test_spearman)} | {fmt_cell(r.test_pearson)} "
            f"| {fmt_cell(r.test_spearman_adjusted)} |"
        )
    if not good:
        lines.append("| (no finished runs) | | | | | | | | | | | | |")
    lines += _cross_validation(good)
    broken = [r for r in rows if r.problem is not None]
    if broken:
        lines += ["", "## Incomplete or broken runs", "", "| folder | problem |", "|---|---|"]
        lines += [f"| {r.name} | {r.problem} |" for r in broken]
    return "\n".join(lines) + "\n"


def _cross_validation(good: list[RunRow]) -> list[str]:
    groups: dict[str, list[RunRow]] = {}
    for r in good:
        if r.fold is not None:
            groups.setdefault(r.configuration, []).append(r)
    if not groups:
        return []
    lines = [
        "",
        "## Cross-validation (mean ± std over folds)",
        "",
        "Held-out: each fold's best model on its own test fold (never used for a choice). Validation: the "
        "score that chose each fold's best epoch (optimistic; shown only for reference).",
        "",
        "| configuration (first run) | backbone | folds | held-out test mean Spearman | held-out test mean Pearson "
        "| held-out test depth-adjusted Spearman | validation mean Spearman |",
        "|---|---|---|---|---|---|---|",
    ]
    summaries = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r.fold)
        test_spearman = fmt_mean_std_of_all([r.test_spearman for r in runs])
        test_pearson = fmt_mean_std_of_all([r.test_pearson for r in runs])
        test_adjusted = fmt_mean_std_of_all([r.test_spearman_adjusted for r in runs])
        val_spearman = fmt_mean_std_of_all([r.spearman for r in runs])
        folds = ", ".join(str(r.fold) for r in runs)
        defined = [r.test_spearman for r in runs if isinstance(r.test_spearman, (int, float))]
        key = -sum(defined) / len(defined) if defined else math.inf
        summaries.append((key, runs[0], folds, test_spearman, test_pearson, test_adjusted, val_spearman))
    for _, first, folds, *cells in sorted(summaries, key=lambda s: s[0]):
        lines.append(f"| {first.name} | {first.backbone} | {folds} | {' | '.join(cells)} |")
    return lines

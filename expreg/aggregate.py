"""Compare runs: one Markdown table of every run under a results folder, best first.

    python -m expreg.aggregate --results_dir results [--out_md results/summary.md]

Columns: run, backbone, effective batch, lr, seed, epochs done, best epoch, best mean Spearman,
best mean Pearson. Runs of a k-fold cross-validation (``data.fold`` set) are also summarised as
mean ± std per configuration. Folders that are not finished runs (running, stopped, broken) are
listed separately with the reason; they never break the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

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
    spearman: float | None = None
    pearson: float | None = None
    fold: int | None = None
    configuration: str = ""
    problem: str | None = None


def _flatten(cfg: dict) -> dict:
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


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
    cfg = _flatten(raw)
    row.backbone = str(cfg.get("model.backbone", ""))
    row.effective_batch = metrics.get("effective_batch_size")
    row.lr, row.seed, row.fold = cfg.get("train.lr"), cfg.get("seed"), cfg.get("data.fold")
    row.epochs_done, row.best_epoch = metrics.get("epochs_done"), metrics.get("best_epoch")
    row.spearman, row.pearson = metrics.get("best_val_spearman_mean"), metrics.get("best_val_pearson_mean")
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


def _num(value, digits: int | str = 4) -> str:
    """A table cell: floats with ``digits`` decimals (or a format spec such as ``"g"``), n/a for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if not isinstance(value, float):
        return str(value)
    return f"{value:{digits}}" if isinstance(digits, str) else f"{value:.{digits}f}"


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def render(rows: list[RunRow], results_dir: Path) -> str:
    good = sorted((r for r in rows if r.problem is None), key=lambda r: -r.spearman)
    lines = [f"# Runs in {results_dir}", ""]
    lines += [
        "| run | backbone | effective batch | lr | seed | epochs done | best epoch | best mean Spearman | best mean Pearson |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in good:
        lines.append(
            f"| {r.name} | {r.backbone} | {_num(r.effective_batch)} | {_num(r.lr, 'g')} | {_num(r.seed)} "
            f"| {_num(r.epochs_done)} "
            f"| {_num(r.best_epoch)} | {_num(r.spearman)} | {_num(r.pearson)} |"
        )
    if not good:
        lines.append("| (no finished runs) | | | | | | | | |")
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
        "| configuration (first run) | backbone | folds | mean Spearman | mean Pearson |",
        "|---|---|---|---|---|",
    ]
    summaries = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r.fold)
        spearman = _mean_std([r.spearman for r in runs])
        pearson = _mean_std([r.pearson for r in runs if r.pearson is not None] or [float("nan")])
        folds = ", ".join(str(r.fold) for r in runs)
        summaries.append((-sum(r.spearman for r in runs) / len(runs), runs[0], folds, spearman, pearson))
    for _, first, folds, spearman, pearson in sorted(summaries, key=lambda s: s[0]):
        lines.append(f"| {first.name} | {first.backbone} | {folds} | {spearman} | {pearson} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="expreg-aggregate", description="One Markdown table of all runs.")
    parser.add_argument("--results_dir", default="results", help="folder holding run directories (default results)")
    parser.add_argument("--out_md", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    try:
        table = render(collect(results_dir), results_dir)
    except FileNotFoundError as err:
        print(f"expreg-aggregate: error: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.out_md:
        from expreg.io import atomic_write_text

        atomic_write_text(Path(args.out_md), table)
        print(f"\nwrote {args.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

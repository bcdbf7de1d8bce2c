"""PNG plots of a run: per-gene Spearman, predicted vs true for the best and worst genes, learning curves.

Written into the run directory at the end of training (``write_run_plots``), or redrawn for a
finished run by ``python -m expreg.plots results/<run>`` (``redraw_run_plots``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_per_gene_spearman(path: Path, per_gene: list[dict], title: str) -> None:
    """Horizontal bars of per-gene Spearman, sorted, gene names on the axis."""
    plt = _pyplot()
    rows = sorted((r for r in per_gene if r["spearman"] is not None), key=lambda r: r["spearman"])
    names = [r["gene"] for r in rows]
    values = np.array([r["spearman"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.22 * len(rows) + 1.2)))
    colors = np.where(values >= 0, "#3b7dd8", "#d8553b")
    ax.barh(np.arange(len(rows)), values, color=colors)
    ax.set_yticks(np.arange(len(rows)), names, fontsize=7 if len(rows) > 30 else 9)
    mean = float(values.mean()) if len(values) else float("nan")
    ax.axvline(mean, color="k", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("Spearman ρ (validation, per gene)")
    undefined = sum(r["spearman"] is None for r in per_gene)
    ax.set_title(title + (f"\n({undefined} gene(s) undefined, not shown)" if undefined else ""), fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_best_worst_scatter(path: Path, per_gene: list[dict], predictions, targets, n: int = 3) -> None:
    """Predicted vs measured expression for the ``n`` best and ``n`` worst genes by Spearman."""
    plt = _pyplot()
    index = {r["gene"]: i for i, r in enumerate(per_gene)}
    ranked = sorted((r for r in per_gene if r["spearman"] is not None), key=lambda r: -r["spearman"])
    n = max(1, min(n, len(ranked) // 2)) if ranked else 0
    worst = ranked[-n:] if len(ranked) > n else []
    chosen = [("best", r) for r in ranked[:n]] + [("worst", r) for r in worst]
    cols, rows = max(n, 1), 2 if worst else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for k, (kind, r) in enumerate(chosen):
        ax = axes[k // cols][k % cols]
        ax.set_visible(True)
        j = index[r["gene"]]
        measured = ~np.isnan(targets[:, j])  # data.allow_unmeasured_genes: spots that did not measure it are left out
        truth, pred = targets[measured, j], predictions[measured, j]
        ax.scatter(truth, pred, s=6, alpha=0.5, color="#3b7dd8" if kind == "best" else "#d8553b")
        low, high = float(min(truth.min(), pred.min())), float(max(truth.max(), pred.max()))
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(f"{kind}: {r['gene']}  ρ={r['spearman']:.3f}", fontsize=9)
        ax.set_xlabel("measured expression", fontsize=8)
        ax.set_ylabel("predicted expression", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("Predicted vs measured (validation, best model); dashed: y = x", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning_curves(path: Path, history: list[dict], best_epoch: int | None, title: str = "") -> None:
    """Train/validation loss and validation mean Spearman/Pearson per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    left.set_xlabel("epoch")
    left.set_ylabel("MSE on z-scored targets")
    left.set_title("Loss", fontsize=10)
    left.legend(fontsize=8)
    right.plot(epochs, [h["val_spearman_mean"] for h in history], marker="o", label="mean Spearman (primary)")
    right.plot(epochs, [h["val_pearson_mean"] for h in history], marker="s", label="mean Pearson")
    if best_epoch is not None:
        right.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
    right.set_xlabel("epoch")
    right.set_ylabel("correlation over genes (validation)")
    right.set_title("Validation correlation", fontsize=10)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run_plots(run_dir: Path, targets: np.ndarray | None = None, metrics: dict | None = None) -> list[Path]:
    """Draw all plots of a run from its files.

    Args:
        run_dir: The run directory (``per_gene_metrics.csv``, ``predictions_val.csv`` are read).
        targets: Measured validation values in the order of ``predictions_val.csv``; without
            them the predicted-vs-true plot is skipped.
        metrics: The ``metrics.json`` content; read from the run directory when None.
    """
    import json

    import pandas as pd

    run_dir = Path(run_dir)
    if metrics is None:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    per_gene_frame = pd.read_csv(run_dir / "per_gene_metrics.csv", keep_default_na=False, dtype={"gene": str})
    per_gene = [
        {
            k: (None if r[k] == "" else float(r[k])) if k != "gene" else r[k]
            for k in ("gene", "spearman", "pearson", "mse")
        }
        for r in per_gene_frame.to_dict("records")
    ]
    written = [run_dir / "plot_per_gene_spearman.png", run_dir / "plot_learning_curves.png"]
    title = f"Per-gene Spearman, validation, best epoch {metrics['best_epoch']}\n{metrics['run_name']}"
    plot_per_gene_spearman(written[0], per_gene, title)
    plot_learning_curves(written[1], metrics["history"], metrics["best_epoch"], metrics["run_name"])
    if targets is not None:
        predictions = pd.read_csv(run_dir / "predictions_val.csv").iloc[:, 2:].to_numpy(dtype=np.float64)
        written.append(run_dir / "plot_pred_vs_true.png")
        plot_best_worst_scatter(written[-1], per_gene, predictions, np.asarray(targets)[: len(predictions)])
    return written


def redraw_run_plots(run_dir: Path) -> list[Path]:
    """Redraw the plots of a finished run from its files, the validation targets re-read from its data.

    The run's ``config_resolved.yaml`` gives the metadata CSV and the split (file or seed), so the
    validation rows are the run's own, in the order of its ``predictions_val.csv``.
    """
    import yaml

    from expreg.config import config_from_dict
    from expreg.data import load_expression_dataset
    from expreg.data.dataset import labels_array

    run_dir = Path(run_dir)
    cfg = config_from_dict(yaml.safe_load((run_dir / "config_resolved.yaml").read_text()), "run config")
    ds = load_expression_dataset(
        cfg.data.metadata_csv,
        cfg.data.split_csv,
        fold=cfg.data.fold,
        seed=cfg.seed,
        val_frac=cfg.data.val_frac,
        check_images="none",
    )
    return write_run_plots(run_dir, labels_array(ds["validation"], dtype=np.float64))

"""Per-gene rank and linear correlation between predicted and measured expression.

Pure NumPy functions on full arrays of shape ``(num_samples, num_genes)``: no torch, no
accelerate. Mean Spearman over genes is the primary metric, mean Pearson the secondary one.
A gene whose truth or prediction is constant over the samples has no defined correlation: it
is left out of the means and counted. With ``allow_unmeasured``, a NaN target is a gene its spot's
sample did not measure (``data.allow_unmeasured_genes``): each gene is scored on its measured spots
only, and the number of targets left out is in the summary (``num_targets_not_measured``).

Beside every score, when each spot's library size (its total raw count over all measured genes)
is known: the **depth-adjusted** Spearman and Pearson, i.e. the partial correlation of prediction
and truth with the spot's log library size regressed out of both (on ranks for Spearman), and the
**depth oracle**, the Spearman of the library size itself with each gene (a diagnostic that uses
measured data, never a competitor). On shallow arrays a raw score is mostly "how many molecules
this spot yielded"; the adjusted one is what the model knows about the gene beyond that. Where
the library size is unknown these are None ("n/a"), never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

EVALUATE_MODULE = Path(__file__).parent / "metrics_module" / "expreg_correlation.py"


def rank_columns(x: np.ndarray) -> np.ndarray:
    """Rank each column of ``x`` from 1, ties getting their average rank (as ``scipy.stats.rankdata``).

    One ``argsort`` of the whole matrix plus a few linear passes; no Python loop over columns.

    Args:
        x: Array of shape ``(num_samples, num_genes)``.

    Returns:
        float64 ranks of the same shape.
    """
    x = np.asarray(x)
    n, k = x.shape
    if n == 0:
        return np.empty((0, k))
    xt = np.ascontiguousarray(x.T)  # rows are genes: argsort along contiguous memory is ~2x faster
    order = np.argsort(xt, axis=1)
    sorted_vals = np.take_along_axis(xt, order, axis=1)
    starts = np.empty((k, n), dtype=bool)  # True where a block of equal values begins
    starts[:, 0] = True
    np.not_equal(sorted_vals[:, 1:], sorted_vals[:, :-1], out=starts[:, 1:])
    del sorted_vals, xt  # copies of the block (xt can be a view): freed before the ranks are made
    if starts.all():  # no ties anywhere (typical for predictions): ranks are 1..n in sorted order
        sorted_ranks = np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), (k, n))
    else:
        flat_starts = np.flatnonzero(starts)  # every row starts a block, so blocks never span rows
        del starts
        block_len = np.diff(np.append(flat_starts, k * n))
        # a block at 0-based position s of its row with length L holds ranks s+1..s+L: average s + (L+1)/2
        block_rank = (flat_starts % n) + (block_len + 1) / 2.0
        sorted_ranks = np.repeat(block_rank, block_len).reshape(k, n)
    ranks = np.empty((k, n))
    np.put_along_axis(ranks, order, sorted_ranks, axis=1)
    return ranks.T


def _constant_columns(x: np.ndarray) -> np.ndarray:
    return np.all(x == x[:1], axis=0) if len(x) else np.ones(x.shape[1], dtype=bool)


def _pearson_columns(a: np.ndarray, b: np.ndarray, undefined: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    num = np.einsum("ij,ij->j", a, b)
    den = np.sqrt(np.einsum("ij,ij->j", a, a) * np.einsum("ij,ij->j", b, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r = np.clip(r, -1.0, 1.0)
    r[undefined] = np.nan
    return r


def _check_inputs(
    predictions, targets, allow_nan_targets: bool = False, dtype=np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Both as 2-D arrays of ``dtype`` (None: float32 or float64 arrays kept as they are, converted block by
    block by ``compute_metrics``), checked: same shape, finite (NaN targets allowed when asked)."""
    p, t = (_as_float(x, dtype) for x in (predictions, targets))
    if p.ndim == 1:
        p = p[:, None]
    if t.ndim == 1:
        t = t[:, None]
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"predictions {p.shape} and targets {t.shape} must both have shape (num_samples, num_genes)")
    for name, arr in (("predictions", p), ("targets", t)):
        bad = np.isinf(arr) if name == "targets" and allow_nan_targets else ~np.isfinite(arr)
        if bad.any():
            bad = np.argwhere(bad)[0]
            raise ValueError(f"{name} contain NaN or infinite values (first at sample {bad[0]}, gene {bad[1]})")
    return p, t


def _as_float(x, dtype) -> np.ndarray:
    x = np.asarray(x)
    keep = dtype is None and x.dtype in (np.float32, np.float64)
    return x if keep else np.asarray(x, dtype=np.float64 if dtype is None else dtype)


def pearson_per_gene(predictions, targets) -> np.ndarray:
    """Pearson r per gene (column); NaN where truth or prediction is constant."""
    p, t = _check_inputs(predictions, targets)
    return _pearson_columns(p, t, _constant_columns(p) | _constant_columns(t))


def spearman_per_gene(predictions, targets) -> np.ndarray:
    """Spearman rho per gene (Pearson of average ranks); NaN where either side is constant."""
    p, t = _check_inputs(predictions, targets)
    undefined = _constant_columns(p) | _constant_columns(t)
    return _pearson_columns(rank_columns(p), rank_columns(t), undefined)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


@dataclass
class RegressionMetrics:
    """Per-gene metrics and their summaries.

    Attributes:
        gene_names: One name per column.
        spearman: Per-gene Spearman rho (NaN = undefined).
        pearson: Per-gene Pearson r (NaN = undefined).
        mse: Per-gene mean squared error, in the units of the inputs.
        num_samples: Rows the metrics were computed on.
    """

    gene_names: list[str]
    spearman: np.ndarray
    pearson: np.ndarray
    mse: np.ndarray
    num_samples: int
    num_not_measured: int = 0
    spearman_adjusted: np.ndarray | None = None  # depth-adjusted (partial) Spearman; None: library size unknown
    pearson_adjusted: np.ndarray | None = None
    depth_oracle: np.ndarray | None = None  # Spearman of the library size with each gene
    summary: dict = field(init=False)

    def __post_init__(self) -> None:
        known = self.spearman_adjusted is not None
        self.summary = {
            "spearman_mean": _nanmean(self.spearman),
            "pearson_mean": _nanmean(self.pearson),
            "spearman_depth_adjusted_mean": _nanmean(self.spearman_adjusted) if known else None,
            "pearson_depth_adjusted_mean": _nanmean(self.pearson_adjusted) if known else None,
            "depth_oracle_spearman_mean": _nanmean(self.depth_oracle) if known else None,
            # e.g. a prediction that is exactly a function of depth: nothing is left once depth is out
            "num_genes_undefined_depth_adjusted": int(np.isnan(self.spearman_adjusted).sum()) if known else None,
            "mse": _nanmean(self.mse),
            "num_genes": len(self.gene_names),
            "num_genes_undefined_spearman": int(np.isnan(self.spearman).sum()),
            "num_genes_undefined_pearson": int(np.isnan(self.pearson).sum()),
            "num_samples": self.num_samples,
        }
        if self.num_not_measured:
            self.summary["num_targets_not_measured"] = self.num_not_measured

    @property
    def spearman_mean(self) -> float:
        return self.summary["spearman_mean"]

    @property
    def pearson_mean(self) -> float:
        return self.summary["pearson_mean"]

    def per_gene_rows(self) -> list[dict]:
        """One dict per gene: ``gene``, ``spearman``, ``pearson``, ``mse``, the depth-adjusted Spearman and
        Pearson and the depth oracle's Spearman (None when undefined or the library size is unknown)."""
        k = len(self.gene_names)
        unknown = np.full(k, np.nan)
        adjusted_s = unknown if self.spearman_adjusted is None else self.spearman_adjusted
        adjusted_p = unknown if self.pearson_adjusted is None else self.pearson_adjusted
        oracle = unknown if self.depth_oracle is None else self.depth_oracle
        rows = []
        for j, g in enumerate(self.gene_names):
            values = {
                "spearman": self.spearman[j],
                "pearson": self.pearson[j],
                "mse": self.mse[j],
                "spearman_depth_adjusted": adjusted_s[j],
                "pearson_depth_adjusted": adjusted_p[j],
                "depth_oracle_spearman": oracle[j],
            }
            rows.append({"gene": g, **{key: None if np.isnan(v) else float(v) for key, v in values.items()}})
        return rows

    def format_depth(self) -> str:
        """``depth-adjusted Spearman 0.0600, Pearson 0.0700; library size alone 0.4120`` (or n/a)."""
        s = self.summary
        if s["spearman_depth_adjusted_mean"] is None:
            return "depth-adjusted n/a (library size unknown)"
        return (
            f"depth-adjusted Spearman {s['spearman_depth_adjusted_mean']:.4f}, Pearson "
            f"{s['pearson_depth_adjusted_mean']:.4f}; library size alone {s['depth_oracle_spearman_mean']:.4f}"
        )

    def format(self) -> str:
        s = self.summary
        undefined = s["num_genes_undefined_spearman"]
        note = f" ({undefined} of {s['num_genes']} genes undefined, excluded)" if undefined else ""
        if self.num_not_measured:
            note += f" ({self.num_not_measured} targets not measured, left out)"
        return (
            f"mean Spearman {s['spearman_mean']:.4f} | mean Pearson {s['pearson_mean']:.4f} | "
            f"MSE {s['mse']:.4f} | {s['num_samples']} samples x {s['num_genes']} genes{note} | {self.format_depth()}"
        )

    def format_genes(self, n: int = 5) -> str:
        """The ``n`` best and worst genes by Spearman, as a small table."""
        rows = sorted((r for r in self.per_gene_rows() if r["spearman"] is not None), key=lambda r: -r["spearman"])
        shown = rows if len(rows) <= 2 * n else rows[:n] + [None] + rows[-n:]
        lines = [f"{'gene':<16}{'spearman':>10}{'pearson':>10}{'mse':>10}"]
        for r in shown:
            if r is None:
                lines.append(f"{'...':<16}")
                continue
            pearson = "" if r["pearson"] is None else f"{r['pearson']:.4f}"
            lines.append(f"{r['gene']:<16}{r['spearman']:>10.4f}{pearson:>10}{r['mse']:>10.4f}")
        return "\n".join(lines)


def compute_metrics(
    predictions, targets, gene_names: list[str] | None = None, allow_unmeasured: bool = False, library_size=None
) -> RegressionMetrics:
    """Per-gene Spearman, Pearson and MSE of predictions against targets.

    Args:
        predictions: Array-like of shape ``(num_samples, num_genes)``.
        targets: Array-like of the same shape.
        gene_names: Names of the columns; ``y0, y1, ...`` when None.
        allow_unmeasured: A NaN target is a gene its spot's sample did not measure
            (``data.allow_unmeasured_genes``), left out; otherwise any NaN is an error (a bug, never
            silently masked).
        library_size: Each row's total raw count over all measured genes, or None (unknown): the
            depth-adjusted scores and the depth oracle (module docstring). A row without a finite,
            non-negative value makes them unknown for the whole set (never guessed).

    Returns:
        The per-gene metrics with their means over genes in ``summary``.
    """
    p, t = _check_inputs(predictions, targets, allow_nan_targets=allow_unmeasured, dtype=None)
    if gene_names is None:
        gene_names = [f"y{i}" for i in range(p.shape[1])]
    if len(gene_names) != p.shape[1]:
        raise ValueError(f"{len(gene_names)} gene names for {p.shape[1]} columns")
    missing = np.isnan(t)
    depth = _log_depth(library_size, len(p))
    if missing.any():
        return _masked_metrics(p, t, missing, list(gene_names), depth)
    blocks = [_block_scores(p[:, j : j + GENE_BLOCK], t[:, j : j + GENE_BLOCK], depth) for j in _gene_starts(p)]
    scores = {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]} if blocks else {}
    empty = np.empty(0)
    metrics = RegressionMetrics(
        gene_names=list(gene_names),
        spearman=scores.get("spearman", empty),
        pearson=scores.get("pearson", empty),
        mse=scores.get("mse", empty),
        num_samples=p.shape[0],
    )
    if depth is None:
        return metrics
    adjusted = (scores.get(key, empty) for key in ("spearman_adjusted", "pearson_adjusted", "depth_oracle"))
    return replace(metrics, **dict(zip(("spearman_adjusted", "pearson_adjusted", "depth_oracle"), adjusted)))


GENE_BLOCK = 4  # genes scored at a time: the ranks' temporaries are (rows, 4), not (rows, K)


def _gene_starts(p: np.ndarray) -> range:
    return range(0, p.shape[1], GENE_BLOCK)


def _block_scores(p: np.ndarray, t: np.ndarray, depth: np.ndarray | None) -> dict:
    """Spearman, Pearson and MSE of some genes' columns (and their depth-adjusted scores with ``depth``).

    Measured at 80,000 validation rows x 50 genes: ranking the whole matrix at once held ~0.3 GB of
    temporaries (``benchmarks/bench_cohort.py --parts rss``); a block of 4 genes holds a twelfth of that."""
    p, t = np.asarray(p, dtype=np.float64), np.asarray(t, dtype=np.float64)
    undefined = _constant_columns(p) | _constant_columns(t)
    scores = {
        "spearman": _pearson_columns(rank_columns(p), rank_columns(t), undefined),
        "pearson": _pearson_columns(p, t, undefined),
        "mse": ((p - t) ** 2).mean(axis=0),
    }
    if depth is not None:
        adjusted = _depth_columns(p, t, depth)
        scores.update(zip(("spearman_adjusted", "pearson_adjusted", "depth_oracle"), adjusted))
    return scores


MSE_CHUNK_ROWS = 50_000


def mean_squared_error(predictions: np.ndarray, labels: np.ndarray) -> float:
    """MSE over every (row, gene) whose target was measured (a NaN target is one that was not), in float64,
    ``MSE_CHUNK_ROWS`` rows at a time (the float64 difference of a whole cohort split would be rows x K x 8 bytes)."""
    total, count = 0.0, 0
    for start in range(0, len(predictions), MSE_CHUNK_ROWS):
        truth = labels[start : start + MSE_CHUNK_ROWS]
        diff = predictions[start : start + MSE_CHUNK_ROWS].astype(np.float64) - truth
        measured = ~np.isnan(truth)  # a NaN prediction (a diverged model) stays in: the loss says NaN
        total += float(np.square(diff, where=measured, out=np.zeros_like(diff)).sum())
        count += int(measured.sum())
    return total / count if count else float("nan")


def _log_depth(library_size, n: int) -> np.ndarray | None:
    """``log1p(library size)`` of every row, or None when it is not known for every row."""
    if library_size is None:
        return None
    depth = np.asarray(library_size, dtype=np.float64).reshape(-1)
    if len(depth) != n:
        raise ValueError(f"library_size has {len(depth)} values for {n} rows")
    if not (np.isfinite(depth).all() and (depth >= 0).all()):
        return None
    return np.log1p(depth)


FLAT_RESIDUAL = 1e-6  # relative size below which a residual is nothing (float32 carries ~6e-8 of a value)
MIN_ADJUSTED_ROWS = 4  # a partial correlation on 3 rows has one degree of freedom: always +-1


def partial_correlation_columns(a: np.ndarray, b: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per column, the Pearson correlation of ``a`` and ``b`` after regressing ``z`` (with an intercept) out
    of both; NaN where a residual or ``z`` is constant. Pass ranks for the partial Spearman.

    Args:
        a, b: Arrays ``(n, k)``.
        z: The covariate ``(n,)``.
    """
    zc = z - z.mean()
    zz = float(zc @ zc)
    if zz <= 0:
        return np.full(a.shape[1], np.nan)
    residuals = []
    for x in (a, b):
        xc = x - x.mean(axis=0)
        r = xc - np.outer(zc, (zc @ xc) / zz)
        # nothing left once z is out (a constant column, or one that is a function of z up to float32
        # rounding): measured against the data's own size, since rounding leaves ~1e-16 of it, not 0
        size = np.abs(x).max(axis=0) * np.sqrt(len(x)) if len(x) else np.zeros(x.shape[1])
        flat = np.sqrt(np.einsum("ij,ij->j", r, r)) <= FLAT_RESIDUAL * np.maximum(size, np.finfo(np.float64).tiny)
        residuals.append((r, flat | _constant_columns(x)))
    (ra, flat_a), (rb, flat_b) = residuals
    return _pearson_columns(ra, rb, flat_a | flat_b)


def _depth_columns(p: np.ndarray, t: np.ndarray, depth: np.ndarray):
    """(partial Spearman, partial Pearson, the depth oracle's Spearman) per column (NaN on too few rows)."""
    if len(p) < MIN_ADJUSTED_ROWS:
        return tuple(np.full(p.shape[1], np.nan) for _ in range(3))
    rp, rt, rz = rank_columns(p), rank_columns(t), rank_columns(depth[:, None])[:, 0]
    oracle = _pearson_columns(np.repeat(rz[:, None], t.shape[1], axis=1), rt, _constant_columns(t) | (np.ptp(rz) == 0))
    return partial_correlation_columns(rp, rt, rz), partial_correlation_columns(p, t, depth), oracle


def _masked_metrics(
    p: np.ndarray, t: np.ndarray, missing: np.ndarray, gene_names: list[str], depth: np.ndarray | None
) -> RegressionMetrics:
    """``compute_metrics`` where some targets were not measured: every gene on its own measured rows."""
    k = p.shape[1]
    spearman, pearson, mse = np.full(k, np.nan), np.full(k, np.nan), np.full(k, np.nan)
    adjusted = [np.full(k, np.nan) for _ in range(3)] if depth is not None else None
    for j in range(k):
        rows = ~missing[:, j]
        if rows.sum() < 2:
            continue
        pj, tj = (np.asarray(x[rows, j : j + 1], dtype=np.float64) for x in (p, t))
        undefined = _constant_columns(pj) | _constant_columns(tj)
        spearman[j] = _pearson_columns(rank_columns(pj), rank_columns(tj), undefined)[0]
        pearson[j] = _pearson_columns(pj, tj, undefined)[0]
        mse[j] = float(((pj - tj) ** 2).mean())
        if adjusted is not None and rows.sum() >= MIN_ADJUSTED_ROWS:
            for out, value in zip(adjusted, _depth_columns(pj, tj, depth[rows])):
                out[j] = value[0]
    return RegressionMetrics(
        gene_names=gene_names,
        spearman=spearman,
        pearson=pearson,
        mse=mse,
        num_samples=p.shape[0],
        num_not_measured=int(missing.sum()),
        spearman_adjusted=None if adjusted is None else adjusted[0],
        pearson_adjusted=None if adjusted is None else adjusted[1],
        depth_oracle=None if adjusted is None else adjusted[2],
    )


def load_evaluate_metric(**kwargs):
    """The same metric as an ``evaluate`` module, loaded offline from the package by path."""
    import evaluate

    return evaluate.load(str(EVALUATE_MODULE), **kwargs)

"""Raw counts -> regression targets: the target transform, in one place for ``expreg.prepare``, training and gene choice.

``log1p_cpm`` (the default): each spot's counts divided by its total over all measured genes,
times 10,000, then ``log1p`` (scanpy's ``normalize_total(target_sum=1e4)`` + ``log1p``).
``log1p``: ``log1p`` of the raw counts (HEST-Benchmark's targets). ``none``: the counts as they are.
"""

from __future__ import annotations

import numpy as np

from expreg.config import TARGET_TRANSFORMS

CPM_TARGET_SUM = 1e4


def transform_counts(counts, columns, kind: str = "log1p_cpm", totals: np.ndarray | None = None) -> np.ndarray:
    """Targets ``(spots, len(columns))`` (float32) of the count columns ``columns`` of ``counts``.

    Args:
        counts: Raw counts ``(spots, genes)``, a scipy sparse matrix or an array, over *all* the
            genes measured (the library size of ``log1p_cpm`` is the spot's total).
        columns: Column indices of the target genes; ``-1`` for a gene the sample did not measure
            (its target is NaN: not measured is not a measured zero).
        kind: One of ``TARGET_TRANSFORMS``.
        totals: Each spot's total over all genes (``log1p_cpm``), when computed already.
    """
    if kind not in TARGET_TRANSFORMS:
        raise ValueError(f"target transform {kind!r}: choose from {', '.join(TARGET_TRANSFORMS)}")
    columns = np.asarray(columns, dtype=np.int64)
    measured = columns >= 0
    values = np.zeros((counts.shape[0], len(columns)), dtype=np.float64)
    if measured.any():
        picked = counts[:, columns[measured]]
        values[:, measured] = picked.toarray() if hasattr(picked, "toarray") else np.asarray(picked)
    if kind == "log1p_cpm":
        if totals is None:
            totals = np.asarray(counts.sum(axis=1), dtype=np.float64).reshape(-1)
        scale = np.divide(CPM_TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        values = np.log1p(values * scale[:, None])
    elif kind == "log1p":
        values = np.log1p(values)
    values[:, ~measured] = np.nan
    return values.astype(np.float32)

"""The documented import path of the metrics (``from expreg.metrics import compute_metrics``); they
live in ``expreg.evaluation.metrics``."""

from expreg.evaluation.metrics import (  # noqa: F401 - re-exported
    RegressionMetrics,
    compute_metrics,
    load_evaluate_metric,
    pearson_per_gene,
    rank_columns,
    spearman_per_gene,
)

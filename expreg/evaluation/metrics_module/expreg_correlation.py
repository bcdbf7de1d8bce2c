"""expreg's gene-expression metric as a HuggingFace ``evaluate`` module, loadable offline by path.

    import expreg.metrics
    metric = expreg.metrics.load_evaluate_metric()
    metric.compute(predictions=preds, references=targets)

It delegates to ``expreg.metrics.compute_metrics`` so that both give the same numbers.
"""

import datasets
import evaluate

import expreg.metrics

_DESCRIPTION = """
Per-gene Spearman (primary) and Pearson correlation between predicted and measured expression,
computed over samples for each gene and averaged over genes. Genes whose truth or prediction is
constant have no defined correlation: they are excluded from the means and counted.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of per-sample vectors, shape (num_samples, num_genes).
    references: list of per-sample vectors, same shape.
    gene_names: optional list of num_genes names.
Returns:
    spearman_mean, pearson_mean, mse, num_genes, num_genes_undefined_spearman,
    num_genes_undefined_pearson, num_samples, and per_gene (list of dicts gene/spearman/pearson/mse).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExpregCorrelation(evaluate.Metric):
    """Mean per-gene Spearman and Pearson correlation."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, predictions, references, gene_names=None):
        result = expreg.metrics.compute_metrics(predictions, references, gene_names=gene_names)
        return {**result.summary, "per_gene": result.per_gene_rows()}

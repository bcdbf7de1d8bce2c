"""HEST-Benchmark's own linear probe, for ``expreg.cv``'s ``linear_probe_hest`` row.

Matched to mahmoodlab/HEST ``src/hest/bench/benchmark.py`` (``predict_single_split``, with the
defaults of its ``BenchmarkConfig`` / ``bench_config/bench_config.yaml``: ``dimreduce="PCA"``,
``latent_dim=256``, ``method="ridge"``, ``normalize=True``, ``seed=1``) and
``src/hest/bench/trainer.py`` (``train_test_reg``):

- ``Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=256, random_state=seed))])``
  fitted on the training embeddings, in float32 as HEST's are (torch embeddings); both sides transformed, then turned into ``torch.Tensor``
  (rounded to float32; sklearn's ``check_array`` does not recognise the torch dtype and fits the
  ridge in float64 on those rounded values, as done here);
- ``Ridge(solver="lsqr", alpha=100 / (X_train.shape[1] * y_train.shape[1]), random_state=seed,
  fit_intercept=False, max_iter=1000)``: ``X_train.shape[1]`` is taken *after* PCA (the number of
  components, 256), ``y_train.shape[1]`` is the number of genes; the targets are not centred
  (with ``fit_intercept=False`` the predictions are centred around 0, which no correlation sees);
- scored per gene with Pearson (``scipy.stats.pearsonr``), the mean over genes being HEST's number.

Differences, each stated where it applies: HEST's PCA fails when a training fold has fewer than
256 samples or the embedding fewer than 256 features; here the components are then cut to
``min(256, samples, features)`` and the count is recorded per fold (``pca_components``). HEST
averages the per-gene Pearson with ``np.mean`` (NaN as soon as one gene is constant on a test
split); ``expreg.evaluation.metrics`` averages the defined genes and counts the others. The seed
is the recipe's (HEST's default is 1: set ``seed=1`` to use it); it only reaches PCA's
randomised solver (``lsqr`` ignores it). Rows are in expreg's order, not HEST's, so the iterative
``lsqr`` solution can differ from HEST's at the level of its tolerance.
"""

from __future__ import annotations

import numpy as np

from expreg.evaluation.baselines import fitted_on
from expreg.formatting import fmt_float

HEST_LATENT_DIM = 256  # BenchmarkConfig.latent_dim
HEST_MAX_ITER = 1000  # train_test_reg(max_iter=1000)
PROBE_NAME = "linear_probe_hest"  # its method name in expreg.cv
UNDEFINED = "undefined"


def hest_alpha(n_features: int, n_genes: int) -> float:
    """HEST-Benchmark's ridge strength: ``100 / (n_features * n_genes)``, ``n_features`` counted after PCA."""
    if n_features < 1 or n_genes < 1:
        raise ValueError(f"hest_alpha: need at least one feature and one gene, got {n_features} and {n_genes}")
    return 100.0 / (n_features * n_genes)


def hest_components(n_samples: int, n_features: int, latent_dim: int = HEST_LATENT_DIM) -> int:
    """PCA components: HEST's ``latent_dim`` (256), or fewer when the training fold has fewer samples or features."""
    return int(min(latent_dim, n_samples, n_features))


def hest_linear_probe(
    emb_train, y_train, groups_train, emb_test, latent_dim: int = HEST_LATENT_DIM, seed: int = 0
) -> tuple[np.ndarray, dict]:
    """HEST-Benchmark's probe fitted on the training rows; predictions for ``emb_test`` and what was fitted.

    Args:
        emb_train: ``(n_train, dim)`` frozen embeddings of the training rows.
        y_train: ``(n_train, n_genes)`` targets (HEST: log1p of the raw counts).
        groups_train: The group of each training row (recorded as ``fit_groups``; HEST does not use it).
        emb_test: ``(n_test, dim)`` embeddings of the held-out rows.
        latent_dim: PCA components requested (HEST: 256).
        seed: ``random_state`` of PCA and of the ridge (HEST's ``args.seed``).

    Returns:
        ``(predictions (n_test, n_genes), info)``; ``info`` holds ``alpha``, ``pca_components``,
        ``pca_components_requested`` and the fit groups.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    # HEST's embeddings are float32 (torch), so its scaler and PCA fit in float32: the same here
    emb_train, emb_test = np.asarray(emb_train, dtype=np.float32), np.asarray(emb_test, dtype=np.float32)
    y_train = np.asarray(y_train, dtype=np.float64)
    if np.isnan(y_train).any():  # HEST's pipeline has no notion of a gene a sample did not measure
        raise ValueError(
            "the HEST probe (method linear_probe_hest) fits all genes on all rows as HEST does, and some training "
            "targets were not measured (data.allow_unmeasured_genes): use method linear_probe, which leaves them out"
        )
    n_components = hest_components(*emb_train.shape, latent_dim) if len(emb_train) > 1 else 0
    if n_components < 1:  # nothing to fit (HEST stops with an error): the training mean, correlations undefined
        predictions = np.repeat(y_train.mean(axis=0, keepdims=True), len(emb_test), axis=0)
        return predictions, {
            "alpha": None,
            "pca_components": 0,
            "pca_components_requested": latent_dim,
            **fitted_on(groups_train),
        }
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=n_components, random_state=seed))])
    # HEST: X_train, X_test = torch.Tensor(pipe.fit_transform(X_train)), torch.Tensor(pipe.transform(X_test)):
    # rounded to float32; sklearn does not recognise a torch dtype and converts the tensors to float64
    x_train = pipe.fit_transform(emb_train).astype(np.float32).astype(np.float64)
    x_test = pipe.transform(emb_test).astype(np.float32).astype(np.float64)
    alpha = hest_alpha(x_train.shape[1], y_train.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=seed, fit_intercept=False, max_iter=HEST_MAX_ITER)
    reg.fit(x_train, y_train)
    predictions = np.asarray(reg.predict(x_test), dtype=np.float64).reshape(len(x_test), y_train.shape[1])
    info = {"alpha": alpha, "pca_components": n_components, "pca_components_requested": latent_dim}
    return predictions, {**info, **fitted_on(groups_train)}


def std_ddof0(values: list) -> float | None:
    """HEST-Benchmark's spread over splits (``np.std``, ddof=0) of the defined values; None when none is."""
    defined = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.std(defined)) if defined else None


def describe_hest_probe(methods: dict) -> str:
    """The ``cv_summary.md`` paragraph on ``linear_probe_hest``: what it is, HEST's number, PCA cuts, the gap to ours."""
    h = methods[PROBE_NAME]
    text = (
        f"`{PROBE_NAME}` is HEST-Benchmark's own probe on the same embeddings and folds as `linear_probe`: "
        "StandardScaler → PCA(256) → Ridge(alpha = 100 / (components × genes), no intercept, lsqr). "
        f"HEST-Benchmark reports its held-out mean Pearson: {fmt_float(h['pearson_mean'], missing=UNDEFINED)} "
        f"± {fmt_float(h.get('pearson_std_ddof0'), missing=UNDEFINED)} (std over folds with ddof=0, as HEST computes it)."
    )
    fewer = [f for f in h["folds"] if f.get("pca_components", 0) < f.get("pca_components_requested", 0)]
    if fewer:
        kept = ", ".join(f"{f['pca_components']} in fold {f['fold']}" for f in fewer)
        text += (
            f" PCA kept fewer than 256 components ({kept}): the training fold has fewer samples or embedding "
            "features than that (HEST-Benchmark's own code stops with an error there)."
        )
    ours = methods.get("linear_probe", {}).get("pearson_mean")
    if ours is not None and h["pearson_mean"] is not None:
        text += (
            f" Same folds, held-out mean Pearson: `{PROBE_NAME}` {h['pearson_mean']:.4f} vs `linear_probe` "
            f"{ours:.4f} ({h['pearson_mean'] - ours:+.4f})."
        )
    return text

"""Baselines that keep the deep models honest: the training mean, and ridge regression on colour/texture features.

Both are fitted on the training rows only and evaluated like the models (per-gene Spearman and
Pearson over the held-out rows). The ridge strength is chosen by an inner group-aware
cross-validation on the training groups, so the held-out fold is never looked at.
"""

from __future__ import annotations

import numpy as np

from expreg.data import HED_FROM_RGB_OD, UnreadableImageError, load_image, to_rgb
from expreg.progress import progress_bar

RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
RANK_TOLERANCE = 1e-6  # PCA keeps components whose singular value exceeds this fraction of the largest
VARIANCE_FLOOR = 1e-3  # a kept component's std is at least this fraction of the largest one's
FEATURE_SIZE = 128  # patches are resized to this before feature extraction


def patch_features(image) -> np.ndarray:
    """62 simple colour and texture features of one patch.

    Per RGB channel and per HED stain channel: mean, std, 10th/50th/90th percentiles (30);
    HSV saturation and value mean/std (4); grey-level gradient magnitude mean/std and 4-bin
    histogram (6); Laplacian variance (1); the fraction of dark, haematoxylin-rich pixels
    (a nucleus-density proxy) at 3 thresholds (3); an 18-bin hue histogram (18).
    """
    image = to_rgb(image)
    if image.size != (FEATURE_SIZE, FEATURE_SIZE):
        image = image.resize((FEATURE_SIZE, FEATURE_SIZE), resample=2)
    rgb = np.asarray(image, dtype=np.float64) / 255.0
    od = -np.log(np.clip(rgb, 1e-3, 1.0))
    hed = od.reshape(-1, 3) @ HED_FROM_RGB_OD
    feats: list[float] = []
    for channel in list(rgb.reshape(-1, 3).T) + list(hed.T):
        feats += [channel.mean(), channel.std(), *np.percentile(channel, [10, 50, 90])]
    hsv = np.asarray(image.convert("HSV"), dtype=np.float64) / 255.0
    feats += [hsv[..., 1].mean(), hsv[..., 1].std(), hsv[..., 2].mean(), hsv[..., 2].std()]
    grey = rgb.mean(axis=2)
    gy, gx = np.gradient(grey)
    magnitude = np.hypot(gx, gy)
    feats += [magnitude.mean(), magnitude.std(), *np.histogram(magnitude, bins=4, range=(0, 0.5))[0] / magnitude.size]
    laplacian = grey[1:-1, 1:-1] * 4 - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    feats.append(laplacian.var())
    haematoxylin = hed[:, 0]
    feats += [float((haematoxylin > t).mean()) for t in (0.3, 0.6, 0.9)]
    hue_hist = np.histogram(hsv[..., 0], bins=18, range=(0, 1), weights=hsv[..., 1])[0]
    feats += list(hue_hist / max(hue_hist.sum(), 1e-9))
    return np.asarray(feats, dtype=np.float64)


def extract_features(image_paths: list[str], progress: bool = True) -> np.ndarray:
    """``(num_images, 62)`` features; an unreadable image is an error naming it."""
    rows = []
    enabled = progress and len(image_paths) >= 200
    for path in progress_bar(image_paths, enabled=enabled, desc="features", unit="img"):
        image, reason = load_image(path)
        if image is None:
            raise UnreadableImageError(f"{path}: cannot read the image ({reason})")
        rows.append(patch_features(image))
    return np.stack(rows)


# A column whose std is below this fraction of its own magnitude is constant up to rounding
# (float32 embeddings carry ~1e-7 relative precision): scaling it to unit variance would turn
# rounding noise into a feature with a huge weight. Each column is judged on its own scale, so
# features in other units (colour fractions next to a Laplacian variance) are never dropped.
CONSTANT_TOLERANCE = 1e-6


def constant_columns(x: np.ndarray) -> np.ndarray:
    """Boolean mask of the columns of ``x`` that are constant up to rounding (see ``CONSTANT_TOLERANCE``)."""
    if not len(x):
        return np.ones(x.shape[1], dtype=bool)
    scale = np.maximum(np.abs(x).max(axis=0), np.finfo(np.float64).tiny)
    return x.std(axis=0) <= CONSTANT_TOLERANCE * scale


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std; constant columns (up to rounding) get std ``inf``, so they standardise to exactly 0."""
    std = x.std(axis=0)
    return x.mean(axis=0), np.where(constant_columns(x), np.inf, std)


def _standardise(train: np.ndarray, *others: np.ndarray):
    mean, std = _moments(train)
    return [(x - mean) / std for x in (train, *others)]


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge on centred data; returns (weights, intercept).

    A NaN target (a gene its spot's sample did not measure) is left out: the genes are fitted in
    groups that share the same measured rows, each on those rows only; a gene measured on none of
    the rows (possible in an inner fold of ``choose_alpha``) gets no weights and a 0 intercept, i.e. a
    constant prediction, which scores as undefined.
    """
    missing = np.isnan(y)
    if missing.any():
        return _fit_ridge_masked(x, y, missing, alpha)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc = x - x_mean
    weights = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    return weights, y_mean - x_mean @ weights


def _fit_ridge_masked(x: np.ndarray, y: np.ndarray, missing: np.ndarray, alpha: float):
    weights, intercept = np.zeros((x.shape[1], y.shape[1])), np.zeros(y.shape[1])
    patterns, which = np.unique(missing.T, axis=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        genes, rows = np.flatnonzero(which.ravel() == p), ~pattern
        if rows.any():
            weights[:, genes], intercept[genes] = fit_ridge(x[rows], y[np.ix_(rows, genes)], alpha)
    return weights, intercept


def choose_alpha(x: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas=RIDGE_ALPHAS, seed: int = 0) -> float:
    """Ridge strength with the best mean Spearman in an inner group k-fold over the training groups.

    With fewer than 2 training groups there is nothing to hold out: the middle of the grid is used.
    """
    from expreg.data.splits import assign_folds
    from expreg.evaluation.metrics import compute_metrics

    unique = np.array(sorted(set(groups.tolist())), dtype=object)
    if len(unique) < 2:
        return float(alphas[len(alphas) // 2])
    sizes = np.array([(groups == g).sum() for g in unique])
    mapping = assign_folds(unique, sizes, min(5, len(unique)), seed)
    fold = np.array([mapping[g] for g in groups])
    scores = []
    for alpha in alphas:
        values = []
        for k in sorted(set(fold.tolist())):
            inner_train, inner_val = fold != k, fold == k
            xt, xv = _standardise(x[inner_train], x[inner_val])
            w, b = fit_ridge(xt, y[inner_train], alpha)
            result = compute_metrics(xv @ w + b, y[inner_val], allow_unmeasured=True)
            values.append(result.spearman_mean if not np.isnan(result.spearman_mean) else -1.0)
        scores.append(float(np.mean(values)))
    return float(alphas[int(np.argmax(scores))])


def ridge_baseline(x_train, y_train, groups_train, x_test, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Predictions for ``x_test`` and ``{"alpha": ...}``; everything fitted on the training rows."""
    alpha = choose_alpha(x_train, y_train, groups_train, seed=seed)
    xt, xs = _standardise(x_train, x_test)
    w, b = fit_ridge(xt, y_train, alpha)
    return xs @ w + b, {"alpha": alpha, **fitted_on(groups_train)}


def fitted_on(groups_train) -> dict:
    """What a method was fitted on (recorded per fold, so leakage into a held-out fold is visible)."""
    return {"fit_groups": sorted(set(np.asarray(groups_train).tolist())), "num_fit_samples": len(groups_train)}


def mean_baseline(y_train: np.ndarray, num_test: int) -> np.ndarray:
    """The training mean (of the measured targets) for every test row (its correlations are undefined by
    construction), as a read-only view of one row: a 200,000-row fold needs no copy of it per row."""
    mean = (
        np.nanmean(y_train, axis=0, keepdims=True) if np.isnan(y_train).any() else y_train.mean(axis=0, keepdims=True)
    )
    return np.broadcast_to(mean, (num_test, mean.shape[1]))


def mean_fit(x_train, y_train, groups_train, x_test, seed: int = 0) -> tuple[np.ndarray, dict]:
    """``mean_baseline`` with the signature of the other baselines (``x`` only gives the test count)."""
    return mean_baseline(y_train, len(x_test)), fitted_on(groups_train)


def embed_images(
    image_paths: list[str],
    backbone: str,
    image_size: int,
    *,
    pretrained: bool = False,
    pretrained_path: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> np.ndarray:
    """Frozen backbone embeddings ``(num_images, num_features)`` (timm pooled features, eval mode), computed
    here without the embedding store (``expreg.embeddings``, which the probes of ``expreg.cv`` read)."""
    from expreg.inference import embed_files
    from expreg.modeling.model import build_model

    model = build_model(backbone, 1, pretrained=pretrained, pretrained_path=pretrained_path, image_size=image_size)
    return embed_files(model, image_paths, batch_size=batch_size, num_workers=num_workers)


def linear_probe_affine(emb_train, y_train, groups_train, max_components: int = 256, seed: int = 0):
    """HEST-style linear probe fitted on training rows, folded into one affine map.

    standardise -> PCA (at most ``max_components``, ``n_train - 1`` and the numerical rank) ->
    standardise -> ridge (strength by inner group CV): all linear, so predictions are
    ``emb @ weights + bias``. Kept numerically safe for rank-deficient embeddings (dead ReLU
    units, duplicated features): features constant on the training rows get zero weight, PCA
    stops at the numerical rank, and component variances are floored, so the folded weights
    stay bounded and a small change of one feature moves predictions a little.

    Returns:
        ``(weights (dim, K), bias (K,), info)``.
    """
    mu1, sd1 = _moments(emb_train)  # sd1 is inf for constant features: zero weight after folding
    z = (emb_train - mu1) / sd1
    centre = z.mean(axis=0)
    _, singular, vt = np.linalg.svd(z - centre, full_matrices=False)
    rank = int((singular > RANK_TOLERANCE * singular[0]).sum()) if singular.size and singular[0] > 0 else 0
    n_components = int(min(max_components, z.shape[0] - 1, rank))
    if n_components < 1:  # nothing varies on the training rows (or one row): the training mean
        info = {"alpha": None, "pca_components": 0}
        return np.zeros((emb_train.shape[1], y_train.shape[1])), mean_baseline(np.asarray(y_train, float), 1)[0], info
    basis = vt[:n_components].T
    projected = (z - centre) @ basis
    alpha = choose_alpha(projected, y_train, groups_train, seed=seed)
    mu2 = projected.mean(axis=0)
    sd2 = projected.std(axis=0)
    sd2 = np.maximum(sd2, VARIANCE_FLOOR * sd2.max())  # no component is blown up to unit variance from noise
    w, b = fit_ridge((projected - mu2) / sd2, y_train, alpha)
    weights = ((basis / sd1[:, None]) / sd2[None, :]) @ w
    bias = ((((-mu1 / sd1) - centre) @ basis - mu2) / sd2) @ w + b
    return weights, bias, {"alpha": alpha, "pca_components": n_components}


def linear_probe(emb_train, y_train, groups_train, emb_test, max_components: int = 256, seed: int = 0):
    """Predictions of the linear probe (see ``linear_probe_affine``) for ``emb_test``, and its info."""
    weights, bias, info = linear_probe_affine(emb_train, y_train, groups_train, max_components, seed)
    return emb_test @ weights + bias, {**info, **fitted_on(groups_train)}

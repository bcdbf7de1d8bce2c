"""``train.mode=linear_probe``: the head fitted in closed form on frozen embeddings instead of trained.

HEST-Benchmark's probe (standardise -> PCA -> ridge, ``expreg.evaluation.baselines``) folded into one
linear layer, fitted on the embeddings of the embedding store (``expreg.embeddings``: computed once, shared
with ``train.mode=frozen`` and ``expreg.cv``), so the result is a complete ``ExpRegModel`` in the same run directory, scored and
saved like a fine-tuned one. One process; nothing to resume.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from expreg.data.dataset import image_files, labels_array, string_list
from expreg.embeddings import ensure_embeddings
from expreg.evaluation.baselines import linear_probe_affine

logger = logging.getLogger("expreg")


def fit_linear_probe(trainer) -> tuple[float, float, np.ndarray]:
    """Embed the training images, fit the probe, install it as the model's head, evaluate on validation.

    Returns:
        ``(train_loss, val_loss, normalised validation predictions)`` for ``Trainer._end_epoch``.
    """
    cfg, accelerator, data = trainer.cfg, trainer.accelerator, trainer.data
    train = data.datasets["train"]
    batch_size = cfg.data.eval_batch_size or cfg.data.batch_size
    files = image_files(train)
    everything = [p for part in data.datasets.values() for p in image_files(part)]  # the store expreg.cv also uses
    store = ensure_embeddings(
        trainer.model,
        everything,
        accelerator=accelerator,
        cache_root=cfg.data.image_cache_dir,
        batch_size=batch_size,
        num_workers=cfg.data.num_workers,
    )
    logger.info(f"embedding store: {store.folder}")
    embeddings = store.get(files).astype(np.float64)
    targets = data.target_stats.normalize(labels_array(train, dtype=np.float64))
    groups = np.asarray(string_list(train, "group_id"), dtype=object)
    weights, bias, info = linear_probe_affine(embeddings, targets, groups, seed=cfg.seed)
    if info["pca_components"]:
        logger.info(f"linear probe: {info['pca_components']} PCA components, ridge alpha {info['alpha']:g}")
    else:
        logger.warning("linear probe: the embeddings do not vary on the training rows; the head predicts the mean")
    trainer.model.head = _linear_head(weights, bias)
    train_loss = float(np.nanmean((embeddings @ weights + bias - targets) ** 2))  # NaN: a target not measured
    trainer.model, trainer.val_dl = accelerator.prepare(trainer.model, data.loaders["validation"])
    val_loss, predictions = trainer.evaluate()
    return train_loss, val_loss, predictions


def _linear_head(weights: np.ndarray, bias: np.ndarray) -> torch.nn.Linear:
    """A ``Linear`` layer computing ``x @ weights + bias``."""
    head = torch.nn.Linear(weights.shape[0], weights.shape[1])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weights.T))
        head.bias.copy_(torch.from_numpy(bias))
    return head

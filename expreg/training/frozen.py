"""``train.mode=frozen``: the head trained on cached encoder embeddings by the same loop as fine-tuning.

The encoder (``model.backbone``, any timm name, ``hf-hub:`` id or local foundation-model folder,
``model.pooling``) never changes, so every image is embedded once, into the embedding store
(``expreg.embeddings``), before the run directory exists; the loop then trains the head
(``FrozenHead``: the model's dropout and linear or MLP head, shared with it) on rows of that
store, with the same optimizer, schedule, early stopping, checkpoints, exact resume and
several-process sharding as fine-tuning. ``checkpoints/best`` is a complete ``ExpRegModel``
(encoder + head), which ``expreg.predict`` and ``expreg.map`` use on images unchanged.

Augmentation: with ``data.augment_dihedral=true`` the training images are embedded in all 8
dihedral views (8 stores) and each epoch uses a seeded view per sample; evaluation uses the
image as it is. Colour and stain jitter cannot be cached (``RunConfig`` refuses them).

``model.context=neighbourhood``: each sample's embedding is read beside the mean embedding (view 0) of
the spots of its section within ``data.neighbourhood_um`` (``expreg.data.neighbours``; a split's
neighbourhoods, computed once in ``setup_data``, stay inside the split: sections are whole groups).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from expreg.data.dataset import arrow_column, image_files, labels_array
from expreg.data.neighbours import first_rows
from expreg.embeddings import NUM_VIEWS, ensure_embedding_views
from expreg.modeling.encoders import weights_digest

logger = logging.getLogger("expreg")


class FrozenHead(nn.Module):
    """The trainable part of an ``ExpRegModel`` on embeddings: ``forward(pixel_values=embeddings, labels)``.

    Holds the model's own ``dropout`` and ``head`` modules, and its ``fusion_gate`` with ``model.fusion=gated``
    (training this trains them); ``config``, ``to_expression`` and ``save_pretrained`` are the full model's.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.dropout = model.dropout
        self.head = model.head
        if hasattr(model, "fusion_gate"):
            self.fusion_gate = model.fusion_gate
        object.__setattr__(self, "full_model", model)  # not a submodule: its encoder is not trained or checkpointed

    @property
    def config(self):
        return self.full_model.config

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        return self.full_model.forward_head(pixel_values, labels)

    def to_expression(self, predictions):
        return self.full_model.to_expression(predictions)

    def save_pretrained(self, *args, **kwargs):
        return self.full_model.save_pretrained(*args, **kwargs)


class EmbeddingRows:
    """A map-style dataset of a split's embedding rows, fetched a batch at a time (``__getitems__``).

    ``views[v]`` is the (memory-mapped) array of view ``v`` and ``rows[v][i]`` the row of sample ``i``
    in it: nothing is loaded into memory beyond the batch being read. Yields the batches the training
    loop expects: ``pixel_values`` (the embeddings; with ``neighbourhood``, a neighbourhood model's
    row-normalised matrix over the samples, each sample's embedding beside the mean view-0 embedding of
    its neighbourhood, read for the batch's neighbours alone), normalised ``labels``, ``path`` and
    ``skipped`` (always 0: every image was embedded). ``paths``: a list, or the split's memory-mapped Arrow
    column (a training run's: only the batch's paths become Python strings).
    """

    def __init__(self, views, labels: np.ndarray, paths, seed: int, rows=None, neighbourhood=None) -> None:
        self.views, self.labels, self.paths, self.seed = views, labels.astype(np.float32), paths, seed
        self.neighbourhood = neighbourhood
        identity = np.arange(len(paths), dtype=np.int64)
        self.rows = rows if rows is not None else [identity] * len(views)
        self.epoch_views = np.zeros(len(paths), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """The view of each sample in ``epoch`` (seeded; all 0 with one view)."""
        from expreg.seeding import derive_seed

        if len(self.views) > 1:
            rng = np.random.default_rng(derive_seed(self.seed, epoch, "frozen-views"))
            self.epoch_views = rng.integers(0, len(self.views), size=len(self.paths))

    def __getitems__(self, indices: list[int]) -> dict:
        index = np.asarray(indices, dtype=np.int64)
        batch = np.empty((len(index), self.views[0].shape[1]), dtype=np.float32)
        for view in np.unique(self.epoch_views[index]):
            chosen = self.epoch_views[index] == view
            batch[chosen] = self.views[view][self.rows[view][index[chosen]]]
        if self.neighbourhood is not None:
            batch = np.hstack([batch, self._neighbourhood_means(index)])
        return {
            "pixel_values": torch.from_numpy(batch),
            "labels": torch.from_numpy(self.labels[index]),
            "path": self.paths.take(index).to_pylist()
            if hasattr(self.paths, "take")
            else [self.paths[i] for i in index],
            "skipped": 0,
        }

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])

    def _neighbourhood_means(self, index: np.ndarray) -> np.ndarray:
        """The mean view-0 embedding of each sample's neighbourhood: the rows of the matrix, over the embeddings
        of the samples they name (only those are read). With ``data.augment_dihedral`` a sample's own embedding
        takes its epoch's view; its neighbourhood is the tissue around it, as seen unturned (as in prediction)."""
        import scipy.sparse as sp

        part = self.neighbourhood[index].tocoo()
        samples, local = np.unique(part.col, return_inverse=True)
        weights = sp.csr_matrix((part.data, (part.row, local)), shape=(len(index), len(samples)))
        embeddings = np.asarray(self.views[0][self.rows[0][samples]], dtype=np.float64)
        return np.asarray(weights @ embeddings, dtype=np.float32)


def _as_batch(batch: dict) -> dict:
    return batch


def setup_frozen_loaders(cfg, data, model, accelerator, dry_run_steps: int | None = None) -> dict:
    """Embed every split's images into the store (all processes share the work), then the loaders.

    ``dry_run_steps`` (a dry run): each split is first cut to the rows the dry run reads (that many
    training steps, 2 evaluation batches per process), so that only those are embedded.

    Returns:
        The loaders ``build_dataloaders`` would return (``train``, ``validation``, ``test``,
        ``train_sampler``, ``train_transform``), over embedding rows.
    """
    if dry_run_steps:
        _cut_for_dry_run(cfg, data, accelerator.num_processes, dry_run_steps)
    # every view over every image of the run: the same stores for every split, fold and later run
    everything = [p for part in data.datasets.values() for p in image_files(part)]
    digest = weights_digest(model.backbone) if accelerator.is_main_process else None  # read once, not per store
    data.embedding_stores = _stores(cfg, model, everything, accelerator, digest)
    loaders: dict = {}
    for name, part in data.datasets.items():
        files = image_files(part)
        stores = data.embedding_stores if name == "train" else data.embedding_stores[:1]
        labels = data.target_stats.normalize(labels_array(part))
        views, rows = [s.array for s in stores], [s.rows(files) for s in stores]
        neighbourhood = data.neighbourhoods.get(name)
        paths = arrow_column(part, "path")  # the mapped column: no Python string per row held through training
        dataset = EmbeddingRows(views, labels, paths, cfg.seed, rows=rows, neighbourhood=neighbourhood)
        loaders.update(_loaders(name, dataset, cfg, accelerator.num_processes))
    return loaders


def _loaders(name: str, dataset: EmbeddingRows, cfg, num_processes: int) -> dict:
    """The split's loader, with their own generators: iterating them never draws from the global RNG
    (dropout), so a resumed run draws what the uninterrupted one did (as ``expreg.data.loaders``)."""
    from torch.utils.data import DataLoader

    from expreg.data.loaders import EpochBatchSampler

    d = cfg.data
    if name == "train":
        sampler = EpochBatchSampler(len(dataset), d.batch_size, cfg.seed, num_processes)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_as_batch, generator=sampler.generator)
        return {"train": loader, "train_sampler": sampler, "train_transform": dataset}
    generator = torch.Generator().manual_seed(cfg.seed)
    batch = d.eval_batch_size or d.batch_size
    return {name: DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=_as_batch, generator=generator)}


def _cut_for_dry_run(cfg, data, num_processes: int, steps: int) -> None:
    d = cfg.data
    keep = {"train": steps * d.batch_size * cfg.train.grad_accum_steps * num_processes}
    for name, part in data.datasets.items():
        n = min(len(part), keep.get(name, 2 * (d.eval_batch_size or d.batch_size) * num_processes))
        data.datasets[name] = part.select(range(n))
        if data.neighbourhoods:
            data.neighbourhoods[name] = first_rows(data.neighbourhoods[name], n)
    logger.info(
        f"dry run: only the rows it reads are embedded ({', '.join(f'{k} {len(v)}' for k, v in data.datasets.items())})"
    )


def _stores(cfg, model, files: list[str], accelerator, weights_sha256: str | None) -> list:
    """View 0, and with ``data.augment_dihedral`` the 7 other dihedral views, of every image (one pass)."""
    views = range(NUM_VIEWS) if cfg.data.augment_dihedral else range(1)
    if cfg.data.augment_dihedral:
        logger.info(
            "data.augment_dihedral=true: the images are embedded in all 8 dihedral views (8x the encoder's work, "
            "once; each image decoded once); set data.augment_dihedral=false to embed each image once"
        )
    return ensure_embedding_views(
        model,
        files,
        views=views,
        accelerator=accelerator,
        cache_root=cfg.data.image_cache_dir,
        batch_size=cfg.data.eval_batch_size or max(cfg.data.batch_size, 64),
        num_workers=cfg.data.num_workers,
        progress=accelerator.is_local_main_process,
        weights_sha256=weights_sha256,
    )


STORES_FILE = "embedding_stores.json"


def record_stores(run_dir, stores: list, resuming: bool, is_main_process: bool) -> None:
    """``<run>/embedding_stores.json``: the stores the run reads (folder and identity). On ``--resume`` the
    encoder must be the one the run started with: its head was trained on those embeddings."""
    import json
    from pathlib import Path

    from expreg.config import ConfigError
    from expreg.run_dir import write_json

    path = Path(run_dir) / STORES_FILE
    keys = ("architecture", "model_args", "pooling", "weights_sha256", "image_size", "image_mean", "image_std")
    now = {k: stores[0].info[k] for k in keys}
    if resuming and path.is_file():
        before = json.loads(path.read_text())["encoder"]
        changed = [k for k in keys if before.get(k) != now[k]]
        if changed:
            raise ConfigError(
                f"--resume: the encoder differs from the one this run's head was trained on ({', '.join(changed)} "
                f"changed; {path}); resume with the same encoder, or start a new run"
            )
    if is_main_process:
        write_json(path, {"encoder": now, "stores": [str(s.folder) for s in stores]})

"""From a ``DatasetDict`` to DataLoaders: rows -> transformed samples -> batches, in a seeded order.

Owns the ``with_transform`` function (``ExpressionTransform``: decoding or image-cache lookup,
``bad_image_policy``, target normalisation), batching (``collate_fn``), the epoch layout of the
training batches over processes (``epoch_batch_sizes``, ``EpochBatchSampler``: every sample once
per epoch, the same order in every process and after a resume) and ``build_dataloaders``.
Nothing here places tensors on devices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from expreg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, UnreadableImageError, load_image

if TYPE_CHECKING:
    from expreg.data.dataset import TargetStats


class ExpressionTransform:
    """``with_transform`` function: a batch of rows -> ``pixel_values`` and normalised ``labels``.

    A row with a ``context`` (its context patch's path, ``model.context=multiscale``) gives the patch and the
    context patch stacked as 6 channels, both transformed alike.

    Images are decoded here (the dataset's image column is cast to ``decode=False``), so that an
    image that became unreadable after validation is handled by ``bad_image_policy``: ``"fail"``
    raises ``UnreadableImageError`` naming the file; ``"skip"`` drops the sample (counted in the
    batch's ``skipped``). With an ``image_cache`` (``expreg.data.image_cache.ImageCache``) the resized
    pixels are read from the cache instead of decoding the file.
    """

    def __init__(
        self,
        image_transform: ImageTransform,
        target_stats: TargetStats | None = None,
        bad_image_policy: str = "fail",
        image_cache=None,
    ) -> None:
        if bad_image_policy not in ("fail", "skip"):
            raise ValueError(f"bad_image_policy must be fail or skip, got {bad_image_policy!r}")
        self.image_transform = image_transform
        self.target_stats = target_stats
        self.bad_image_policy = bad_image_policy
        self.image_cache = image_cache

    def _load(self, item):
        if not isinstance(item, (dict, str)):
            return item, None  # already decoded
        if self.image_cache is not None:
            return self.image_cache.get(item["path"] if isinstance(item, dict) else item)
        return load_image(item)

    def set_epoch(self, epoch: int) -> None:
        self.image_transform.set_epoch(epoch)

    def _view(self, item, key: str):
        """One image of a row, transformed; None when unreadable under ``bad_image_policy=skip``."""
        image, reason = self._load(item)
        if image is None and self.bad_image_policy == "fail":
            path = item["path"] if isinstance(item, dict) else item
            raise UnreadableImageError(
                f"{path} (row path {key!r}) cannot be read: {reason}. Fix or remove the file (data.check_images="
                "decode finds all such files before training), or set data.bad_image_policy=skip"
            )
        return None if image is None else self.image_transform(image, key)

    def __call__(self, batch: dict) -> dict:
        import torch

        contexts = batch.get("context") or [None] * len(batch["path"])
        pixel_values = []
        for item, key, context in zip(batch["image"], batch["path"], contexts):
            views = [self._view(item, key)] + ([] if context is None else [self._view(context, key)])
            # a context patch is transformed as its patch (the same key: the same flips and jitter)
            pixel_values.append(None if any(v is None for v in views) else torch.cat(views, dim=0))
        labels = np.asarray(batch["labels"], dtype=np.float32)
        if self.target_stats is not None:
            labels = self.target_stats.normalize(labels)
        labels = torch.from_numpy(np.ascontiguousarray(labels, np.float32))
        return {"pixel_values": pixel_values, "labels": labels, "path": list(batch["path"])}


def collate_fn(examples: list[dict]) -> dict:
    """Stack transformed rows into ``{"pixel_values": (B, 3, H, W), "labels": (B, K)}``.

    Also ``path`` (the rows' paths, for error messages) and ``skipped`` (samples dropped as
    unreadable under ``bad_image_policy=skip``).
    """
    import torch

    kept = [e for e in examples if e["pixel_values"] is not None]
    if not kept:
        raise UnreadableImageError(
            "every image of a batch was unreadable: " + ", ".join(e["path"] for e in examples[:5])
        )
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in kept]),
        "labels": torch.stack([e["labels"] for e in kept]),
        "path": [e["path"] for e in kept],
        "skipped": len(examples) - len(kept),
    }


# ---------------------------------------------------------------------------------------------
# DataLoaders
# ---------------------------------------------------------------------------------------------


def _round_sizes(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes that differ by at most one (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def epoch_batch_sizes(num_samples: int, batch_size: int, num_processes: int) -> list[int]:
    """Sizes of an epoch's batches, in order, for ``num_processes`` processes taking turns.

    Full batches first; the remainder is spread over one last round of ``num_processes`` batches
    (so every process gets the same number of batches and every sample is used exactly once).
    A remainder too small to give each process two samples (BatchNorm needs two) is folded into
    the last full round instead.
    """
    if num_samples < num_processes:
        raise ValueError(f"{num_samples} training samples cannot be shared by {num_processes} processes")
    full_rounds, tail = divmod(num_samples, batch_size * num_processes)
    sizes = [batch_size] * (full_rounds * num_processes)
    if tail == 0:
        return sizes
    if tail >= 2 * num_processes or full_rounds == 0:
        return sizes + _round_sizes(tail, num_processes)
    last_round = _round_sizes(batch_size * num_processes + tail, num_processes)
    return sizes[:-num_processes] + last_round


class EpochBatchSampler:
    """Shuffled batches that depend only on (seed, epoch): the same in every process and after a resume.

    accelerate deals batch ``i`` to process ``i % num_processes``. The number of batches is a
    multiple of ``num_processes`` and no sample is repeated, so each sample is seen exactly
    once per epoch across processes (see ``epoch_batch_sizes``). There is deliberately no
    ``batch_size`` attribute: accelerate then takes the batches as they are, without padding.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, num_processes: int = 1) -> None:
        import torch

        self.sizes = epoch_batch_sizes(num_samples, batch_size, num_processes)
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        # Handed to the DataLoader: worker seeds are drawn from it instead of from the global RNG,
        # whose stream (dropout, ...) must not depend on when a DataLoader iterator was created.
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        from expreg.seeding import derive_seed

        self.epoch = epoch
        self.generator.manual_seed(derive_seed(self.seed, epoch, "workers"))

    def __iter__(self):
        import torch

        from expreg.seeding import epoch_generator

        order = torch.randperm(self.num_samples, generator=epoch_generator(self.seed, self.epoch)).tolist()
        start = 0
        for size in self.sizes:
            yield order[start : start + size]
            start += size

    def __len__(self) -> int:
        return len(self.sizes)


def build_dataloaders(
    datasets_dict,
    *,
    image_size: int,
    batch_size: int,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    target_stats: TargetStats | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    dihedral: bool = True,
    color_jitter: float = 0.0,
    bad_image_policy: str = "fail",
    num_processes: int = 1,
    hed_jitter: float = 0.0,
    image_cache=None,
) -> dict:
    """DataLoaders for every split: shuffled, augmented ``train``; ordered, plain evaluation splits.

    ``num_processes`` is the number of training processes that will share the train loader
    (after ``accelerator.prepare``): its batches are laid out so that each sample is used
    exactly once per epoch across them. ``image_cache`` (``expreg.data.image_cache.ImageCache`` at
    ``image_size``) replaces decoding the image files.

    Returns:
        ``{"train": DataLoader, "validation": ..., "test": ...}`` (the splits present), plus
        ``"train_sampler"`` and ``"train_transform"``, which need ``set_epoch`` at each epoch.
    """
    _check_image_cache_size(image_cache, image_size)
    augmentation = {"dihedral": dihedral, "color_jitter": color_jitter, "seed": seed, "hed_jitter": hed_jitter}
    loaders: dict = {}
    for name, part in datasets_dict.items():
        train = name == "train"
        image_transform = ImageTransform(image_size, mean, std, train=train, **augmentation)
        # Evaluation always fails on an unreadable image: skipping would misalign predictions and paths.
        transform = ExpressionTransform(
            image_transform, target_stats, bad_image_policy if train else "fail", image_cache=image_cache
        )
        dataset = _transformed_split(part, transform)
        if train:
            loaders["train"], loaders["train_sampler"] = _train_loader(
                dataset, batch_size, seed, num_processes, num_workers
            )
            loaders["train_transform"] = transform
        else:
            loaders[name] = _eval_loader(dataset, eval_batch_size or batch_size, seed, num_workers)
    return loaders


def _check_image_cache_size(image_cache, image_size: int) -> None:
    if image_cache is not None and image_cache.image_size != image_size:
        raise ValueError(
            f"the image cache {image_cache.folder} holds {image_cache.image_size}-px images, not {image_size}"
        )


def _transformed_split(part, transform):
    """A split whose images stay undecoded (``transform`` decodes them) with ``transform`` attached."""
    import datasets

    return part.cast_column("image", datasets.Image(decode=False)).with_transform(transform)


FORKSERVER_PRELOAD = (
    "numpy",
    "torch",
    "PIL.Image",
    "pyarrow",
    "datasets",
    "expreg.data.loaders",
    "expreg.data.transforms",
    "expreg.data.fork_server",  # the server ignores SIGTERM (torchrun signals the whole process group)
)


def worker_context(num_workers: int):
    """How DataLoader workers start: from a fork server once ``torch.distributed`` runs, else the default (fork).

    A process group's communication threads (gloo's run loops, NCCL's watchdog) call into Python when
    a collective's tensors are released. ``fork`` at that moment copies a held interpreter lock into the
    worker, which then hangs before it starts (CPython <= 3.11, gh-112275; seen here: a 2-process resume
    hung in evaluation, its second worker stuck in ``PyOS_AfterFork_Child``). Workers forked from the
    single-threaded fork server cannot inherit it; the server imports ``FORKSERVER_PRELOAD`` once, so a
    worker starts in milliseconds, not seconds. Results are the same either way (workers are seeded from
    the loader's generator), and everything a worker gets is picklable (the image cache and the patch
    stores reopen their files).
    """
    if num_workers == 0:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(FORKSERVER_PRELOAD))  # read when the server starts (once per process)
    return context


def worker_init(seed: bool = True):
    """A DataLoader's ``worker_init_fn``: the patch stores registered now (a fork server's workers get the
    server's environment, from before a store registered later), then, with ``seed``, ``seed_worker``."""
    import functools
    import os

    from expreg.data.patch_store import ENV

    return functools.partial(_init_worker, stores=os.environ.get(ENV), seed=seed)


def worker_options(num_workers: int, seed: bool = True) -> dict:
    """A DataLoader's ``num_workers``, ``worker_init_fn`` (``worker_init``) and ``multiprocessing_context``
    (``worker_context``): what every loader of expreg passes."""
    return {
        "num_workers": num_workers,
        "worker_init_fn": worker_init(seed),
        "multiprocessing_context": worker_context(num_workers),
    }


def _init_worker(worker_id: int, stores: str | None, seed: bool) -> None:
    import os

    from expreg.data.patch_store import ENV
    from expreg.seeding import seed_worker

    if stores is not None:
        os.environ[ENV] = stores
    if seed:
        seed_worker(worker_id)


def _dataloader(dataset, num_workers: int, **kwargs):
    """A DataLoader with what every split's loader shares: ``collate_fn`` and seeded workers."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, collate_fn=collate_fn, **worker_options(num_workers), **kwargs)


def _train_loader(dataset, batch_size: int, seed: int, num_processes: int, num_workers: int):
    """The training DataLoader and its ``EpochBatchSampler`` (which needs ``set_epoch`` at each epoch)."""
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, num_processes)
    return _dataloader(dataset, num_workers, batch_sampler=sampler, generator=sampler.generator), sampler


def _eval_loader(dataset, batch_size: int, seed: int, num_workers: int):
    """An evaluation DataLoader: rows in order, no augmentation."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return _dataloader(dataset, num_workers, batch_size=batch_size, shuffle=False, generator=generator)

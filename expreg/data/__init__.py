"""Data: the metadata CSV contract, group-aware splits, the ``DatasetDict``, transforms, loaders and
caches. Nothing here places tensors on devices or knows about the Accelerator.

The submodules, each owning one step:

- ``metadata``: read and validate the metadata CSV (the data contract).
- ``splits``: all split assignment: split and fold tables, split files, ``split_rows``.
- ``dataset``: metadata + split -> ``DatasetDict`` (Arrow files), target statistics.
- ``transforms``: image decoding, resizing and augmentation; reading image files.
- ``loaders``: the ``with_transform`` function, batching, the epoch sampler, DataLoaders.
- ``image_cache``: the decoded-image cache.
- ``demo``: the synthetic demo dataset.

The documented names are importable from here (``from expreg.data import load_expression_dataset``);
they are looked up lazily, so importing a light submodule (``expreg.data.metadata``) does not import
``datasets`` or torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # dataset: metadata + split -> DatasetDict
    "load_expression_dataset": "dataset",
    "build_split_datasets": "dataset",
    "build_dataset_dict": "dataset",
    "compute_target_stats": "dataset",
    "TargetStats": "dataset",
    "image_files": "dataset",
    "library_sizes": "dataset",
    "dataset_gene_names": "dataset",
    # loaders
    "build_dataloaders": "loaders",
    "EpochBatchSampler": "loaders",
    "epoch_batch_sizes": "loaders",
    "ExpressionTransform": "loaders",
    "collate_fn": "loaders",
    # transforms
    "ImageTransform": "transforms",
    "UnreadableImageError": "transforms",
    "error_message": "transforms",
    "load_image": "transforms",
    "decode_resized": "transforms",
    "hed_jitter": "transforms",
    "to_rgb": "transforms",
    "HED_FROM_RGB_OD": "transforms",
    "RGB_OD_FROM_HED": "transforms",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    # metadata
    "expression_targets": "expression",
    "choose_genes": "expression",
    "GeneChoice": "expression",
    "transform_counts": "expression",
    "Metadata": "metadata",
    "MetadataError": "metadata",
    "read_metadata": "metadata",
    "read_recipe_metadata": "metadata",
    # splits
    "split_rows": "splits",
    "RowSplit": "splits",
    "split_assignment": "splits",
    # demo
    "resolve_metadata_csv": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"expreg.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'expreg.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

"""Data: the metadata CSV contract, group-aware splits, the ``DatasetDict``, transforms, loaders and
caches. Nothing here places tensors on devices or knows about the Accelerator.

The documented names are importable from here (``from expreg.data import load_expression_dataset``);
they are looked up lazily, so importing a light submodule (``expreg.data.metadata``) does not import
``datasets`` or torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_expression_dataset": "dataset",
    "build_dataset_dict": "dataset",
    "compute_target_stats": "dataset",
    "TargetStats": "dataset",
    "image_files": "dataset",
    "dataset_gene_names": "dataset",
    "build_dataloaders": "dataset",
    "EpochBatchSampler": "dataset",
    "ImageTransform": "dataset",
    "UnreadableImageError": "dataset",
    "error_message": "dataset",
    "load_image": "dataset",
    "decode_resized": "dataset",
    "hed_jitter": "dataset",
    "to_rgb": "dataset",
    "Metadata": "metadata",
    "MetadataError": "metadata",
    "read_metadata": "metadata",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"expreg.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'expreg.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

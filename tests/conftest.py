"""Shared fixtures: small synthetic datasets written to tmp_path (no network, no downloads)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from expreg.data.demo import make_synthetic_dataset  # noqa: E402

_CACHE: dict[tuple, Path] = {}


@pytest.fixture
def make_dataset(tmp_path_factory, tmp_path):
    """Factory: a fresh copy of a synthetic dataset (cached per parameter set), returns its CSV."""

    def _make(num_groups=5, samples_per_group=8, image_size=16, num_genes=50, seed=0) -> Path:
        key = (num_groups, samples_per_group, image_size, num_genes, seed)
        if key not in _CACHE:
            src = tmp_path_factory.mktemp("synthetic")
            make_synthetic_dataset(src, num_groups, samples_per_group, image_size, num_genes, seed)
            _CACHE[key] = src
        dst = tmp_path / f"data_{len(list(tmp_path.glob('data_*')))}"
        shutil.copytree(_CACHE[key], dst)
        return dst / "metadata.csv"

    return _make


@pytest.fixture
def dataset_csv(make_dataset) -> Path:
    """5 groups, ~40 rows, 16x16 PNGs, K=50, with genes.txt beside the CSV."""
    return make_dataset()
